"""Parity of Gated DeltaNet chunked forward and backward against the float32 reference.

A case is a shape (Qwen3-Next: 16 key heads, 32 value heads, head dim 128), a sequence layout
(one sequence or several packed with cu_seqlens), fla's chunk size, and an input distribution.
Candidates: ``fla`` (fla's Triton ``chunk_gated_delta_rule``, bf16 inputs, GPU) and ``torch`` (this
package's chunked PyTorch form, any device). The reference runs ``gdn_chunked`` in float32 (float64
on CPU) on the very values the candidate saw, and autograd gives its gradients for the same ``do``.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .gdn_reference import gdn_chunked
from .report import PERTURB_SCALE, Check, perturbed, rel_err

# bf16 inputs, fp32 accumulation. Measured on H100/H200 (benchmarks/results/kernel-parity-*.md):
# at most ~8e-3 on any quantity; fla #640's wrong dg was 4e-2 and #984's wrong dk 0.5.
THRESHOLDS = {"o": 1e-2, "dq": 1.5e-2, "dk": 1.5e-2, "dv": 1.5e-2, "dbeta": 2e-2, "dg": 2e-2}
QUANTITIES = ("o", "dq", "dk", "dv", "dbeta", "dg")


@dataclass(frozen=True)
class GDNCase:
    T: int
    dist: str = "qwen3next"
    H: int = 16
    HV: int = 32
    K: int = 128
    V: int = 128
    cu_seqlens: tuple[int, ...] | None = None
    chunk_size: int = 64
    seed: int = 0

    @property
    def name(self) -> str:
        packed = f" packed{len(self.cu_seqlens) - 1}" if self.cu_seqlens else ""
        chunk = f" chunk{self.chunk_size}" if self.chunk_size != 64 else ""
        dims = f" K{self.K}/V{self.V}" if (self.K, self.V) != (128, 128) else ""
        return f"T={self.T} H{self.H}/HV{self.HV}{dims}{packed}{chunk} {self.dist}"


def packed_lengths(T: int, n: int, seed: int = 0) -> tuple[int, ...]:
    """cu_seqlens of n sequences filling T tokens, lengths uneven and not multiples of 64."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(T - 1, generator=g)[: n - 1].add(1).tolist())
    return (0, *cuts, T)


# ----------------------------------------------------------------------------- input distributions
def _qwen3next(shape_qk, shape_v, shape_g, gen, dev):
    """Qwen3-Next layer at init: beta = sigmoid(b), g = -A softplus(a + dt_bias), A ~ U(0, 16), dt_bias = 1."""
    q = torch.randn(shape_qk, generator=gen, device=dev)
    k = torch.randn(shape_qk, generator=gen, device=dev)
    v = torch.randn(shape_v, generator=gen, device=dev)
    beta = torch.randn(shape_g, generator=gen, device=dev).sigmoid()
    A = torch.rand(shape_g[-1], generator=gen, device=dev) * 16
    g = -A * F.softplus(torch.randn(shape_g, generator=gen, device=dev) + 1.0)
    return q, k, v, g, beta, True


def _fla640(shape_qk, shape_v, shape_g, gen, dev, normalizer: float = 1.0):
    """fla's test_chunk inputs from the #640 report: uniform q/k/v, q/k L2-normalized before the call,
    beta = sigmoid(U), g = logsigmoid(U) / gate_logit_normalizer with half the gates zeroed (mask_p 0.5)."""
    q = F.normalize(torch.rand(shape_qk, generator=gen, device=dev), p=2, dim=-1)
    k = F.normalize(torch.rand(shape_qk, generator=gen, device=dev), p=2, dim=-1)
    v = torch.rand(shape_v, generator=gen, device=dev)
    beta = torch.rand(shape_g, generator=gen, device=dev).sigmoid()
    g = F.logsigmoid(torch.rand(shape_g, generator=gen, device=dev)) / normalizer
    g = g * (torch.rand(shape_g, generator=gen, device=dev) > 0.5)
    return q, k, v, g, beta, False


def _weak_decay(shape_qk, shape_v, shape_g, gen, dev):
    """Near-linear-attention memory: g ~ -3e-4 per token, strong writes (beta ~ 0.9)."""
    q = torch.randn(shape_qk, generator=gen, device=dev)
    k = torch.randn(shape_qk, generator=gen, device=dev)
    v = torch.randn(shape_v, generator=gen, device=dev)
    beta = (torch.randn(shape_g, generator=gen, device=dev) + 2).sigmoid()
    g = F.logsigmoid(torch.randn(shape_g, generator=gen, device=dev) + 8)
    return q, k, v, g, beta, True


