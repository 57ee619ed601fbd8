"""``qnext.megatron.compat.grad_norm``: the TE-free gradient norm without device reads equals the norm of
all gradients; a non-finite norm stops the step before the update; the entry drops DDP's per-bucket
NaN check only when clipping reads the norm."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("megatron.core")


def test_foreach_norm_is_the_norm_of_every_gradient():
    from qnext.megatron.compat.grad_norm import foreach_l2_norm

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * s for shape, s in (((3, 4), 1.0), ((7,), 30.0), ((2, 2, 5), 1e-3))]
    norm, per_tensor = foreach_l2_norm(2048 * 32, None, [grads], False)
    want = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert math.isclose(float(norm), float(want), rel_tol=1e-6)
    # megatron's own (the reference) needs CUDA for its result; its arithmetic is the norm of the norms
    ref = torch.norm(torch.tensor([float(torch.norm(g)) for g in grads]))
    assert math.isclose(float(norm), float(ref), rel_tol=1e-6)


def test_installed_in_megatrons_clip_grads_only_in_place_of_the_local_one(monkeypatch):
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import local_multi_tensor_l2_norm

    from qnext.megatron.compat import grad_norm

    monkeypatch.setattr(clip_grads, "l2_norm_impl", local_multi_tensor_l2_norm)
    assert grad_norm.install_grad_norm_fix()
    g = [torch.ones(4)]
    assert float(clip_grads.l2_norm_impl(1, None, [g], False)[0]) == 2.0  # no CUDA needed: not megatron's
    apex_like = lambda *a: ("apex", None)  # noqa: E731 - TE's or Apex's kernel stays
    monkeypatch.setattr(clip_grads, "l2_norm_impl", apex_like)
    grad_norm.install_grad_norm_fix()
    assert clip_grads.l2_norm_impl(1, None, [g], False)[0] == "apex"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_stops_the_step(monkeypatch, bad):
    from megatron.core.optimizer import optimizer

    from qnext.megatron.compat import grad_norm

    norms = iter([2.5, bad])
    monkeypatch.setattr(optimizer, "get_grad_norm_fp32", lambda grads, **kw: next(norms))
    assert grad_norm.install_grad_norm_fix()
    assert optimizer.get_grad_norm_fp32([]) == 2.5
    with pytest.raises(grad_norm.NonFiniteGradients, match="did not apply them"):
        optimizer.get_grad_norm_fp32([])


def test_ddp_nan_check_is_dropped_only_when_clipping(tmp_path, monkeypatch):
    from qnext.config import load_config, validate_config
    from qnext.megatron.args import megatron_argv, parse_megatron_args
    from qnext.megatron.checkpoint import CheckpointPlan

    def ddp_checks(*overrides):
        cfg = load_config(["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/r", *overrides])
        hf = validate_config(cfg, world_size=8)
        plan = CheckpointPlan(save=f"{tmp_path}/c", load=f"{tmp_path}/c", pretrained="/x", resuming=False)
        return parse_megatron_args(megatron_argv(cfg, hf, use_te=False, ckpt=plan, wandb_installed=False),
                                   world_size=8).check_for_nan_in_loss_and_grad

    assert ddp_checks() is False  # grad_clip 1.0: the clipping norm carries the check
    assert ddp_checks("train.grad_clip=0") is True  # no norm is taken: megatron's DDP check stays
    monkeypatch.setenv("QNEXT_MEGATRON_FIXES", "0")
    assert ddp_checks() is True  # the norm check is not installed: megatron's DDP check stays
