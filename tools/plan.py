#!/usr/bin/env python
"""Memory plan of a Megatron recipe per GPU, before launch (qnext.plan), and layouts that fit.

  python tools/plan.py recipe=qwen3_next_80b_lora --gpus 8 --gpu-mem 80
  python tools/plan.py recipe=qwen3_next_80b_full train.optimizer_cpu_offload=true --gpus 32 --gpu-mem 80
Exit 0 when the recipe's layout fits GPU_MEM GiB per GPU, 1 when it does not (then layouts that fit
are listed), 2 on a bad recipe.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qnext.errors import UserError, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="recipe=NAME and key=value overrides, as for the launchers")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the recipe's nodes x GPUs per node)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options

    from qnext.config import load_config, validate_config
    from qnext.plan import GIB, plan, resolve_recompute

    cfg = load_config(args.overrides)
    if cfg.parallel.backend != "megatron":
        raise UserError(f"parallel.backend={cfg.parallel.backend}: the planner models the Megatron backend",
                        hint="pick a Megatron recipe or layout (parallel=8xh100, parallel=4x8, parallel=1gpu)")
    gpus = args.gpus or cfg.parallel.num_nodes * cfg.parallel.num_gpus_per_node
    limit = args.gpu_mem * GIB
    try:
        validate_config(cfg, world_size=gpus, check_files=False)
    except UserError as err:
        plain = replace(cfg, parallel=replace(cfg.parallel, tp=1, pp=1, ep=1, etp=1, cp=1, num_nodes=1,
                                                 num_gpus_per_node=gpus))
        try:
            validate_config(plain, world_size=gpus, check_files=False)
        except UserError:
            raise err from None  # not (only) the layout: the recipe itself is wrong
        p = cfg.parallel
        print(f"the recipe's layout (tp {p.tp} pp {p.pp} ep {p.ep} etp {p.etp} cp {p.cp}) does not fit {gpus} GPUs: "
              f"{err.message.splitlines()[-1].strip(' -')}")
        return _propose(plain, gpus, limit, args.gpu_mem)
    cfg, why = resolve_recompute(cfg, gpus, limit)
    if why != "set by the recipe":
        print(why)
    p = plan(cfg, world_size=gpus)
    print(p.table())
    limit = args.gpu_mem * GIB
    if p.peak <= limit:
        print(f"fits: {p.peak / GIB:.1f} GiB planned of {args.gpu_mem:g} GiB per GPU")
        return 0
    print(f"does NOT fit: {p.peak / GIB:.1f} GiB planned of {args.gpu_mem:g} GiB per GPU")
    return _propose(cfg, gpus, limit, args.gpu_mem)


def _propose(cfg, gpus: int, limit: float, gpu_mem: float) -> int:
    """Print the layouts of ``gpus`` GPUs whose plan fits ``limit`` bytes per GPU; exit status 1."""
    from qnext.plan import GIB, propose_layouts, resolve_recompute

    cfg, _ = resolve_recompute(cfg, gpus, limit)
    options = propose_layouts(cfg, gpus, limit)
    if options:
        print(f"layouts that fit {gpus} GPUs of {gpu_mem:g} GiB (parallel.* overrides):")
        for layout, pl in options:
            print("  " + " ".join(f"parallel.{k}={v}" for k, v in layout.items()) + f"   -> {pl.peak / GIB:.1f} GiB")
    else:
        print("no layout of tp/pp/ep fits: use more GPUs, parallel.recompute=full, a smaller micro-batch or "
              "sequence, or train.optimizer_cpu_offload=true")
    return 1


if __name__ == "__main__":
    sys.exit(main())
