"""Named sets of parity cases: what ``make doctor``, the benchmarks and the tests run.

- ``gdn-fast``: the GDN cases whose pass lifts the fla Hopper guard (a few seconds once compiled).
- ``fast``: gdn-fast plus one attention and one MoE case; the doctor's subset (< 60 s on an H100).
- ``full``: every GDN shape T 512..8192 x every input distribution, packed sequences, the repeated
  key-head layout the callers use (q/k repeated to 32 heads), chunk size 32, an autotune-config sweep
  of every fla kernel on two cases; attention and MoE at several sizes.
- ``bug640``: fla's original dS^T code (patch switched off in place) next to the patched one, with
  the config sweep: shows on this machine what the patch changes. Informational.
- ``cpu``: small shapes with the PyTorch candidates; exercises the machinery without a GPU.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from . import attention, gdn, moe
from .gdn import GDNCase, packed_lengths
from .report import Check

GDN_DISTS = tuple(gdn.DISTRIBUTIONS)
Emit = Callable[[Check], None]


def gdn_fast_cases() -> list[GDNCase]:
    return [
        GDNCase(2048, "qwen3next"),
        GDNCase(4096, "fla640", cu_seqlens=packed_lengths(4096, 4, seed=1)),
        GDNCase(1024, "outliers"),
    ]


def gdn_full_cases() -> list[GDNCase]:
    cases = [GDNCase(T, d) for T in (512, 1024, 2048, 4096, 8192) for d in GDN_DISTS]
    cases += [GDNCase(8192, d, cu_seqlens=packed_lengths(8192, 6, seed=2)) for d in GDN_DISTS]
    cases += [GDNCase(4096, d, H=32, HV=32) for d in ("qwen3next", "fla640")]  # q/k repeated by the caller
    cases += [GDNCase(2048, "qwen3next", chunk_size=32), GDNCase(2048, "fla640_strong", chunk_size=32)]
    return cases


SWEEP_CASES = (GDNCase(2048, "fla640"), GDNCase(2048, "qwen3next", cu_seqlens=packed_lengths(2048, 4, seed=3)))


def _gdn(cases: list[GDNCase], device, emit: Emit, impl: str = "fla") -> list[Check]:
    rows = []
    with gdn.fla_checking() if impl == "fla" else _nullcontext():
        for case in cases:
            row, _ = gdn.check_case(case, impl, device)
            emit(row)
            rows.append(row)
    return rows


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _emit_all(rows: list[Check], emit: Emit) -> list[Check]:
    for r in rows:
        emit(r)
    return rows


def run_suite(name: str, device: torch.device, emit: Emit = lambda r: None) -> list[Check]:
    rows: list[Check] = []
    if name == "cpu":
        small = dict(H=2, HV=4, K=32, V=16)
        cases = [GDNCase(160, d, **small) for d in GDN_DISTS]
        cases.append(GDNCase(160, "qwen3next", cu_seqlens=packed_lengths(160, 3), **small))
        rows += _gdn(cases, device, emit, impl="torch")
        rows += _emit_all(attention.check_case(attention.AttnCase(64, 4, 2, 32), ("eager", "sdpa"), device), emit)
        rows += _emit_all(attention.check_case(attention.AttnCase(64, 4, 2, 32, cu_seqlens=(0, 23, 64)), ("eager", "sdpa"), device), emit)
        rows += _emit_all(moe.check_case(moe.MoECase(64, 8, 2, 32, 16, skew=True), ("sequential", "grouped"), device), emit)
        return rows
    if device.type != "cuda":
        raise UserError(f"suite {name!r} runs fla's Triton kernels and needs a CUDA GPU", hint="use --suite cpu on this machine")
    if name in ("gdn-fast", "fast"):
        rows += _gdn(gdn_fast_cases(), device, emit)
    if name == "fast":
        rows += _emit_all(attention.check_case(attention.AttnCase(2048), ("eager", "sdpa", "flex"), device), emit)
        rows += _emit_all(moe.check_case(moe.MoECase(2048, 64), ("sequential", "grouped"), device), emit)
    if name == "full":
        rows += _gdn(gdn_full_cases(), device, emit)
        for case in (attention.AttnCase(1024), attention.AttnCase(4096),
                     attention.AttnCase(4096, cu_seqlens=packed_lengths(4096, 3, seed=4))):
            rows += _emit_all(attention.check_case(case, ("eager", "sdpa", "flex"), device), emit)
        for case in (moe.MoECase(4096, 64), moe.MoECase(4096, 64, skew=True), moe.MoECase(2048, 512)):
            rows += _emit_all(moe.check_case(case, ("sequential", "grouped"), device), emit)
        for case in SWEEP_CASES:  # last: compiles every autotune config of every fla kernel
            rows += _emit_all(gdn.sweep_configs(case, device), emit)
    if name == "bug640":
        for case in (GDNCase(2048, "fla640"), GDNCase(2048, "fla640_strong"), GDNCase(2048, "qwen3next"),
                     GDNCase(1024, "fla640", K=100, V=100, H=4, HV=4)):
            for ds_t_dot, label in ((False, "fla-orig"), (True, "fla-patched")):
                swept = gdn.sweep_configs(case, device, ds_t_dot=ds_t_dot, kernels=("chunk_bwd_kernel_dqkwg",))
                for r in swept:
                    r.impl = label
                rows += _emit_all(swept, emit)
    if not rows:
        raise UserError(f"unknown suite {name!r}", hint=f"choose from {SUITES}")
    return rows


SUITES = ("gdn-fast", "fast", "full", "bug640", "cpu")
