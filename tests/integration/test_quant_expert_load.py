"""Quantized (FP8, NF4) routed experts filled from a converted torch_dist checkpoint one layer at a time
(qnext.megatron.quant_load) on the tiny Qwen3-Next, on CPU:

- the model built with FP8 expert storage has no bf16 expert weight at all, and megatron's checkpoint load
  of the rest skips the experts (their state dict is empty);
- the bf16 model's load fills the stacked expert weights in place (no second copy at start-up);
- each dist_checkpointing.load call of the expert loader asks for one layer's two expert tensors only;
- the quantized values and scales equal, bit for bit, those of the bf16-built model loaded whole and
  quantized afterwards, and so do the logits of the two models;
- the cast megatron applies to the whole model (``.bfloat16()``) leaves the quantized storage as it is;
- with LoRA, logits and LoRA gradients move from the unquantized base's by no more than the quantization
  error of the expert weights implies.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/unit"))

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow


def _build(cfg: dict, base: str):
    from qnext.megatron.model import build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device

    with construction_device("cpu"):
        return build_model(cfg, None, torch.float32, use_te=False,
                           config_overrides={**CPU_BUILD_OVERRIDES, "deterministic_mode": True, "qnext_expert_base": base})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny checkpoint written and converted once, and a gloo world of one (CPU GDN path)."""
    from convert_fixtures import small_config, write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist
    from dist_fixtures import gloo_world_of_one

    base = tmp_path_factory.mktemp("fp8")
    hf = write_hf_checkpoint(base / "hf")
    convert_hf_to_torch_dist(hf, base / "mg", progress=False, log=None)
    gloo_world_of_one()
    return small_config(), base / "mg"


def _storage(w) -> list[torch.Tensor]:
    """The quantized storage of an ExpertWeight, as tensors to compare bit for bit."""
    if w.base == "fp8":
        return [w.q.view(torch.uint8), w.scale]
    return [t for c in w.nf4.chunks for t in (c.quantized_data, c.quantized_scalers, c.quantization_factor,
                                               c.scaler_mean)]


