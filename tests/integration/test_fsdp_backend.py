"""FSDP backend on CPU (gloo, float32), through its command line, on the tiny random Qwen3-Next:

- 1 process (accumulation 2) and 2 processes (accumulation 1) with the same global batch give the
  same losses for 5 steps (within 1e-5);
- a run stopped after step 6 of 10 and resumed from its checkpoint reproduces steps 7..10 exactly,
  and so does one killed with SIGKILL mid-run;
- the merged export reloads with AutoModelForCausalLM and the adapter with PeftModel, both giving
  the in-memory merged model's logits (within 1e-5), in the base checkpoint's exact layout.

About two minutes on 2 cores (every run is a fresh interpreter importing torch + transformers).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

COMMON = [
    "recipe=tiny_lora_cpu",
    "data.eval_prompts=null",
    "data.seq_length=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "train.warmup_steps=2",
    "train.lr=2e-3",
    "train.min_lr=2e-4",
    "train.lora.r=4",
    "train.lora.alpha=8",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.wandb.enabled=false",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["WANDB_MODE"] = "disabled"
    return env


def run_train(args: list[str], nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "qnext.fsdp.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "qnext.fsdp.train", *args]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")
    return res


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint and the first 64 chats of the sample set."""
    from qnext.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("fsdp")
    ckpt = write_tiny_checkpoint(root / "tiny-hf", seed=0)
    chats = root / "chats.jsonl"
    lines = (REPO / "data/sample/chats.jsonl").read_text().splitlines()[:64]
    chats.write_text("\n".join(lines) + "\n")
    return {"root": root, "ckpt": ckpt, "chats": chats}


def _args(tiny, out: Path, *extra: str) -> list[str]:
    return [*COMMON, f"model.checkpoint={tiny['ckpt']}", f"data.path={tiny['chats']}", f"output_dir={out}", *extra]


def test_one_vs_two_processes_same_losses(tiny):
    one, two = tiny["root"] / "one", tiny["root"] / "two"
    run_train(_args(tiny, one, "train.steps=5", "train.eval_every=5"), nproc=1)
    res = run_train(_args(tiny, two, "train.steps=5", "train.eval_every=5"), nproc=2)
    assert "accum 1 x 2" in res.stdout, res.stdout
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    diffs = {s: abs(a[s] - b[s]) for s in a}
    print("1 vs 2 processes, |loss diff| per step:", diffs)
    assert max(diffs.values()) < 1e-5, (a, b)
    # the optimizer really moved the weights (otherwise equal losses would prove nothing)
    assert a[5] < a[1]
    # eval_every > 0: a held-out baseline before step 1 (logged at step 0), the same over 1 and 2 ranks
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert losses(one, "eval_loss")[0] == s1["eval_loss_before"]
    assert abs(s1["eval_loss_before"] - s2["eval_loss_before"]) < 1e-5, (s1, s2)
    print("held-out loss before/after 5 steps:", s1["eval_loss_before"], s1["eval_loss"])
    assert s1["eval_loss"] < s1["eval_loss_before"]


@pytest.fixture(scope="module")
def full_run(tiny) -> Path:
    out = tiny["root"] / "full"
    run_train(_args(tiny, out, "train.steps=10", "train.save_every=2", "train.keep_checkpoints=5"))
    return out


