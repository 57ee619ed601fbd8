#!/usr/bin/env python
"""Training throughput, MFU and peak memory, side by side on the same GPUs: the Megatron backend (our
recipe's layout), the FSDP backend, and the transformers ``device_map="auto"`` pipeline that users fall
back to (HF model + PEFT + torch AdamW, gradient checkpointing), for LoRA and full fine-tuning.

Model: a Qwen3-Next with the real widths (hidden 2048, 512 experts, top-10, real head counts, the real
vocabulary) and ``--layers`` layers (default 4: GDN, GDN, GDN, attention), random bf16 weights written
by ``qnext.models.tiny`` and converted with ``make convert``'s code. ``--layers 48`` is the full
Qwen3-Next-80B-A3B. Data: the bundled sample chats packed into ``--seq`` token sequences (4096), the
same sequences for every approach; ``--gbs`` sequences per optimizer step, ``--mbs`` of them per forward
(micro-batch; default 1): the Megatron backend takes packed rows of one micro-batch as one ``thd`` row,
the FSDP backend as one packed batch, the HF pipeline as a padded batch of causal rows.

Per run (each in its own process, so an out-of-memory run is reported and the others go on):
step time, tokens/s per GPU, model TFLOP/s per GPU (``qnext.throughput``: LoRA counts 2 passes, full
3; activation recompute is not counted), MFU against the bf16 matmul peak measured in the same script
run (8192^3 bf16 GEMMs) and against the datasheet peak, peak allocated memory per GPU, and for the
Megatron runs the memory planner's prediction (``qnext.plan``) and its error. Steps after
``--warmup`` are averaged (the first steps include Triton autotuning).

  python benchmarks/train_throughput.py --out benchmarks/results/train_throughput          (GPUs)
  python benchmarks/train_throughput.py --out DIR --only megatron:lora,hf:lora           (a subset)
  python benchmarks/train_throughput.py --render DIR/train_throughput.json                (tables + chart)

Results accumulate in ``<out>/train_throughput.json`` (a later call with ``--only`` adds or replaces
rows) with ``train_throughput.md`` and ``train_throughput.png`` written from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.fsutil import atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_report import APPROACHES, MODES, render  # noqa: E402  (render: the report, in its own file)

LORA = {"r": 16, "alpha": 32}  # recipes/train/lora.yaml
LR = {"lora": 2e-4, "full": 1e-5}
GIB = 2**30
STACK_DUMP_S = 120  # each run's log shows where it spends a slow first step (qnext.errors.start_stack_dumps)


# ----------------------------------------------------------------------------------------- inputs
def make_model(work: Path, layers: int, experts: int = 512) -> dict[str, Path]:
    """The real-width proxy with ``layers`` layers and ``experts`` routed experts (top-10 routing kept)."""
    from qnext.convert import convert_hf_to_torch_dist
    from qnext.models.tiny import write_tiny_checkpoint

    tag = f"proxy{layers}" + (f"_e{experts}" if experts != 512 else "")
    hf, mg = work / f"{tag}_hf", work / f"{tag}_mg"
    if not (mg / "latest_checkpointed_iteration.txt").exists():
        t0 = time.time()
        write_tiny_checkpoint(hf, config_path=REPO / "models/qwen3_next_80b_a3b/config.json", seed=0,
                              dtype="bfloat16", max_shard_bytes=4 * GIB, overwrite=True, max_total_bytes=None,
                              overrides={"num_hidden_layers": layers, "num_experts": experts})
        convert_hf_to_torch_dist(hf, mg, progress=False, log=None, overwrite=True)
        print(f"[bench] {layers}-layer checkpoint written and converted in {time.time() - t0:.0f}s", flush=True)
    return {"hf": hf, "mg": mg}


def repeated_chats(src: Path, work: Path, repeat: int) -> Path:
    """``src``'s chats ``repeat`` times over, as ``work/chats_x<repeat>.jsonl`` (written atomically)."""
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    path = work / f"chats_x{repeat}.jsonl"
    atomic_write_text(path, "\n".join(lines * repeat) + "\n")
    return path