BASES = ["fp8", pytest.param("nf4", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchao") is None, reason="nf4 needs torchao (pip install -e '.[quant]')"))]


@pytest.mark.parametrize("base", BASES)
def test_quantized_experts_load_layer_by_layer_and_equal_quantizing_the_loaded_model(converted, monkeypatch, base):
    from megatron.core import dist_checkpointing

    from qnext.megatron.model import load_torch_dist
    from qnext.megatron.parallel import construction_device
    from qnext.megatron.quant_load import load_quantized_experts, quantized_expert_modules

    cfg, mg = converted

    reference = _build(cfg, "bf16")
    results = []
    real_load = dist_checkpointing.load
    monkeypatch.setattr(dist_checkpointing, "load", lambda *a, **k: results.append(real_load(*a, **k)) or results[-1])
    load_torch_dist(reference, mg)
    monkeypatch.setattr(dist_checkpointing, "load", real_load)
    # torch_dist loads the experts into the model's own weights: the "merged" tensor is the parameter itself,
    # no second copy of the experts at start-up
    params = dict(reference.named_parameters())
    expert_keys = [k for k in results[0][0] if ".mlp.experts.linear_fc" in k and k.endswith(".weight")]
    assert len(expert_keys) == 2 * sum(type(m).__name__ == "GroupedGemmExperts" for m in reference.modules()) > 0
    assert all(results[0][0][k] is params[k] for k in expert_keys)
    # ... and holds the checkpoint's values: the same as a load that stacks the pieces into new tensors
    import qnext.megatron.experts as experts_mod

    monkeypatch.setattr(experts_mod, "_views_of", lambda *a: False)
    stacked = _build(cfg, "bf16")
    load_torch_dist(stacked, mg)
    monkeypatch.undo()
    stacked_params = dict(stacked.named_parameters())
    for k in expert_keys:
        assert float(params[k].abs().sum()) > 0 and torch.equal(params[k], stacked_params[k]), k
    for _, m in quantized_expert_modules(reference):
        raise AssertionError("a bf16-built model has no FP8 experts")
    experts_ref = [m for m in reference.modules() if type(m).__name__ == "GroupedGemmExperts"]
    for m in experts_ref:
        m.requires_grad_(False)
        m.quantize_(base)

    model = _build(cfg, base)
    fp8 = quantized_expert_modules(model)
    assert len(fp8) == len(experts_ref) > 1
    assert not any(".mlp.experts." in n for n, _ in model.named_parameters())
    assert not any(".mlp.experts." in k for k in model.sharded_state_dict())
    load_torch_dist(model, mg)  # everything else; the experts are still unfilled
    assert all(not m.linear_fc1.filled or float(m.linear_fc1.scale.sum()) == m.linear_fc1.scale.numel()
               for _, m in fp8)  # not loaded yet: FP8's initial scales are ones, NF4 holds nothing

    calls = []
    monkeypatch.setattr(dist_checkpointing, "load", lambda sd, *a, **k: calls.append(sorted(sd)) or real_load(sd, *a, **k))
    said = []
    assert load_quantized_experts([model], mg, say=said.append) == len(fp8)
    assert len(calls) == len(fp8) and said
    for (name, _), keys in zip(fp8, calls):  # one layer's two tensors per call
        assert keys == [f"{name}.linear_fc1.weight", f"{name}.linear_fc2.weight"], keys

    for (_, got), want in zip(fp8, experts_ref):
        for sub in ("linear_fc1", "linear_fc2"):
            a, b = _storage(getattr(got, sub)), _storage(getattr(want, sub))
            assert len(a) == len(b) > 1 and all(torch.equal(x, y) for x, y in zip(a, b)), sub

    ids = torch.randint(0, cfg["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24)[None]
    with torch.no_grad(), construction_device("cpu"):
        out_ref, out = reference(ids, pos, None), model(ids, pos, None)
    assert torch.equal(out, out_ref)

    # megatron's Float16Module casts the model with .bfloat16(): the quantized storage must survive it
    before = [_storage(m.linear_fc1) for _, m in fp8]
    model.bfloat16()
    for (_, m), was in zip(fp8, before):
        now = _storage(m.linear_fc1)
        assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(now, was))
        if base == "fp8":
            assert m.linear_fc1.q.dtype == torch.float8_e4m3fn and m.linear_fc2.scale.dtype == torch.float32
    assert model.output_layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("base", BASES)
def test_lora_with_a_quantized_base_stays_within_the_quantization_error_of_the_unquantized_base(converted, base):
    """The tiny model with LoRA (the 7 default targets, non-zero B) on its loaded unquantized base and on the
    same base with quantized experts: logits and every LoRA gradient. The tolerance comes from the experts'
    own quantization error ``e`` (relative L2 of the dequantized weights, measured; each value within its
    format's bound, tests/unit/test_quant_*.py): an expert's three products move its output by about
    sqrt(3) e, and the experts are one branch of each layer's residual stream, so the logits may move by at
    most 1.5 e and the LoRA gradients (a product of two such perturbed passes) by at most 3 e. FP8 (e4m3):
    e is about 2^-4/sqrt(3) = 3.6% at most; NF4: about 9%."""
    from qnext.config.schema import LoraConfig
    from qnext.lora import apply_lora, lora_parameters
    from qnext.megatron.model import load_torch_dist
    from qnext.megatron.parallel import construction_device
    from qnext.megatron.quant_load import load_quantized_experts, quantized_expert_modules

    cfg, mg = converted
    ids = torch.randint(0, cfg["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32)[None]
    out = {}
    originals = {}
    for b in ("bf16", base):
        model = _build(cfg, b)
        load_torch_dist(model, mg)
        if b == "bf16":
            originals = {f"{n}.{s}": getattr(m, s).weight.detach().clone() for n, m in model.named_modules()
                         if type(m).__name__ == "GroupedGemmExperts" for s in ("linear_fc1", "linear_fc2")}
        else:
            load_quantized_experts(model, mg)
            deq = {f"{n}.{s}": getattr(m, s).dequantized(torch.float32) for n, m in quantized_expert_modules(model)
                   for s in ("linear_fc1", "linear_fc2")}
            assert deq.keys() == originals.keys() and deq
            e = max(float((deq[k] - w).norm() / w.norm()) for k, w in originals.items())
        model = apply_lora(model, LoraConfig(r=4, alpha=8.0), hf_config=cfg, seed=0)
        with torch.no_grad():  # B = 0 at initialisation would give A no gradient: the same random B in both
            g = torch.Generator().manual_seed(2)
            for p_ in lora_parameters(model):
                p_.copy_(torch.randn(p_.shape, generator=g) * 0.05)
        with construction_device("cpu"):
            logits = model(ids, pos, None)
            (logits.float() * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
        out[b] = (logits.detach(), [p_.grad.clone() for p_ in lora_parameters(model)])
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    d_logits = rel(out[base][0], out["bf16"][0])
    d_grads = max(rel(a, b) for a, b in zip(out[base][1], out["bf16"][1]))
    print(f"{base} vs unquantized base with LoRA: expert weights rel L2 {e:.4f}, logits {d_logits:.4f}, "
          f"worst LoRA gradient {d_grads:.4f}")
    assert len(out[base][1]) > 10
    assert 0 < e < {"fp8": 2.0**-4 / 3**0.5, "nf4": 0.12}[base]
    assert 0 < d_logits < 1.5 * e and 0 < d_grads < 3 * e
