"""What ``scripts/run-8gpu.sh`` and ``scripts/run-multinode.sh`` do, in Python where it is tested.

``python -m qnext.launch single|multi [recipe overrides...]``:

1. reads the launch environment: ``NPROC`` (processes on this node, default 8); for ``multi`` also
   ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (required, each named when missing)
   and ``RDZV_ID`` (default ``qnext``); ``TORCHRUN_ARGS`` adds torchrun flags; ``OMP_NUM_THREADS``
   defaults to the node's cores divided by NPROC;
2. checks the recipe against the world size (``NNODES x NPROC``) before anything starts;
3. runs the doctor's fast kernel check on this node (``python -m qnext.doctor`` with
   ``QNEXT_DOCTOR_ARGS``, default ``--no-nccl``: the training run is the NCCL check) unless
   ``QNEXT_SKIP_DOCTOR=1``;
4. replaces itself with ``torchrun ... -m qnext.megatron.train <overrides>``: a single node
   uses torchrun's standalone rendezvous, several nodes the c10d rendezvous at MASTER_ADDR:MASTER_PORT.

``QNEXT_DRY_RUN=1`` prints the environment the scripts set, the doctor and torchrun commands, and
runs nothing (the recipe check still runs, so a dry run catches a bad layout).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from .errors import UserError, cli_main

TRAIN_MODULE = "qnext.megatron.train"
DEFAULT_NPROC = 8
# what the shell launchers export (shown by a dry run)
LAUNCH_ENV = ("NCCL_NVLS_ENABLE", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS",
              "TOKENIZERS_PARALLELISM")
MULTI_NODE_VARS = {
    "NNODES": "the number of nodes",
    "NODE_RANK": "this node's index, 0 .. NNODES-1",
    "MASTER_ADDR": "the host name or address of node 0",
    "MASTER_PORT": "a free TCP port on node 0, e.g. 29500",
}


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _positive_int(env: Mapping[str, str], name: str, default: Optional[int] = None, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        if default is None:
            raise UserError(f"{name} is not set ({MULTI_NODE_VARS.get(name, 'a number')})")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise UserError(f"{name}={value} must be >= {minimum}")
    return value


def multi_node_settings(env: Mapping[str, str]) -> dict[str, object]:
    """NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ID; every missing one named at once."""
    missing = [f"{k} ({what})" for k, what in MULTI_NODE_VARS.items() if not env.get(k, "").strip()]
    if missing:
        raise UserError("multi-node launch needs " + ", ".join(missing),
                        hint="export them on every node (scripts/slurm/qwen3_next_80b.sbatch does it from SLURM)")
    nnodes = _positive_int(env, "NNODES")
    node_rank = _positive_int(env, "NODE_RANK", minimum=0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    port = _positive_int(env, "MASTER_PORT")
    if port > 65535:
        raise UserError(f"MASTER_PORT={port} is not a TCP port")
    return {"nnodes": nnodes, "node_rank": node_rank, "master_addr": env["MASTER_ADDR"].strip(), "master_port": port,
            "rdzv_id": env.get("RDZV_ID", "").strip() or "qnext"}


def torchrun_command(mode: str, env: Mapping[str, str], overrides: Sequence[str], python: str) -> list[str]:
    """The exact torchrun command (``python -m torch.distributed.run`` is torchrun)."""
    nproc = _positive_int(env, "NPROC", DEFAULT_NPROC)
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if mode == "single":
        cmd.append("--standalone")
    elif mode == "multi":
        s = multi_node_settings(env)
        cmd += ["--nnodes", str(s["nnodes"]), "--node-rank", str(s["node_rank"]), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{s['master_addr']}:{s['master_port']}", "--rdzv-id", str(s["rdzv_id"]),
                "--max-restarts", "0"]
    else:
        raise ValueError(f"mode {mode!r}: single | multi")
    cmd += shlex.split(env.get("TORCHRUN_ARGS", ""))
    return cmd + ["-m", TRAIN_MODULE, *overrides]


def world_size(mode: str, env: Mapping[str, str]) -> int:
    nproc = _positive_int(env, "NPROC", DEFAULT_NPROC)
    return nproc * (int(multi_node_settings(env)["nnodes"]) if mode == "multi" else 1)


def doctor_command(env: Mapping[str, str], python: str) -> Optional[list[str]]:
    if _flag(env, "QNEXT_SKIP_DOCTOR"):
        return None
    return [python, "-m", "qnext.doctor", *shlex.split(env.get("QNEXT_DOCTOR_ARGS", "--no-nccl"))]


def check_recipe(overrides: Sequence[str], world: int) -> None:
    """The recipe must compose, validate at this world size and select the Megatron backend."""
    from .config import load_config, validate_config

    cfg = load_config(list(overrides))
    if cfg.parallel.backend != "megatron":
        raise UserError(f"parallel.backend={cfg.parallel.backend}: these launchers start the Megatron backend",
                        hint="pick parallel=8xh100 / parallel=4x8 / parallel=1gpu, or use scripts/run-fsdp.sh")
    validate_config(cfg, world_size=world)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("single", "multi"):
        print(__doc__)
        print("usage: python -m qnext.launch single|multi [recipe=NAME] [key=value ...]", file=sys.stderr)
        return 2
    mode, overrides = args[0], args[1:]
    env = dict(os.environ)
    python = sys.executable
    cmd = torchrun_command(mode, env, overrides, python)
    # the node's cores shared out among its processes (torchrun would set 1)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _positive_int(env, "NPROC", DEFAULT_NPROC))))
    world = world_size(mode, env)
    check_recipe(overrides, world)
    doctor = doctor_command(env, python)
    if _flag(env, "QNEXT_DRY_RUN"):
        for name in LAUNCH_ENV:
            if name in env:
                print(f"export {name}={shlex.quote(env[name])}")
        print("doctor: " + (shlex.join(doctor) if doctor else "skipped (QNEXT_SKIP_DOCTOR=1)"))
        print(f"world size: {world}")
        print("torchrun: " + shlex.join(cmd))
        return 0
    if doctor is not None:
        print("+ " + shlex.join(doctor), flush=True)
        rc = subprocess.run(doctor, env=env).returncode
        if rc != 0:
            raise UserError(f"the doctor found a problem on this node (exit {rc}); see its [FAIL] lines",
                            hint="fix it, or set QNEXT_SKIP_DOCTOR=1 to launch anyway")
    print("+ " + shlex.join(cmd), flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
