"""`python -m qnext.kernels [--suite fast|full|gdn-fast|bug640|cpu] [--record] [--json F] [--md F]`

Runs a parity suite, prints one line per check, then a summary; exit 1 if any check fails.
``--record`` writes the GDN result to the parity record that enables the patched fla Hopper path.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time

import torch

from ..errors import cli_main
from .record import record_gdn_parity
from .report import PERTURB_ENV, markdown_table, write_json
from .suites import SUITES, run_suite


def environment() -> dict:
    import importlib.metadata as md

    env = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for pkg in ("triton", "fla-core", "megatron-core", "transformer-engine"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability(0)
    return env


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qnext.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=SUITES, default=None, help="default: fast with a GPU, cpu without")
    ap.add_argument("--record", action="store_true", help="record the GDN result for the patched fla guard")
    ap.add_argument("--json", default=None, help="write all rows and the environment to this JSON file")
    ap.add_argument("--md", default=None, help="write Markdown tables to this file")
    args = ap.parse_args(argv)
    import os

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    suite = args.suite or ("fast" if device.type == "cuda" else "cpu")
    if os.environ.get(PERTURB_ENV):
        print(f"WARNING: {PERTURB_ENV}={os.environ[PERTURB_ENV]} perturbs kernels on purpose (tests only)", flush=True)
    t0 = time.perf_counter()
    rows = run_suite(suite, device, emit=lambda r: print(r.line(), flush=True))
    failed = [r for r in rows if not r.passed]
    print(f"parity suite {suite}: {len(rows) - len(failed)}/{len(rows)} passed in {time.perf_counter() - t0:.1f}s on "
          f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}")
    if args.record and suite != "bug640":
        if device.type != "cuda":
            print("parity record: not written (no GPU)")
        else:
            print("parity record: " + record_gdn_parity(rows))
    env = environment()
    if args.json:
        write_json(args.json, rows, suite=suite, environment=env)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"# Kernel parity, suite `{suite}`\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n")
            f.write(markdown_table(rows))
    if suite == "bug640":
        return 0  # informational: fla's original code is expected to fail where the bug is present
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