def test_stop_and_resume_reproduces_losses(tiny, full_run):
    out = tiny["root"] / "stopped"
    args = _args(tiny, out, "train.steps=10", "train.save_every=2", "train.keep_checkpoints=5")
    res = run_train([*args, "train.stop_after=6"])
    assert "stopped after step 6" in res.stdout
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoints/step_0000006/trainer_state.json").is_file()
    assert not (out / "adapter").exists()
    res = run_train(args)  # resume=auto
    assert "resumed from" in res.stdout and "step_0000006" in res.stdout, res.stdout
    ref, got = losses(full_run), losses(out)
    print("resume: reference", ref, "resumed", got)
    assert sorted(got) == list(range(1, 11))
    for step in range(7, 11):
        assert got[step] == ref[step], (step, got[step], ref[step])
    assert losses(out, "grad_norm") == losses(full_run, "grad_norm")
    # the final adapters are identical too
    from safetensors.torch import load_file

    a = load_file(str(full_run / "adapter/adapter_model.safetensors"))
    b = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume(tiny, full_run):
    """A real kill (no cleanup) right after the step-6 checkpoint appears; resume continues exactly."""
    out = tiny["root"] / "killed"
    args = _args(tiny, out, "train.steps=10", "train.save_every=2", "train.keep_checkpoints=5")
    cmd = [sys.executable, "-m", "qnext.fsdp.train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints/step_0000006"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run never wrote its step-6 checkpoint"
    res = run_train(args)
    assert "resumed from" in res.stdout
    ref, got = losses(full_run), losses(out)
    assert sorted(got) == list(range(1, 11))
    assert all(got[s] == ref[s] for s in range(1, 11)), (got, ref)
    # no temporary checkpoint directories left behind
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_export_merged_and_adapter_logits(tiny, full_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qnext.convert.safetensors_io import read_header, shard_files
    from qnext.models.hf import force_torch_gdn_path, load_hf_model

    merged, adapter = tiny["root"] / "merged", tiny["root"] / "adapter-out"
    res = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), "--run", str(full_run),
                          "--merged-out", str(merged), "--adapter-out", str(adapter)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

    # same files, index, names, dtypes, shapes and order per shard as the input checkpoint
    base = tiny["ckpt"]
    files_b, wm_b, _ = shard_files(base)
    files_m, wm_m, _ = shard_files(merged)
    assert files_b == files_m and wm_b == wm_m
    assert (base / "model.safetensors.index.json").read_bytes() == (merged / "model.safetensors.index.json").read_bytes()
    changed = 0
    for f in files_b:
        hb, hm = read_header(base / f), read_header(merged / f)
        assert [(e.name, e.dtype, e.shape) for e in hb.entries.values()] == \
               [(e.name, e.dtype, e.shape) for e in hm.entries.values()]
    from safetensors.torch import load_file

    for f in files_b:
        tb, tm = load_file(str(base / f)), load_file(str(merged / f))
        for name in tb:
            if not torch.equal(tb[name], tm[name]):
                changed += 1
                assert name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                      "in_proj_qkvz.weight", "in_proj_ba.weight", "out_proj.weight")), name
    assert changed > 0
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / f).read_bytes() == (base / f).read_bytes()

    force_torch_gdn_path()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (2, 24), generator=g)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_hf_model(base, "float32", "cpu"), str(adapter)).eval()
        logits_adapter = peft_model(input_ids=ids).logits
        in_memory = peft_model.merge_and_unload().eval()
        logits_mem = in_memory(input_ids=ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        logits_disk = reloaded(input_ids=ids).logits
        logits_base = load_hf_model(base, "float32", "cpu").eval()(input_ids=ids).logits
    d_disk = (logits_disk - logits_mem).abs().max().item()
    d_adapter = (logits_adapter - logits_mem).abs().max().item()
    d_base = (logits_base - logits_mem).abs().max().item()
    print(f"merged reload vs in-memory merged: {d_disk:.3g}; adapter vs merged: {d_adapter:.3g}; base vs merged: {d_base:.3g}")
    assert d_disk < 1e-5
    assert d_adapter < 1e-5
    assert d_base > 1e-4  # the adapter changes the model


def test_export_refuses_non_empty_output(tiny, full_run):
    out = tiny["root"] / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), "--run", str(full_run), "--merged-out", str(out)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "not empty" in res.stderr and "Traceback" not in res.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("key", ["experts", "shared_expert"])
def test_expert_lora_is_refused_before_training(tiny, key):
    """PEFT saves (shared-)expert adapters of transformers 5's fused MoE as target_parameters, which
    the streaming merged export cannot apply: refused up front, one message, exit 2, nothing trained."""
    out = tiny["root"] / f"refused-{key}"
    res = run_train(_args(tiny, out, "train.steps=2", f"train.lora.{key}=true"), check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"train.lora.{key}=true is not supported by the FSDP backend" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "metrics.jsonl").exists()


def test_profile_of_one_step(tiny, monkeypatch):
    """QNEXT_PROFILE_STEP=2: step 2 runs under torch.profiler, its table lands in the run directory and
    its record is marked, so that timings can leave it out."""
    out = tiny["root"] / "profiled"
    monkeypatch.setenv("QNEXT_PROFILE_STEP", "2")
    monkeypatch.setenv("QNEXT_PROFILE_TRACE", "1")
    res = run_train(_args(tiny, out, "train.steps=3"))
    assert "profile of step 2 written to" in res.stdout, res.stdout[-2000:]
    table = (out / "profile_step2_rank0.txt").read_text()
    assert "## by total cpu time" in table and "aten::mm" in table
    assert "## by self cpu time" in table
    trace = json.loads(gzip.decompress((out / "profile_step2_rank0.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])  # the step's timeline
    assert not list(out.glob("profile_step1*")) and not list(out.glob("**/trace.json"))
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert [s for s, r in sorted(recs.items()) if r.get("profiled")] == [2]
    monkeypatch.setenv("QNEXT_PROFILE_STEP", "two")
    bad = run_train(_args(tiny, tiny["root"] / "profiled_bad", "train.steps=3"), check=False)
    assert bad.returncode == 2 and "QNEXT_PROFILE_STEP='two' is not a step number" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tiny["root"] / "profiled_bad").exists()  # refused before any write
