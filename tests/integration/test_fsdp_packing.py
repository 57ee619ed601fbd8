"""Packed FSDP batches keep chats apart (CPU, float32, transformers' torch GDN path).

- the varlen short convolution equals ``F.conv1d`` run on each segment alone;
- two packed rows (chats of 20+12 and 9+15+7 tokens, one padding tail) give each chat the logits,
  the loss and the gradients it gets alone (1e-5), and ``CausalLMLoss`` equals a cross-entropy
  written out here, over the labelled next tokens;
- without ``qnext.models.hf_packed`` (transformers as shipped) the same comparison fails: the
  GDN state and the convolution window cross the boundary;
- through the trainer's command line, one step over the same chats gives the same loss and
  gradient norm with ``data.pack=true`` as with ``data.pack=false``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests/integration"))

import packing_check  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-5
VOCAB = 512


def test_varlen_conv_equals_conv1d_per_segment():
    from qnext.models.hf_packed import conv1d_varlen_reference

    g = torch.Generator().manual_seed(0)
    b, d, length, k = 2, 6, 11, 4
    x = torch.randn(b, d, length, generator=g)
    w = torch.randn(d, k, generator=g)
    bias = torch.randn(d, generator=g)
    cu = torch.tensor([0, 3, 8, 11, 13, 22], dtype=torch.int32)  # row 0: 3+5+3; row 1: 2+9
    out = conv1d_varlen_reference(x, w, bias, "silu", cu)
    flat = x.permute(1, 0, 2).reshape(d, -1)
    want = torch.empty_like(flat)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = F.conv1d(flat[None, :, s:e], w[:, None, :], bias, padding=k - 1, groups=d)[..., : e - s]
        want[:, s:e] = F.silu(seg[0])
    want = want.reshape(d, b, length).permute(1, 0, 2)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from qnext.fsdp.model import CausalLMLoss
    from qnext.models.hf import load_hf_model
    from qnext.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("packing") / "hf", seed=0, overrides={"vocab_size": VOCAB},
                                 with_tokenizer=False, perturb=True)
    torch.manual_seed(0)
    model = load_hf_model(ckpt, torch.float32, "cpu")
    model.config.use_cache = False
    return CausalLMLoss(model).train()


def test_packed_rows_equal_each_chat_alone(root):
    res = packing_check.compare(root, torch.device("cpu"), VOCAB)
    print("packed vs alone:", res)
    assert res["token_count_diff"] == 0, res
    for key in ("logits", "chat_loss", "hand_vs_module", "loss_sum_rel"):
        assert res[key] < TOL, (key, res)
    assert res["grad_rel"] < 1e-4, res  # worst tensor; A_log/dt_bias gradients are sums that cancel


def test_without_the_patch_chats_leak(root):
    from qnext.models import hf_packed

    with hf_packed.without_packing_support():
        res = packing_check.compare(root, torch.device("cpu"), VOCAB)
    assert hf_packed.installed()
    print("transformers as shipped, packed vs alone:", res)
    assert res["logits"] > 1e-2 and res["grad_rel"] > 1e-2, res


def test_trainer_step_packed_equals_unpacked(tmp_path):
    """One optimizer step over every chat of a small file: pack=true and pack=false agree."""
    from test_fsdp_backend import COMMON, run_train

    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer
    from qnext.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "hf", seed=0, perturb=True)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join((REPO / "data/sample/chats.jsonl").read_text().splitlines()[:12]) + "\n")
    tok = load_tokenizer(ckpt)
    n_chats = len(build_datasets(chats, tok, 64, pack=False, valid_fraction=0.0)[0])
    n_packs = len(build_datasets(chats, tok, 64, pack=True, valid_fraction=0.0)[0])
    assert n_packs < n_chats  # several chats share a row
    recs = {}
    for pack, gbs in (("false", n_chats), ("true", n_packs)):
        out = tmp_path / f"pack_{pack}"
        common = [a for a in COMMON if not a.startswith(("train.global_batch_size=", "train.micro_batch_size="))]
        run_train([*common, f"model.checkpoint={ckpt}", f"data.path={chats}", f"output_dir={out}",
                   "data.valid_fraction=0", "train.eval_every=0", f"data.pack={pack}", "train.micro_batch_size=1",
                   f"train.global_batch_size={gbs}", "train.steps=2", "train.save_final=false"])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        recs[pack] = {r["step"]: r for r in rows if "loss" in r}
        assert sorted(recs[pack]) == [1, 2], rows
    a, b = recs["false"], recs["true"]
    print("pack=false:", {s: (a[s]["loss"], a[s]["grad_norm"]) for s in a})
    print("pack=true: ", {s: (b[s]["loss"], b[s]["grad_norm"]) for s in b})
    for s in (1, 2):
        assert a[s]["loss_tokens"] == b[s]["loss_tokens"]
        assert abs(a[s]["loss"] - b[s]["loss"]) < TOL * abs(a[s]["loss"]), (s, a[s], b[s])
        assert abs(a[s]["grad_norm"] - b[s]["grad_norm"]) < 1e-4 * a[s]["grad_norm"], (s, a[s], b[s])