def _outliers(shape_qk, shape_v, shape_g, gen, dev):
    """Heavy-tailed values (Student t, 2.5 degrees of freedom) and query spikes."""
    q = torch.randn(shape_qk, generator=gen, device=dev)
    q = q * (1 + 20 * (torch.rand(shape_qk[:-1] + (1,), generator=gen, device=dev) > 0.99))
    k = torch.randn(shape_qk, generator=gen, device=dev)
    z = torch.randn(shape_v, generator=gen, device=dev)
    chi = torch.distributions.Chi2(torch.tensor(2.5, device=dev)).sample(shape_v)  # Chi2 has no generator arg
    v = z / (chi / 2.5).sqrt()
    beta = torch.randn(shape_g, generator=gen, device=dev).sigmoid()
    g = F.logsigmoid(torch.randn(shape_g, generator=gen, device=dev))
    return q, k, v, g, beta, True


DISTRIBUTIONS: dict[str, Callable] = {
    "qwen3next": _qwen3next,
    "fla640": _fla640,
    "fla640_strong": lambda *a: _fla640(*a, normalizer=0.1),
    "weak_decay": _weak_decay,
    "outliers": _outliers,
}


def make_inputs(case: GDNCase, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs as the candidate sees them: q, k, v, beta in ``dtype``; g in float32; do in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(case.seed)
    torch.manual_seed(case.seed)  # for samplers without a generator argument
    shape_qk, shape_v, shape_g = (1, case.T, case.H, case.K), (1, case.T, case.HV, case.V), (1, case.T, case.HV)
    q, k, v, g, beta, l2 = DISTRIBUTIONS[case.dist](shape_qk, shape_v, shape_g, gen, device)
    do = torch.randn(shape_v, generator=gen, device=device)
    cu = torch.tensor(case.cu_seqlens, dtype=torch.long, device=device) if case.cu_seqlens else None
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), beta=beta.to(dtype), g=g.float(), do=do.to(dtype),
                cu_seqlens=cu, l2norm=l2)