def make_data(work: Path, repeat: int, seq: int) -> tuple[Path, dict]:
    """The bundled sample chats repeated ``repeat`` times, so that packing fills (nearly) every
    ``seq``-token sequence: the backends pad a partial sequence to ``seq`` tokens and the HF path does
    not, so partial packs would give them different work per step. Returns the file and its packing
    statistics (sequences, fill)."""
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer

    path = repeated_chats(REPO / "data/sample/chats.jsonl", work, repeat)
    train, _, stats = build_datasets(path, load_tokenizer(None), seq, pack=True, valid_fraction=0.01)
    lengths = sorted(len(s["input_ids"]) for s in train)
    info = {"data": f"data/sample/chats.jsonl x{repeat}", "train_sequences": len(train),
            "mean_fill": round(sum(lengths) / (len(lengths) * seq), 4), "shortest_sequence": lengths[0]}
    print(f"[bench] data: {info}", flush=True)
    return path, info


def common_overrides(args, model: dict[str, Path], mode: str) -> list[str]:
    """The recipe keys every approach shares (data, batch, schedule)."""
    return [f"model.hf_config={model['hf'] / 'config.json'}", f"train={mode}", "data=sample", f"data.path={args.data}",
            f"data.seq_length={args.seq}", "data.pack=true", "data.eval_prompts=null", "data.valid_fraction=0.01",
            f"train.steps={total_steps(args)}", "train.warmup_steps=1", f"train.lr={LR[mode]}", f"train.min_lr={LR[mode] / 10}",
            f"train.global_batch_size={args.gbs}", f"train.micro_batch_size={args.mbs}", "train.save_every=0",
            "train.eval_every=0", "train.eval_batches=1", "train.save_final=false", "logging.progress_bar=false", "overwrite=true",
            f"train.lora.r={LORA['r']}", f"train.lora.alpha={LORA['alpha']}"]


def megatron_overrides(args, model, mode: str, ngpu: int) -> list[str]:
    recompute = args.recompute_lora if mode == "lora" else args.recompute_full
    par = ["parallel=1gpu", f"parallel.recompute={recompute}"] if ngpu == 1 else [
        "parallel=8xh100", f"parallel.num_gpus_per_node={ngpu}", f"parallel.ep={ngpu}"]
    extra = ["train.optimizer_cpu_offload=true"] if mode == "full" and args.full_offload else []
    if mode == "lora" and args.base_dtype != "bf16":
        extra.append(f"train.lora.base_dtype={args.base_dtype}")  # frozen routed experts quantized at load
    return [*common_overrides(args, model, mode), *par, f"model.megatron_checkpoint={model['mg']}", *extra, *args.set]


def fsdp_overrides(args, model, mode: str, ngpu: int) -> list[str]:
    return [*common_overrides(args, model, mode), "parallel=fsdp", "parallel.recompute=full",
            f"model.checkpoint={model['hf']}"]


# ----------------------------------------------------------------------------------------- runs
def _metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


def total_steps(args) -> int:
    """The timed steps, then a profiled step (``--profile``), then a sync-checked step (``--sync-check``)."""
    return args.steps + (1 if getattr(args, "profile", False) else 0) + (1 if getattr(args, "sync_check", False) else 0)


def profile_step(args) -> int:
    return args.steps + 1


def summarize_steps(recs: list[dict], warmup: int, ngpu: int, peak_measured: Optional[float]) -> dict:
    """Means over the steps after ``warmup`` of one run's per-step records (a profiled step left out)."""
    steps = [r for r in recs if "step_time_s" in r and r.get("step", 0) > warmup and not r.get("profiled")]
    if not steps:
        raise ValueError("no timed steps after the warm-up")
    mean = lambda k: statistics.fmean(r[k] for r in steps)  # noqa: E731
    tflops = mean("tflops_per_device")
    return {"steps_timed": len(steps), "step_time_s": mean("step_time_s"),
            "tokens_per_s_per_gpu": mean("tokens_per_s") / ngpu, "tflops_per_gpu": tflops,
            # robust to a few slow steps (first-time Triton autotuning for a new shape): the median step's rate
            "step_time_median_s": statistics.median(r["step_time_s"] for r in steps),
            "tokens_per_s_median_per_gpu": statistics.median(r["tokens_per_s"] for r in steps) / ngpu,
            "mfu_measured_peak": tflops / peak_measured if peak_measured else None,
            # steady state: the timed steps' own peaks (each step starts a new window); the first steps'
            # (model build, Triton autotuning) are kept apart
            "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in steps),
            "peak_mem_first_steps_gib": max((r.get("peak_mem_gib", 0.0) for r in recs if r not in steps), default=None),
            "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0.0) for r in steps), "losses": [r.get("loss") for r in steps],
            # before step 1: model build and checkpoint load (the Megatron entry records it)
            "startup_peak_gib": next((r["startup_peak_gib"] for r in recs if "startup_peak_gib" in r), None),
            # the whole training-loss curve (every step, warm-up included) and the last held-out loss
            "loss_curve": [r["loss"] for r in recs if "loss" in r and "step_time_s" in r and not r.get("profiled")],
            "eval_loss": next((r["eval_loss"] for r in reversed(recs) if "eval_loss" in r), None)}


