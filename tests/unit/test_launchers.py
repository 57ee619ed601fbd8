"""The real launcher scripts in dry-run mode (QNEXT_DRY_RUN=1): the exact torchrun command, the
environment they set, the doctor step, and the errors for missing or wrong launch variables. The
SLURM example runs with stand-ins for SLURM's own commands (srun runs its command on this machine,
scontrol lists two host names); everything of ours in it runs for real."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
LAUNCH_VARS = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "TORCHRUN_ARGS",
               "QNEXT_SKIP_DOCTOR", "QNEXT_DOCTOR_ARGS", "NCCL_NVLS_ENABLE", "PYTORCH_CUDA_ALLOC_CONF",
               "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS")
TINY = ["model=tiny_qwen3_next", "parallel=1gpu", "data=sample"]


def run(script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full.update(QNEXT_DRY_RUN="1", PY=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=full, capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def torchrun_of(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("torchrun: "))
    return shlex.split(line.removeprefix("torchrun: "))


def exported(proc: subprocess.CompletedProcess) -> dict[str, str]:
    out = {}
    for ln in proc.stdout.splitlines():
        if ln.startswith("export "):
            k, v = ln.removeprefix("export ").split("=", 1)
            out[k] = shlex.split(v)[0] if v else ""
    return out


def test_8gpu_defaults(tmp_path):
    # started from another directory: relative paths stay the user's, the script finds its repository
    proc = run("run-8gpu.sh", "recipe=qwen3_next_80b_lora", "data.path=chats.jsonl", cwd=tmp_path)
    assert proc.returncode != 0 and "data.path: file chats.jsonl not found" in proc.stderr
    (tmp_path / "chats.jsonl").write_text((REPO / "data/sample/chats.jsonl").read_text())
    proc = run("run-8gpu.sh", "recipe=qwen3_next_80b_lora", "data.path=chats.jsonl", cwd=tmp_path)
    assert torchrun_of(proc) == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--standalone",
                                 "-m", "qnext.megatron.train", "recipe=qwen3_next_80b_lora", "data.path=chats.jsonl"]
    env = exported(proc)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and int(env["OMP_NUM_THREADS"]) >= 1
    assert f"doctor: {sys.executable} -m qnext.doctor --no-nccl" in proc.stdout
    assert "world size: 8" in proc.stdout


def test_8gpu_overrides_nproc_doctor_and_env():
    proc = run("run-8gpu.sh", *TINY, NPROC="2", QNEXT_SKIP_DOCTOR="1", NCCL_NVLS_ENABLE="1",
               TORCHRUN_ARGS="--master-port 29555")
    cmd = torchrun_of(proc)
    assert cmd[3:5] == ["--nproc-per-node", "2"] and cmd[6:8] == ["--master-port", "29555"]
    assert "doctor: skipped" in proc.stdout and "world size: 2" in proc.stdout
    assert exported(proc)["NCCL_NVLS_ENABLE"] == "1"  # a value the user set is kept
    proc = run("run-8gpu.sh", *TINY, NPROC="1", QNEXT_DOCTOR_ARGS="--no-parity --no-nccl")
    assert f"doctor: {sys.executable} -m qnext.doctor --no-parity --no-nccl" in proc.stdout


def test_8gpu_checks_the_recipe_against_the_world_size():
    proc = run("run-8gpu.sh", "recipe=qwen3_next_80b_lora", NPROC="6")
    assert proc.returncode == 2 and "parallel.ep*etp=8 must divide the 6 ranks" in proc.stderr
    proc = run("run-8gpu.sh", "recipe=tiny_lora_cpu")
    assert proc.returncode == 2 and "parallel.backend=fsdp" in proc.stderr and "run-fsdp.sh" in proc.stderr
    proc = run("run-8gpu.sh", *TINY, NPROC="two")
    assert proc.returncode == 2 and "NPROC='two' is not a whole number" in proc.stderr


MULTI = dict(NNODES="4", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29500")


def test_multinode_command():
    proc = run("run-multinode.sh", "recipe=qwen3_next_80b_full", **MULTI, RDZV_ID="job42")
    assert torchrun_of(proc) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "4", "--node-rank", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500", "--rdzv-id", "job42", "--max-restarts", "0",
        "-m", "qnext.megatron.train", "recipe=qwen3_next_80b_full"]
    assert "world size: 32" in proc.stdout and exported(proc)["NCCL_NVLS_ENABLE"] == "0"


@pytest.mark.parametrize("drop", ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_multinode_names_each_missing_variable(drop):
    env = {k: v for k, v in MULTI.items() if k != drop}
    proc = run("run-multinode.sh", "recipe=qwen3_next_80b_full", **env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"error: multi-node launch needs {drop} (") and first.count(" (") == 1, first


def test_multinode_rejects_bad_values():
    proc = run("run-multinode.sh", "recipe=qwen3_next_80b_full", **{**MULTI, "NODE_RANK": "4"})
    assert proc.returncode == 2 and "NODE_RANK=4 must be below NNODES=4" in proc.stderr
    proc = run("run-multinode.sh", "recipe=qwen3_next_80b_full", **{**MULTI, "MASTER_PORT": "99999"})
    assert proc.returncode == 2 and "MASTER_PORT=99999" in proc.stderr
    proc = run("run-multinode.sh", "recipe=qwen3_next_80b_full", **{**MULTI, "NNODES": "2"})  # 16 GPUs for the 4x8 layout
    assert proc.returncode == 2 and "parallel.ep*etp=8 must divide the 4 ranks of one pipeline stage" in proc.stderr


def test_slurm_example_sets_up_every_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its own options, run the command once as node 1 of the allocation
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=1 exec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu-a017\\ngpu-a018\\ngpu-a019\\ngpu-a020\\n"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    proc = run("slurm/qwen3_next_80b.sbatch", "data.path=data/sample/chats.jsonl", cwd=REPO,
               PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu-a[017-020]",
               SLURM_JOB_ID="777", SLURM_SUBMIT_DIR=str(REPO))
    cmd = torchrun_of(proc)
    assert cmd[cmd.index("--nnodes") + 1] == "4" and cmd[cmd.index("--node-rank") + 1] == "1"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu-a017:29500" and cmd[cmd.index("--rdzv-id") + 1] == "777"
    assert cmd[-2:] == ["recipe=qwen3_next_80b_full", "data.path=data/sample/chats.jsonl"]
    assert "world size: 32" in proc.stdout