# ----------------------------------------------------------------------------- candidates + reference
Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _leaves(x: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {n: x[n].detach().to(dtype or x[n].dtype).clone().requires_grad_(True) for n in ("q", "k", "v", "g", "beta")}


def _grads(leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"dq": leaves["q"].grad, "dk": leaves["k"].grad, "dv": leaves["v"].grad,
            "dbeta": leaves["beta"].grad, "dg": leaves["g"].grad}


def run_fla(x: dict, case: GDNCase) -> Result:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    t = _leaves(x)
    o, _ = chunk_gated_delta_rule(t["q"], t["k"], t["v"], t["g"], t["beta"], use_qk_l2norm_in_kernel=x["l2norm"],
                                  cu_seqlens=x["cu_seqlens"], chunk_size=case.chunk_size)
    if perturbed("gdn"):
        o = o * (1 + PERTURB_SCALE)
    o.backward(x["do"])
    return o.detach(), _grads(t)


def run_torch(x: dict, case: GDNCase, dtype: torch.dtype | None = None) -> Result:
    """This package's chunked PyTorch GDN as the candidate (CPU tests, benchmark baseline)."""
    t = _leaves(x, dtype)
    o = gdn_chunked(t["q"], t["k"], t["v"], t["g"], t["beta"], use_qk_l2norm=x["l2norm"],
                    cu_seqlens=x["cu_seqlens"], chunk=case.chunk_size)
    if perturbed("gdn"):
        o = o * (1 + PERTURB_SCALE)
    o.backward(x["do"].to(o.dtype))
    return o.detach(), _grads(t)


@contextlib.contextmanager
def highest_precision() -> Iterator[None]:
    """No TF32 anywhere while a reference runs."""
    prev = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[1], prev[2]


def reference(x: dict, case: GDNCase) -> Result:
    dtype = torch.float64 if x["q"].device.type == "cpu" else torch.float32
    with highest_precision():
        t = _leaves(x, dtype)
        o = gdn_chunked(t["q"], t["k"], t["v"], t["g"], t["beta"], use_qk_l2norm=x["l2norm"],
                        cu_seqlens=x["cu_seqlens"], chunk=case.chunk_size)
        o.backward(x["do"].to(dtype))
    return o.detach(), _grads(t)


CANDIDATES: dict[str, Callable[[dict, GDNCase], Result]] = {"fla": run_fla, "torch": run_torch}


def compare(kernel: str, case: str, impl: str, cand: Result, ref: Result, thresholds: dict, seconds: float) -> Check:
    errors = {"o": rel_err(cand[0], ref[0])}
    errors.update({k: rel_err(cand[1].get(k), ref[1][k]) for k in ref[1]})
    return Check(kernel, case, impl, errors, dict(thresholds), seconds=seconds)


def check_case(case: GDNCase, impl: str, device: torch.device, ref: Result | None = None,
               thresholds: dict | None = None, note: str = "") -> tuple[Check, Result | None]:
    """Run one candidate on one case; returns the row and the reference (for reuse)."""
    dtype = torch.bfloat16 if impl == "fla" else torch.float32
    x = make_inputs(case, device, dtype)
    t0 = time.perf_counter()
    try:
        cand = CANDIDATES[impl](x, case)
    except Exception as err:  # a crash or a refusal is a failed check, with its message
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return Check("gdn", case.name, impl, {}, dict(thresholds or THRESHOLDS), error=msg, note=note), ref
    _sync(device)
    seconds = time.perf_counter() - t0
    if ref is None:
        ref = reference(x, case)
    row = compare("gdn", case.name, impl, cand, ref, thresholds or THRESHOLDS, seconds)
    row.note = note
    return row, ref


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- fla specifics
@contextlib.contextmanager
def fla_checking(ds_t_dot: bool | None = None) -> Iterator[None]:
    """Let the patched fla run its guarded Hopper path while the parity check decides about it.

    ``ds_t_dot=False`` selects fla's original (unpatched) dS^T code in the patched file, to show the
    bug the patch avoids; ``None`` keeps the patch's default.
    """
    saved = {k: os.environ.get(k) for k in ("QNEXT_FLA_PARITY_CHECK_RUNNING", "QNEXT_FLA_DS_T_DOT")}
    os.environ["QNEXT_FLA_PARITY_CHECK_RUNNING"] = "1"
    if ds_t_dot is not None:
        os.environ["QNEXT_FLA_DS_T_DOT"] = "1" if ds_t_dot else "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fla_autotuners() -> dict[str, object]:
    """Triton autotuners of the fla modules on the GDN chunk path, by kernel name."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    found: dict[str, object] = {}
    for mod_name in ("fla.ops.common.chunk_o", "fla.ops.common.chunk_delta_h", "fla.ops.common.chunk_scaled_dot_kkt",
                     "fla.ops.gated_delta_rule.wy_fast", "fla.ops.gated_delta_rule.chunk_fwd", "fla.ops.gated_delta_rule.gate",
                     "fla.ops.utils.cumsum", "fla.ops.utils.solve_tril", "fla.modules.norm.l2norm"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in vars(mod).items():
            inner, depth = obj, 0
            while inner is not None and not isinstance(inner, Autotuner) and depth < 4:
                inner, depth = getattr(inner, "fn", None), depth + 1
            if isinstance(inner, Autotuner) and len(inner.configs) > 1:
                found[name] = inner
    return found


@contextlib.contextmanager
def forced_config(autotuner, config) -> Iterator[None]:
    saved_configs, saved_cache = autotuner.configs, dict(autotuner.cache)
    autotuner.configs = [config]
    autotuner.cache.clear()
    try:
        yield
    finally:
        autotuner.configs = saved_configs
        autotuner.cache.clear()
        autotuner.cache.update(saved_cache)


def config_label(config) -> str:
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"w{config.num_warps}s{config.num_stages}" + (f",{kw}" if kw else "")


def sweep_configs(case: GDNCase, device: torch.device, ds_t_dot: bool | None = None,
                  kernels: tuple[str, ...] | None = None) -> list[Check]:
    """Every autotune config of every autotuned kernel the case runs, one kernel at a time.

    The autotuner picks a config by speed, so a wrong config may be chosen on some runs only; this
    checks each one. Kernels that ran (non-empty autotune cache) are swept; others keep their pick.
    """
    with fla_checking(ds_t_dot):
        first, ref = check_case(case, "fla", device)
        rows = []
        tuners = fla_autotuners()
        used = {n: t for n, t in tuners.items() if t.cache and (kernels is None or n in kernels)}
        for name, tuner in sorted(used.items()):
            for cfg in list(tuner.configs):
                with forced_config(tuner, cfg):
                    row, _ = check_case(case, "fla", device, ref=ref, note=f"{name} {config_label(cfg)}")
                if row.error is not None and row.error.startswith("OutOfResources"):
                    row.skipped = "config does not fit this GPU (the autotuner discards it)"
                rows.append(row)
    return [first, *rows]


def summarize_sweep(rows: list[Check]) -> str:
    bad = [r for r in rows if not r.passed]
    worst = max((r.worst()[1] for r in rows if r.errors), default=math.nan)
    return f"{len(rows)} runs, {len(bad)} failing, worst relative error {worst:.2e}"
