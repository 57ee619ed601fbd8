"""`make doctor`: can this machine train Qwen3-Next with this repository? One line per check.

Checks, in order: platform, GPUs and driver, CUDA/NCCL, package versions (pins from pyproject),
the known-bad table (each row evaluated against this machine, with its fix), the patches' state,
the fast kernel parity subset (GPU; records the result that enables the patched fla Hopper path),
an NCCL all-reduce over all visible GPUs (one process per GPU), and free memory against a
recipe's plan when one is given. Without a GPU it says so and checks the rest (the parity
machinery then runs on CPU). Exit status 1 if any line is FAIL.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import cli_main

REPO_ROOT = Path(__file__).resolve().parents[2]
TAGS = {"ok": "[ OK ]", "fail": "[FAIL]", "warn": "[WARN]", "skip": "[SKIP]", "info": "[INFO]"}


@dataclass
class Line:
    status: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{TAGS[self.status]} {self.name}: {self.detail}"


class Report:
    def __init__(self) -> None:
        self.lines: list[Line] = []

    def add(self, status: str, name: str, detail: str) -> None:
        line = Line(status, name, detail)
        self.lines.append(line)
        print(line, flush=True)

    @property
    def failed(self) -> list[Line]:
        return [ln for ln in self.lines if ln.status == "fail"]


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _in(version: str | None, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return version is not None and Version(version.split("+")[0]) in SpecifierSet(spec)


def pinned_versions() -> dict[str, str]:
    """name -> exact pin from pyproject.toml's dependencies (``name==x``)."""
    import tomllib

    try:
        deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    except (OSError, KeyError):
        return {}
    return {m.group(1).lower(): m.group(2) for d in deps if (m := re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)", d))}


# ----------------------------------------------------------------------------- known-bad table
@dataclass(frozen=True)
class KnownBad:
    """A bug that depends on GPU generation and software versions, and what this repository does about it."""

    id: str
    what: str
    archs: tuple[str, ...]  # GPU archs affected ("any": all)
    triton: str  # affected Triton versions
    fla: str  # affected fla-core versions
    fix: str
    patch: str | None = None  # patch id in patches/rules.toml that handles it
    needs_parity: bool = False  # the patch is live only after a passing parity record


BLACKWELL = ("sm100", "sm103", "sm110", "sm120", "sm121")
KNOWN_BAD = (
    KnownBad("fla#640", "Hopper: gated GDN backward gives wrong dk/dg/dbeta (Triton miscompiles tl.trans of an MMA tile); "
             "fla 0.6.0 refuses it", ("sm90",), ">=3.4.0,<3.7.1", ">=0.4",
             "make patch (fla-hopper-gated-dqkwg), then make doctor records the parity that enables it; or Triton >= 3.7.1",
             patch="fla-hopper-gated-dqkwg", needs_parity=True),
    KnownBad("fla#984", "Hopper: delta_rule prepare_wy_repr_bwd wrong dk/dbeta at chunk 64 with num_warps=4",
             ("sm90",), ">=3.4.0", "<0.6.0", "fla-core >= 0.6.0 (fla PR #988 restricts it to num_warps=2)"),
    KnownBad("triton#8695/fla#638", "Blackwell: prepare_wy_repr_bwd fails to compile ('operand #2 does not dominate this use')",
             BLACKWELL, ">=3.5.0", ">=0.4", "make patch (fla-blackwell-wy-fast, slime's identity-move workaround)",
             patch="fla-blackwell-wy-fast"),
    KnownBad("fla#607/#612", "Blackwell: GDN backward crashes compiling chunk_gated_delta_rule_bwd_kernel_dhu ('Failed to hoist tmem_store')",
             BLACKWELL, ">=3.4.0", ">=0.3", "no patch here (Triton bug triton#8459); the GDN parity check below decides on this machine"),
    KnownBad("fla#913", "Blackwell: silent NaN gradients / misaligned address in the GDN chunk kernels at large grids",
             BLACKWELL, ">=3.4.0", ">=0.4", "no patch here; fla 0.6.0 pins Blackwell-safe configs; NaN fails the parity check below"),
    KnownBad("fla-checkpoint", "fla's @checkpoint is torch's reentrant checkpoint: nested backward under an outer recompute "
             "(with hooks or device_map pipelines) has hung training", ("any",), ">=0", ">=0.1",
             "make patch (fla-checkpoint-nonreentrant)", patch="fla-checkpoint-nonreentrant"),
)


def check_known_bad(report: Report, archs: tuple[str, ...], patch_states: dict[str, str], parity_ok: bool | None) -> None:
    triton_v, fla_v = _version("triton"), _version("fla-core")
    for kb in KNOWN_BAD:
        name = f"known-bad {kb.id}"
        arch_hit = "any" in kb.archs or bool(set(kb.archs) & set(archs))
        if fla_v is None:
            report.add("ok", name, "not affected (fla not installed)")
            continue
        if not (arch_hit and _in(triton_v, kb.triton) and _in(fla_v, kb.fla)):
            why = []
            if not arch_hit:
                why.append(f"GPU {','.join(archs) or 'none'} not in {'/'.join(kb.archs)}")
            if not _in(triton_v, kb.triton):
                why.append(f"triton {triton_v} not in {kb.triton}")
            if not _in(fla_v, kb.fla):
                why.append(f"fla-core {fla_v} not in {kb.fla}")
            report.add("ok", name, "not affected here (" + "; ".join(why) + ")")
            continue
        if kb.patch is None:
            report.add("warn", name, f"{kb.what} — applies to this machine; fix: {kb.fix}")
            continue
        state = patch_states.get(kb.patch, "unknown")
        if state != "patched":
            report.add("fail", name, f"{kb.what} — patch {kb.patch} is {state}; fix: {kb.fix}")
        elif kb.needs_parity and not parity_ok:
            report.add("fail", name, f"patched, but no passing parity record for this GPU + software; fix: {kb.fix}")
        else:
            report.add("ok", name, f"handled: patch {kb.patch} applied" + (" and parity recorded on this machine" if kb.needs_parity else ""))


# ----------------------------------------------------------------------------- GPUs, versions
def check_platform(report: Report) -> None:
    report.add("info", "platform", f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, host {socket.gethostname()}")


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_gpus(report: Report) -> tuple[str, ...]:
    import torch

    if not torch.cuda.is_available():
        report.add("skip", "gpu", "no CUDA GPU visible — GPU checks skipped, checking the rest (CPU parity machinery instead)")
        return ()
    archs = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        arch = f"sm{p.major}{p.minor}"
        archs.append(arch)
        report.add("ok", f"gpu{i}", f"{p.name} ({arch}), {p.multi_processor_count} SMs, "
                                   f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    report.add("info", "driver", f"NVIDIA driver {driver_version() or 'unknown (nvidia-smi not found)'}")
    return tuple(archs)


def check_versions(report: Report, have_gpu: bool) -> None:
    import torch

    pins = pinned_versions()
    cuda = torch.version.cuda or "none (CPU build)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if have_gpu and hasattr(torch.cuda, "nccl") else "n/a"
    report.add("info", "cuda", f"torch built with CUDA {cuda}; NCCL {nccl}")
    rows = [("torch", True), ("triton", True), ("transformers", True), ("fla-core", True),
            ("flash-linear-attention", True), ("megatron-core", True), ("transformer-engine", False)]
    for pkg, required in rows:
        v = _version(pkg)
        pin = pins.get(pkg)
        if v is None:
            if required:
                report.add("fail", pkg, f"not installed; fix: make setup (pinned {pin or 'in pyproject.toml'})")
            else:
                report.add("info", pkg, "not installed (optional: the TE-free layer spec is used)")
        elif pin and v.split("+")[0] != pin:
            report.add("warn", pkg, f"{v} installed, pyproject pins {pin}")
        else:
            report.add("ok", pkg, v + (f" (pinned {pin})" if pin else ""))


def patch_states(report: Report, archs: tuple[str, ...]) -> dict[str, str]:
    from . import patches as P

    states: dict[str, str] = {}
    try:
        rules = P.load_rules()
    except Exception as err:
        report.add("fail", "patches", f"cannot read patches/rules.toml: {err}")
        return states
    machine = P.detect_machine(",".join(archs) if archs else None)
    for rule in rules:
        o = P.status_rule(rule, P.find_site(rule.package), machine)
        state = ",".join(sorted(set(o.files.values()))) or o.action
        states[rule.id] = state
        match, why = P.rule_matches(rule, machine)
        if match and state != "patched":
            report.add("fail", f"patch {rule.id}", f"{state}; rule matches this machine; fix: make patch")
        elif state in ("unknown", "missing"):
            report.add("fail", f"patch {rule.id}", f"{state}; fix: reinstall {rule.package}=={rule.version}, then make patch")
        else:
            report.add("ok", f"patch {rule.id}", f"{state} ({'rule matches' if match else why})")
    return states


# ----------------------------------------------------------------------------- parity, NCCL, memory
def check_parity(report: Report, have_gpu: bool) -> bool | None:
    """Fast parity subset; returns whether the GDN rows passed (None without a GPU)."""
    import torch

    from .kernels.record import record_gdn_parity
    from .kernels.suites import run_suite

    suite = "fast" if have_gpu else "cpu"
    t0 = time.perf_counter()
    try:
        rows = run_suite(suite, torch.device("cuda" if have_gpu else "cpu"),
                         emit=lambda r: report.add("ok" if r.passed else "fail", f"parity {r.kernel} {r.impl}", r.detail()))
    except Exception as err:
        report.add("fail", "parity", f"suite {suite} crashed: {type(err).__name__}: {err}")
        return False
    n_fail = sum(not r.passed for r in rows)
    report.add("ok" if n_fail == 0 else "fail", "parity summary",
               f"suite {suite}: {len(rows) - n_fail}/{len(rows)} passed in {time.perf_counter() - t0:.1f}s")
    if not have_gpu:
        return None
    summary = record_gdn_parity(rows)
    report.add("info", "parity record", summary)
    return all(r.passed for r in rows if r.kernel == "gdn")


def _allreduce_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        n = 64 * 2**20  # 256 MiB of float32
        x = torch.full((n,), float(rank + 1), device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        ok = bool((x == world * (world + 1) / 2).all().item())
        iters = 5
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dist.all_reduce(x)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        queue.put((rank, ok, ms, None))
        dist.destroy_process_group()
    except Exception as err:  # reported by the parent
        queue.put((rank, False, 0.0, f"{type(err).__name__}: {err}"))


def check_nccl(report: Report, have_gpu: bool, timeout_s: float = 180.0) -> None:
    if not have_gpu:
        report.add("skip", "nccl all-reduce", "no GPU")
        return
    import torch
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast (it can wedge shared hosts)
    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = [], time.time() + timeout_s
    while len(results) < world and time.time() < deadline:
        try:
            results.append(queue.get(timeout=max(0.1, deadline - time.time())))
        except Exception:
            break
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if len(results) < world:
        report.add("fail", "nccl all-reduce", f"{len(results)}/{world} ranks answered within {timeout_s:.0f}s (hang?)")
        return
    errors = [e for _, _, _, e in results if e]
    if errors or not all(ok for _, ok, _, _ in results):
        report.add("fail", "nccl all-reduce", f"{world} GPU(s): " + (errors[0] if errors else "wrong sum"))
        return
    ms = max(m for _, _, m, _ in results)
    size = 256 * 2**20
    busbw = size * 2 * (world - 1) / world / (ms / 1e3) / 1e9 if world > 1 else 0.0
    bw = f", bus bandwidth {busbw:.0f} GB/s" if world > 1 else " (1 GPU: NCCL initialised, no traffic to measure)"
    report.add("ok", "nccl all-reduce", f"{world} GPU(s), 256 MiB float32: sum correct, {ms:.2f} ms{bw}")


def check_memory_plan(report: Report, recipe: str | None, have_gpu: bool) -> None:
    """The recipe's planned peak per GPU (qnext.plan) against the free memory of this node's GPUs."""
    if not recipe:
        report.add("skip", "memory plan", "no recipe given (make doctor RECIPE=<name>)")
        return
    from .config import load_config
    from .plan import GIB, plan

    cfg = load_config([f"recipe={recipe}"])
    if cfg.parallel.backend != "megatron":
        report.add("skip", "memory plan", f"recipe {recipe} uses the {cfg.parallel.backend} backend; the planner models Megatron")
        return
    pl = plan(cfg)
    if not have_gpu:
        report.add("info", "memory plan", f"recipe {recipe}: {pl.peak / GIB:.1f} GiB per GPU planned ({pl.layout}; no GPU to compare)")
        return
    import torch

    free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    status = "ok" if pl.peak <= free else "fail"
    report.add(status, "memory plan", f"recipe {recipe}: {pl.peak / GIB:.1f} GiB per GPU planned ({pl.layout}), "
               f"{free / GIB:.1f} GiB free" + ("" if status == "ok" else f"; see `make plan RECIPE={recipe}` for layouts that fit"))


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qnext.doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=None, help="compare free GPU memory with this recipe's memory plan")
    ap.add_argument("--no-parity", action="store_true", help="skip the kernel parity subset")
    ap.add_argument("--no-nccl", action="store_true", help="skip the NCCL all-reduce")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    report = Report()
    check_platform(report)
    archs = check_gpus(report)
    have_gpu = bool(archs)
    check_versions(report, have_gpu)
    states = patch_states(report, archs)
    parity_ok = None
    if args.no_parity:
        report.add("skip", "parity", "--no-parity")
    else:
        parity_ok = check_parity(report, have_gpu)
    if parity_ok is None and have_gpu:
        from .kernels.record import recorded

        parity_ok = recorded()
    check_known_bad(report, archs, states, parity_ok)
    if args.no_nccl:
        report.add("skip", "nccl all-reduce", "--no-nccl")
    else:
        check_nccl(report, have_gpu)
    check_memory_plan(report, args.recipe, have_gpu)
    n = len(report.failed)
    print(f"doctor: {len(report.lines)} checks, {n} failed, {time.perf_counter() - t0:.0f}s"
          + ("" if n == 0 else " — see the [FAIL] lines for the fix"), flush=True)
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