def _run(cmd: list[str], env: dict, out: Path, timeout: int) -> tuple[list[dict], dict]:
    """One run in its own process group, its output in ``<out>.log``: its per-step records and wall time,
    or why it failed. A run past ``timeout`` is killed with all its children (torchrun's workers too), so
    the next run starts on a free GPU."""
    import signal

    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    text = log.read_text(errors="replace")
    info: dict[str, Any] = {"wall_s": round(time.time() - t0, 1), "log": str(log)}
    if rc is None:
        info.update(error=f"timed out after {timeout}s", log_tail=_tail(text))
    elif rc != 0:
        info["error"] = "out of memory" if "OutOfMemory" in text or "out of memory" in text else f"exit {rc}"
        info["log_tail"] = _tail(text)
    return _metrics(out), info


def profile_env(args) -> dict[str, str]:
    env = {"QNEXT_PROFILE_STEP": str(profile_step(args))} if getattr(args, "profile", False) else {}
    if getattr(args, "sync_check", False):
        env["QNEXT_SYNC_CHECK"] = str(total_steps(args))
    return env


def run_backend(args, kind: str, overrides: list[str], out: Path, ngpu: int, timeout: int) -> tuple[list[dict], dict]:
    script = "scripts/run-8gpu.sh" if kind == "megatron" else "scripts/run-fsdp.sh"
    env = dict(os.environ, NPROC=str(ngpu), QNEXT_SKIP_DOCTOR="1", PY=sys.executable, PYTHONUNBUFFERED="1",
               NCCL_NVLS_ENABLE="0", QNEXT_STACK_DUMP_S=str(STACK_DUMP_S), **profile_env(args))
    cmd = ["bash", str(REPO / script), *overrides, f"output_dir={out}"]
    print(f"[bench] $ NPROC={ngpu} {' '.join(cmd[1:])}", flush=True)
    return _run(cmd, env, out, timeout)


def run_hf_worker(args, model, mode: str, out: Path, timeout: int) -> tuple[list[dict], dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", mode, "--hf-dir", str(model["hf"]),
           "--seq", str(args.seq), "--gbs", str(args.gbs), "--mbs", str(args.mbs), "--steps", str(args.steps + (1 if args.profile else 0)), "--run-out", str(out),
           "--data", str(args.data)]
    print(f"[bench] $ {' '.join(cmd[1:])}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    return _run(cmd, dict(os.environ, PYTHONUNBUFFERED="1", QNEXT_STACK_DUMP_S=str(STACK_DUMP_S), **profile_env(args)),
                out, timeout)


def planned_gib(overrides: list[str], ngpu: int) -> dict[str, float]:
    """The planner's step peak per GPU, and its tensor part (the peak less the context/NCCL/slack allowance),
    which is what the measured max-allocated peak of the timed steps compares with; and its start-up
    (checkpoint load) tensors."""
    from qnext.config import load_config
    from qnext.plan import plan

    pl = plan(load_config(overrides), world_size=ngpu)
    return {"planned_peak_gib": pl.step_peak / GIB, "planned_tensors_gib": (pl.step_peak - pl.buffers) / GIB,
            "planned_load_tensors_gib": pl.load / GIB}


def ep_emulation(args, mode: str) -> dict[str, Any]:
    """What a run with ``--experts N`` < 512 stands for: one rank of the full model under EP = 512 / N with
    balanced routing (each GPU holds N experts and receives, per expert, as many tokens as routing its own
    tokens top-10 over N experts gives it). It leaves out the expert-parallel all-to-all; its time is
    estimated here from the bytes one GPU sends per step at NVLink's one-way bandwidth
    (``qnext.throughput.ep_all_to_all_seconds``: a lower bound, no overlap with compute assumed)."""
    from qnext.throughput import ep_emulation_record

    full = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text()) | {"num_hidden_layers": args.layers}
    rc = args.recompute_lora if mode == "lora" else args.recompute_full
    passes = 3 if rc in ("selective", "full") else 2
    return ep_emulation_record(full, args.experts, args.gbs * args.seq, moe_passes=passes)


