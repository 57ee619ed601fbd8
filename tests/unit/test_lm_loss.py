"""fla's fused cross-entropy as the language-model loss (qnext.megatron.lm_loss) against megatron's own loss,
on the CPU: the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, read when fla is
imported, hence a fresh interpreter).

1. ``fla_lm_loss`` on bf16 logits over a vocabulary wider than one kernel block (two partial log-sum-exps
   merged, as for Qwen3-Next's 151,936 tokens) equals float32 cross-entropy, and its logit gradient (bf16)
   equals the float32 gradient rounded to bf16 within one rounding, written over the logits;
2. the tiny Qwen3-Next megatron model's per-token loss and every weight gradient through ``QnextGPTModel``
   with fla's kernel equal those with megatron's loss (the kernel forced on: it applies to CUDA only).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("fla")

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys
import torch
sys.path.insert(0, sys.argv[1] + "/tests/unit")
from qnext.megatron import lm_loss

# 1. the kernel against float32 cross-entropy, vocabulary of 70,000 (> fla's 65,536 block)
gen = torch.Generator().manual_seed(0)
s, b, V = 5, 1, 70000
logits = (torch.randn(s, b, V, generator=gen) * 4).bfloat16().requires_grad_(True)
labels = torch.randint(0, V, (b, s), generator=gen)
labels[0, 1] = V - 1  # a target in the second block
w = torch.linspace(0.5, 1.5, s * b).view(b, s)
x = logits * 1  # an intermediate, as the output layer's logits are: its storage takes the gradient
kept = x.detach()  # the same storage
loss = lm_loss.fla_lm_loss(labels, x)
assert loss.shape == (b, s) and loss.dtype == torch.float32
(loss * w).sum().backward()
assert torch.equal(kept, logits.grad)  # the gradient was written over the logits (no second [tokens, vocab] tensor)
ref_x = logits.detach().float().requires_grad_(True)
ref = torch.nn.functional.cross_entropy(ref_x.reshape(s * b, V), labels.t().reshape(-1), reduction="none").view(s, b).t()
(ref * w).sum().backward()
err = float((loss - ref).abs().max())
assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5), err
g, g_ref = logits.grad.float(), ref_x.grad.bfloat16().float()
ulp = g_ref.abs().clamp_min(1e-30) * 2.0 ** -7  # one bf16 rounding
gerr = float(((g - g_ref).abs() / ulp).max())
assert logits.grad.dtype == torch.bfloat16 and gerr <= 1.0 + 1e-6, gerr
print(f"kernel: loss max abs err {err:.2e}, gradient within {gerr:.2f} bf16 roundings")

# 2. the tiny model: QnextGPTModel with fla's loss forced on == megatron's own loss
from dist_fixtures import gloo_world_of_one
from qnext.megatron.model import build_model
from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device
gloo_world_of_one()
with construction_device("cpu"):
    model = build_model(sys.argv[1] + "/models/tiny_qwen3_next/config.json", None, torch.float32, use_te=False,
                        config_overrides={**CPU_BUILD_OVERRIDES, "deterministic_mode": True})
assert type(model).__name__ == "QnextGPTModel"
with torch.no_grad():  # built without initialisation (CPU_BUILD_OVERRIDES): small random weights
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
ids = torch.randint(0, model.vocab_size, (1, 24), generator=gen)
pos = torch.arange(24).view(1, 24)
out = {}
for name, forced in (("megatron", False), ("fla", True)):
    lm_loss.fla_loss_applies = (lambda *a: True) if forced else (lambda *a: False)
    model.zero_grad(set_to_none=True)
    with construction_device("cpu"):
        per_token = model(ids, pos, None, labels=ids.roll(-1, 1))
    (per_token * torch.linspace(0.1, 1.0, 24)).sum().backward()
    out[name] = (per_token.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
(lm, gm), (lf, gf) = out["megatron"], out["fla"]
assert lm.shape == lf.shape == (1, 24)
torch.testing.assert_close(lf, lm, rtol=1e-5, atol=1e-6)
assert gm.keys() == gf.keys() and len(gm) > 10
worst = 0.0
for n in gm:  # float32 sums in another order: within 1e-4 of each tensor's largest gradient
    scale = float(gm[n].abs().max())
    assert scale > 0, n
    diff = float((gf[n] - gm[n]).abs().max()) / scale
    assert diff < 1e-4, (n, diff)
    worst = max(worst, diff)
print(f"model: per-token loss and {len(gm)} weight gradients equal megatron's loss path (worst {worst:.1e} of the largest)")
'''


def test_fla_cross_entropy_equals_megatrons_loss():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    print(res.stdout)
    assert "kernel: loss" in res.stdout and "weight gradients equal" in res.stdout


def test_fla_loss_applies_by_default_to_one_rank_cuda(monkeypatch):
    from qnext.megatron.lm_loss import fla_loss_applies

    cuda_like = type("T", (), {"is_cuda": True})()
    cpu_like = type("T", (), {"is_cuda": False})()
    monkeypatch.delenv("QNEXT_FLA_LOSS", raising=False)
    monkeypatch.setenv("QNEXT_FUSED", "0")  # independent of the compiled ops' switch
    assert fla_loss_applies(cuda_like, 1)
    assert not fla_loss_applies(cuda_like, 2)  # a vocabulary split over TP ranks: megatron's vocab-parallel loss
    assert not fla_loss_applies(cpu_like, 1)
    monkeypatch.setenv("QNEXT_FLA_LOSS", "0")
    assert not fla_loss_applies(cuda_like, 1)
