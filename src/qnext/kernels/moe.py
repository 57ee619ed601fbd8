"""Parity of the MoE expert computation: a loop over experts vs one grouped GEMM per projection.

Qwen3-Next experts are SwiGLU MLPs (hidden 2048 -> 2 x 512 -> 2048), 10 of 512 experts per token,
top-k probabilities renormalized. ``sequential`` loops over experts as Megatron's SequentialMLP does;
``grouped`` sorts the routed rows by expert and calls ``torch.nn.functional.grouped_mm`` (falling
back to ``torch._grouped_mm``) once per projection. The reference is ``sequential`` in float32.
Routed outputs are summed in float32 by both candidates, so the check isolates the expert GEMMs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .gdn import _sync, highest_precision
from .report import PERTURB_SCALE, Check, perturbed, rel_err

THRESHOLDS = {"out": 1e-2, "dx": 1.5e-2, "dprobs": 1.5e-2, "dw_gate_up": 1.5e-2, "dw_down": 1.5e-2}


@dataclass(frozen=True)
class MoECase:
    tokens: int
    experts: int = 64
    topk: int = 10
    hidden: int = 2048
    ffn: int = 512
    skew: bool = False  # routing that leaves some experts without tokens
    seed: int = 0

    @property
    def name(self) -> str:
        skew = " skewed" if self.skew else ""
        return f"N={self.tokens} E={self.experts} top{self.topk} {self.hidden}->{self.ffn}{skew}"


def make_inputs(case: MoECase, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(case.seed)
    x = torch.randn(case.tokens, case.hidden, generator=gen, device=device)
    logits = torch.randn(case.tokens, case.experts, generator=gen, device=device)
    if case.skew:  # a quarter of the experts never win
        logits[:, : case.experts // 4] -= 1e4
    top, idx = logits.topk(case.topk, dim=-1)
    probs = torch.softmax(top, dim=-1)
    w1 = torch.randn(case.experts, case.hidden, 2 * case.ffn, generator=gen, device=device) * case.hidden ** -0.5
    w2 = torch.randn(case.experts, case.ffn, case.hidden, generator=gen, device=device) * case.ffn ** -0.5
    dout = torch.randn(case.tokens, case.hidden, generator=gen, device=device)
    return dict(x=x.to(dtype), probs=probs.to(dtype), idx=idx, w1=w1.to(dtype), w2=w2.to(dtype), dout=dout.to(dtype))


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def sequential(x, probs, idx, w1, w2):
    N, topk = idx.shape
    flat = idx.reshape(-1)
    token = torch.arange(N, device=x.device).repeat_interleave(topk)
    weight = probs.reshape(-1)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    for e in range(w1.shape[0]):
        sel = (flat == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        y = _swiglu(x[token[sel]] @ w1[e]) @ w2[e]
        out = out.index_add(0, token[sel], y.to(out.dtype) * weight[sel, None].to(out.dtype))
    return out.to(x.dtype)


def _grouped_mm(a, b, offs):
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped(x, probs, idx, w1, w2):
    N, topk = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = torch.arange(N, device=x.device).repeat_interleave(topk)[order]
    offs = torch.bincount(flat, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
    y = _grouped_mm(_swiglu(_grouped_mm(x[token], w1, offs)), w2, offs)
    out = torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    out = out.index_add(0, token, y.float() * probs.reshape(-1)[order, None].float())
    return out.to(x.dtype)


IMPLS: dict[str, Callable] = {"sequential": sequential, "grouped": grouped}


def _run(fn, x: dict, dtype=None, perturb: bool = False):
    names = ("x", "probs", "w1", "w2")
    leaves = {n: x[n].detach().to(dtype or x[n].dtype).clone().requires_grad_(True) for n in names}
    out = fn(leaves["x"], leaves["probs"], x["idx"], leaves["w1"], leaves["w2"])
    if perturb:
        out = out * (1 + PERTURB_SCALE)
    out.backward(x["dout"].to(out.dtype))
    return out.detach(), {"dx": leaves["x"].grad, "dprobs": leaves["probs"].grad,
                          "dw_gate_up": leaves["w1"].grad, "dw_down": leaves["w2"].grad}


def reference(x: dict):
    dtype = torch.float64 if x["x"].device.type == "cpu" else torch.float32
    with highest_precision():
        return _run(sequential, x, dtype)


def check_case(case: MoECase, impls: tuple[str, ...], device: torch.device, dtype=torch.bfloat16) -> list[Check]:
    x = make_inputs(case, device, dtype)
    ref = reference(x)
    rows = []
    for name in impls:
        t0 = time.perf_counter()
        try:
            out, grads = _run(IMPLS[name], x, perturb=perturbed("moe"))
            _sync(device)
        except Exception as err:
            rows.append(Check("moe", case.name, name, {}, dict(THRESHOLDS),
                              error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"))
            continue
        errors = {"out": rel_err(out, ref[0]), **{k: rel_err(grads[k], ref[1][k]) for k in ref[1]}}
        rows.append(Check("moe", case.name, name, errors, dict(THRESHOLDS), seconds=time.perf_counter() - t0))
    return rows
