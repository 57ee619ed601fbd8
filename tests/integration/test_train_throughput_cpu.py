"""benchmarks/train_throughput.py on the CPU: the HF-pipeline worker trains a tiny Qwen3-Next through the
runner the benchmark uses for every approach, the step records become the table's means, a run past its
time limit is killed with its children, and the Markdown table is written from the JSON."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput", REPO / "benchmarks/train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_worker_trains_profiles_one_extra_step_and_its_records_summarize(tmp_path):
    from qnext.models.tiny import write_tiny_checkpoint

    tt = _bench()
    hf = tmp_path / "hf"
    write_tiny_checkpoint(hf, seed=0)
    data, info = tt.make_data(tmp_path, repeat=2, seq=64)
    sample = (REPO / "data/sample/chats.jsonl").read_text().splitlines()
    assert data.read_text().splitlines() == [ln for ln in sample if ln.strip()] * 2
    assert info["mean_fill"] > 0.9 and info["train_sequences"] > 10
    # small: a CPU backward of this model takes ~10 s
    args = SimpleNamespace(seq=64, gbs=2, mbs=2, steps=2, data=data, profile=True)  # two rows in one forward
    out = tmp_path / "runs/hf_lora"
    recs, info = tt.run_hf_worker(args, {"hf": hf}, "lora", out, timeout=600)
    assert "error" not in info, info.get("log_tail")
    assert Path(info["log"]).read_text().count("[hf] step") == 3
    assert [r["step"] for r in recs] == [1, 2, 3] and [r.get("profiled") for r in recs] == [None, None, 1]
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer

    train, _, _ = build_datasets(data, load_tokenizer(None), 64, pack=True, valid_fraction=0.01)
    rows = [len(train[i]["input_ids"]) for i in range(6)]
    assert [round(r["tokens_per_s"] * r["step_time_s"]) for r in recs] == [rows[0] + rows[1], rows[2] + rows[3],
                                                                         rows[4] + rows[5]]
    for r in recs:
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["step_time_s"] > 0 and r["tflops_per_device"] > 0
    table = (out / "profile_step3_rank0.txt").read_text()
    assert "by total cpu time" in table and "aten::" in table
    import re

    host = float(re.search(r"host \(self CPU\) total ([\d.]+) ms", table).group(1))
    tot = re.search(r"Self CPU time total: ([\d.]+)(ms|s)", table)
    assert host == pytest.approx(float(tot.group(1)) * (1000 if tot.group(2) == "s" else 1), rel=0.01, abs=0.1)
    row = tt.summarize_steps(recs, warmup=1, ngpu=1, peak_measured=100.0)
    assert row["steps_timed"] == 1 and row["step_time_s"] == recs[1]["step_time_s"]  # the profiled step is left out
    assert abs(row["mfu_measured_peak"] - row["tflops_per_gpu"] / 100.0) < 1e-12


def test_a_run_past_its_limit_is_killed_with_its_children(tmp_path):
    tt = _bench()
    pidfile = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 120 & echo $! > {pidfile}; echo started; wait"]
    t0 = time.time()
    recs, info = tt._run(cmd, {"PATH": "/usr/bin:/bin"}, tmp_path / "runs/slow", timeout=2)
    assert time.time() - t0 < 30
    assert info["error"] == "timed out after 2s" and "started" in info["log_tail"] and recs == []
    pid = int(pidfile.read_text())
    time.sleep(0.5)
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text(), "the grandchild survived the kill"


def test_render_writes_the_table_with_ratios_and_targets(tmp_path):
    tt = _bench()
    env = {"date": "2026-12-02", "gpu": "GPU", "gpus": 1, "model": "m", "command": "c", "matmul_peak_tflops": 500.0,
           "matmul_shape": "s", "datasheet_peak_tflops": 1000.0, "seq": 4096, "gbs": 2, "steps": 6, "warmup": 2}
    row = lambda a, tps, **kw: {"approach": a, "mode": "lora", "layout": "x", "step_time_s": 1.0,  # noqa: E731
                                "tokens_per_s_per_gpu": tps, "tflops_per_gpu": 50.0, "mfu_measured_peak": 0.1,
                                "peak_mem_gib": 20.0, **kw}
    data = {"environment": env, "runs": [row("megatron", 12000.0, planned_peak_gib=25.0, planned_tensors_gib=22.0), row("hf", 1000.0),
                                          {"approach": "fsdp", "mode": "lora", "error": "out of memory"}]}
    (tmp_path / "train_throughput.json").write_text(json.dumps(data))
    tt.render(data, tmp_path)
    md = (tmp_path / "train_throughput.md").read_text()
    assert "| 12.0x |" in md and "22.0 (+10%)" in md
    assert "lora: Megatron backend / HF pipeline = 12.00x (met, target 2.0x)" in md and "(+10%, met)" in md and "allowance 25.0 GiB" in md
    assert "FSDP backend (this repo) lora: out of memory" in md
    assert "held-out loss" not in md  # no quantized runs, no comparison
    # the median steps are checked too: a mean lifted by the baseline's slow first-time steps is not enough
    med = lambda tps, med: {"tokens_per_s_median_per_gpu": med, "step_time_median_s": 8192 / med}  # noqa: E731
    data["runs"] = [row("megatron", 3000.0, **med(3000.0, 3000.0)), row("hf", 1000.0, **med(2000.0, 2000.0)),
                    row("fsdp", 2100.0, **med(2100.0, 2100.0))]
    tt.render(data, tmp_path)
    md = (tmp_path / "train_throughput.md").read_text()
    assert "lora: Megatron backend / HF pipeline = 3.00x (median steps 1.50x) (NOT met, target 2.0x)" in md, md
    assert "lora: FSDP backend / HF pipeline = 2.10x (median steps 1.05x) (met, target 1.0x)" in md
    assert "| 1.000 (2.731) |" in md


def test_render_compares_quantized_bases_with_the_bf16_one(tmp_path):
    """Runs of the Megatron LoRA with FP8/NF4 frozen experts next to the bf16 one: held-out losses as a
    percentage of the bf16 run's, and each run's loss curve from first to last step."""
    tt = _bench()
    env = {"date": "2026-12-04", "gpu": "GPU", "gpus": 1, "model": "m", "command": "c", "matmul_peak_tflops": 500.0,
           "matmul_shape": "s", "datasheet_peak_tflops": 1000.0, "seq": 4096, "gbs": 2, "steps": 30, "warmup": 3}
    row = lambda base, ev, **kw: {"approach": "megatron", "mode": "lora", "layout": base, "step_time_s": 0.2,  # noqa: E731
                                  "tokens_per_s_per_gpu": 40000.0, "tflops_per_gpu": 90.0, "mfu_measured_peak": 0.12,
                                  "peak_mem_gib": 20.0, "base_dtype": base, "eval_loss": ev,
                                  "loss_curve": [12.0, 10.0, 8.5], **kw}
    runs = [row("fp8", 8.08, planned_tensors_gib=10.0, planned_peak_gib=13.0),  # a quantized row listed first
            row("bf16", 8.0, planned_tensors_gib=19.0, planned_peak_gib=22.0), row("nf4", 8.2)]
    tt.render({"environment": env, "runs": runs}, tmp_path)
    md = (tmp_path / "train_throughput.md").read_text()
    assert "planner 19.0 GiB of tensors" in md and "planner 10.0 GiB" not in md  # the planner check is the bf16 run's
    assert "| fp8 | 40,000 | 12.000 -> 8.500 | 8.0800 | +1.00% |" in md
    assert "| nf4 | 40,000 | 12.000 -> 8.500 | 8.2000 | +2.50% |" in md and "| bf16 |" in md


def test_ep_emulation_row_says_what_it_leaves_out(tmp_path):
    """``--experts 64`` stands for one EP8 rank: the record carries the all-to-all estimate and the table
    says what the emulation leaves out and the tokens/s with the estimate added."""
    import types

    tt = _bench()
    args = types.SimpleNamespace(layers=48, experts=64, gbs=2, seq=4096, recompute_lora="none", recompute_full="selective")
    em = tt.ep_emulation(args, "lora")
    assert em["emulated_ep"] == 8 and 0.1 < em["a2a_estimate_s"] < 0.15  # 2 x 48 layers x 2 x 8192 x 10 x 2048 x 2 B x 7/8
    assert tt.ep_emulation(args, "full")["a2a_estimate_s"] == pytest.approx(1.5 * em["a2a_estimate_s"])  # MoE recomputed
    env = {"date": "2026-12-03", "gpu": "GPU", "gpus": 1, "model": "m", "command": "c", "matmul_peak_tflops": 500.0,
           "matmul_shape": "s", "datasheet_peak_tflops": 1000.0, "seq": 4096, "gbs": 2, "steps": 6, "warmup": 2}
    row = {"approach": "megatron", "mode": "lora", "layout": "x", "step_time_s": 1.0, "tokens_per_s_per_gpu": 8192.0,
           "tflops_per_gpu": 50.0, "mfu_measured_peak": 0.1, "peak_mem_gib": 20.0, **em}
    tt.render({"environment": env, "runs": [row]}, tmp_path)
    md = (tmp_path / "train_throughput.md").read_text()
    assert "one EP8 rank of the full model emulated" in md and "leaves out the EP all-to-all" in md
    expect = 8192.0 / (1.0 + em["a2a_estimate_s"])
    assert f"{expect:,.0f} tokens/s/GPU with it added" in md


def test_profile_summary_counts_kernel_launches_and_device_time():
    """The summary line of a profiled step (qnext.metrics.host_device_summary) on the profiler's averages:
    launches of every CUDA launch API, self device time of the kernels (an operator's row repeats its kernels' time,
    which the profiles of 2026-12-04 counted twice); here on stand-ins for a CUDA profile's rows."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from qnext.metrics import host_device_summary

    def Row(device_type=DeviceType.CPU, **kw):  # noqa: N802
        return SimpleNamespace(device_type=device_type, is_user_annotation=False, **kw)

    rows = [Row(key="cudaLaunchKernel", count=7, self_cpu_time_total=70.0, self_device_time_total=0.0),
            Row(key="cuLaunchKernelEx", count=3, self_cpu_time_total=30.0, self_device_time_total=0.0),
            Row(key="aten::mm", count=2, self_cpu_time_total=900.0, self_device_time_total=2500.0),
            # the GEMM kernel's own row: its time is the operator's above, counted once
            Row(key="nvjet_sm90_gemm", count=2, self_cpu_time_total=0.0, self_device_time_total=2500.0,
                device_type=DeviceType.CUDA)]
    assert host_device_summary(rows) == ("host (self CPU) total 1.0 ms, device (self CUDA) total 2.5 ms, "
                                         "kernel launches 10 (profiler overhead included)")


def test_set_appends_recipe_keys_to_the_megatron_run(tmp_path):
    """--set KEY=VALUE (e.g. another seed for a second run of the same settings) reaches the Megatron run's
    recipe after the benchmark's own keys, so it wins, and the composed recipe carries it."""
    from qnext.config import load_config

    tt = _bench()
    args = SimpleNamespace(data=tmp_path / "chats.jsonl", seq=256, steps=3, profile=False, sync_check=False, gbs=2, mbs=1,
                           recompute_lora="none", recompute_full="auto", full_offload=False, base_dtype="bf16",
                           set=["train.seed=7", "train.lr=3e-4"])
    model = {"hf": tmp_path / "hf", "mg": tmp_path / "mg"}
    ov = tt.megatron_overrides(args, model, "lora", 1)
    assert ov[-2:] == ["train.seed=7", "train.lr=3e-4"] and any(o.startswith("train.lr=") for o in ov[:-2])
    cfg = load_config([o for o in ov if not o.startswith(("model.", "data.path"))])
    assert cfg.train.seed == 7 and cfg.train.lr == 3e-4