# ----------------------------------------------------------------------------------------- matmul peak
def measure_matmul_peak(n: int = 8192, iters: int = 50) -> dict:
    """bf16 dense GEMM TFLOP/s of GPU 0 (best of 3 timed batches of ``iters`` n^3 products)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b
    torch.cuda.empty_cache()
    return {"tflops": best, "shape": f"{n}x{n}x{n} bf16"}


# ----------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="results directory (JSON, Markdown, PNG)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qnext_throughput"), help="checkpoints and run directories")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=512,
                    help="routed experts per MoE layer (64 with --layers 48: one EP8 rank of the 80B model)")
    ap.add_argument("--recompute-lora", default="auto", choices=["auto", "none", "experts_act", "experts", "selective", "full"],
                    help="parallel.recompute of the Megatron LoRA run (auto: the planner's choice for this GPU)")
    ap.add_argument("--recompute-full", default="auto", choices=["auto", "none", "experts_act", "experts", "selective", "full"],
                    help="parallel.recompute of the Megatron full run (auto: the planner's choice for this GPU)")
    ap.add_argument("--base-dtype", default="bf16", choices=["bf16", "fp8", "nf4"],
                    help="storage of the frozen routed experts in the Megatron LoRA run (train.lora.base_dtype)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe key for the Megatron runs, after the benchmark's own (repeatable), e.g. train.seed=7")
    ap.add_argument("--sync-check", action="store_true",
                    help="one extra step per Megatron run under QNEXT_SYNC_CHECK: its host-device syncs go into the JSON")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--gbs", type=int, default=4, help="sequences per optimizer step")
    ap.add_argument("--mbs", type=int, default=1, help="sequences per forward (micro-batch), every approach")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=16,
                    help="repeat the sample chats this many times so that the packed sequences are full")
    ap.add_argument("--profile", action="store_true",
                    help="one extra step per run under torch.profiler (QNEXT_PROFILE_STEP), left out of the means; "
                         "its table is copied next to the results")
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help="leading steps left out of the means")
    ap.add_argument("--only", default="", help="comma-separated approach:mode pairs, e.g. megatron:lora,hf:lora")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--full-offload", action="store_true",
                    help="Megatron full training with the optimizer in host memory (train.optimizer_cpu_offload)")
    ap.add_argument("--render", type=Path, help="only write the Markdown and PNG from this JSON")
    ap.add_argument("--prepare-only", action="store_true", help="only write and convert the checkpoint (CPU)")
    ap.add_argument("--hf-worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        from hf_pipeline import hf_worker

        return hf_worker(args.hf_worker, args.hf_dir, args.seq, args.gbs, args.steps, args.run_out, args.data, args.mbs,
                         lora=LORA, lr=LR[args.hf_worker])
    if args.render:
        render(json.loads(args.render.read_text()), args.render.parent)
        return 0
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.prepare_only:
        make_model(args.work, args.layers, args.experts)
        make_data(args.work, args.repeat, args.seq)
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.mbs < 1 or args.gbs % args.mbs:
        ap.error(f"--gbs ({args.gbs}) must be a multiple of --mbs ({args.mbs})")
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    wanted = [tuple(x.split(":", 1)) for x in args.only.split(",") if x] or [(a, m) for m in MODES for a in APPROACHES]
    for pair in wanted:
        if len(pair) != 2 or pair[0] not in APPROACHES or pair[1] not in MODES:
            ap.error(f"--only: {':'.join(pair)} is not approach:mode with approach in {APPROACHES}, mode in {MODES}")
    import torch

    ngpu = torch.cuda.device_count()
    if ngpu == 0:
        print("train_throughput needs CUDA GPUs")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    from qnext.throughput import peak_tflops

    peak = measure_matmul_peak()
    name = torch.cuda.get_device_name(0)
    import megatron.core
    import transformers

    env = {"date": time.strftime("%Y-%m-%d"), "gpu": name, "gpus": ngpu,
           "model": (f"Qwen3-Next real widths, {args.layers} layers" if args.layers != 48 else "Qwen3-Next-80B-A3B")
                    + (f", {args.experts} experts" if args.experts != 512 else ""),
           "layers": args.layers, "experts": args.experts, "seq": args.seq, "gbs": args.gbs, "mbs": args.mbs, "steps": args.steps, "warmup": args.warmup,
           "matmul_peak_tflops": peak["tflops"], "matmul_shape": peak["shape"], "datasheet_peak_tflops": peak_tflops(name),
           "software": f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
                       f"transformers {transformers.__version__}",
           "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:])}
    print(f"[bench] {ngpu}x {name}: bf16 matmul peak {peak['tflops']:.0f} TFLOP/s", flush=True)
    model = make_model(args.work, args.layers, args.experts)
    args.data, data_info = make_data(args.work, args.repeat, args.seq)
    env.update(data_info)
    json_path = args.out / "train_throughput.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"runs": []}
    data["environment"] = env
    for approach, mode in wanted:
        out = args.work / "runs" / f"{approach}_{mode}"
        row: dict[str, Any] = {"approach": approach, "mode": mode, "gpus": ngpu, "layers": args.layers,
                               "experts": args.experts, "global_batch": args.gbs, "micro_batch": args.mbs, "seq": args.seq,
                               "base_dtype": args.base_dtype if (approach, mode) == ("megatron", "lora") else "bf16",
                               "synthetic_weights": False}
        if approach == "hf":
            row["layout"] = f'device_map="auto" over {ngpu} GPU(s), grad ckpt'
            recs, info = run_hf_worker(args, model, mode, out, args.timeout)
        else:
            ovs = (megatron_overrides if approach == "megatron" else fsdp_overrides)(args, model, mode, ngpu)
            if approach == "megatron":
                rc = args.recompute_lora if mode == "lora" else args.recompute_full
                row["layout"] = (f"1 GPU, recompute {rc}" if ngpu == 1 else f"EP{ngpu}") + (
                    ", optimizer CPU offload" if mode == "full" and args.full_offload else "") + (
                    f", {row['base_dtype'].upper()} experts" if row["base_dtype"] != "bf16" else "") + (
                    f", {' '.join(args.set)}" if args.set else "")
                row.update(planned_gib(ovs, ngpu))
            else:
                wrapped = ngpu > 1 or mode == "full"  # qnext.fsdp.parallelize.needs_fsdp: a bf16 LoRA base on one GPU is not wrapped
                row["layout"] = (f"FSDP2 over {ngpu} GPU(s)" if wrapped else "1 GPU, not FSDP-wrapped") + ", full recompute"
            recs, info = run_backend(args, approach, ovs, out, ngpu, args.timeout)
        row.update(info)
        if Path(info.get("log", "")).is_file():  # the results directory keeps every run's log
            (args.out / "logs").mkdir(exist_ok=True)
            tag = "" if row["base_dtype"] == "bf16" else f"_{row['base_dtype']}"
            row["log"] = f"logs/{approach}_{mode}{tag}.log"
            atomic_write_text(args.out / row["log"], Path(info["log"]).read_text(errors="replace"))
        prof = out / f"profile_step{profile_step(args)}_rank0.txt"
        if args.profile and prof.is_file():
            row["profile"] = f"profile_{approach}_{mode}{'' if row['base_dtype'] == 'bf16' else '_' + row['base_dtype']}.txt"
            atomic_write_text(args.out / row["profile"], prof.read_text())
        syncs = out / f"syncs_step{total_steps(args)}_rank0.json"
        if args.sync_check and syncs.is_file():
            found = json.loads(syncs.read_text())["syncs"]
            row["syncs"] = {"total": sum(r["count"] for r in found),
                            "unplanned": sum(r["count"] for r in found if not r["planned"]), "file": f"syncs_{approach}_{mode}.json"}
            atomic_write_text(args.out / row["syncs"]["file"], syncs.read_text())
        try:
            row.update(summarize_steps(recs, args.warmup, ngpu, peak["tflops"]))  # tokens/s are the job's
        except ValueError as err:
            row.setdefault("error", str(err))
        row["matmul_peak_tflops"] = peak["tflops"]
        if approach == "megatron" and args.experts < 512 and "step_time_s" in row:
            row.update(ep_emulation(args, mode))
        print(f"[bench] {approach} {mode}: " + json.dumps({k: v for k, v in row.items()
                                                            if k not in ('log_tail', 'losses', 'loss_curve')}),
              flush=True)
        key = (approach, mode, row["base_dtype"])  # a run replaces an earlier one of the same approach, mode, base
        data["runs"] = [r for r in data["runs"] if (r["approach"], r["mode"], r.get("base_dtype", "bf16")) != key] + [row]
        order = {(a, m): i for i, (m, a) in enumerate((m, a) for m in MODES for a in APPROACHES)}
        data["runs"].sort(key=lambda r: order.get((r["approach"], r["mode"]), 99))
        atomic_write_text(json_path, json.dumps(data, indent=1) + "\n")  # results so far survive a killed run
        render(data, args.out)
    print((args.out / "train_throughput.md").read_text())
    return 0 if all("error" not in r for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
