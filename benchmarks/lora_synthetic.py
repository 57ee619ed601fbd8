"""LoRA steps of a Qwen3-Next model at its real size on one GPU, with SYNTHETIC weights: the base weights
are random, the routed experts created directly in their storage format (FP8 or NF4 one layer at a time,
so the bf16 experts never exist in full), because the 80B model's weights cannot be downloaded here and
would not fit the GPU machines' disk. The data are the real sample chats, packed.

What it measures: the per-GPU compute and memory of LoRA on the real architecture (48 layers, 512
experts, hidden 2048 for Qwen3-Next-80B-A3B), the peak against ``qnext.plan``'s, and whether the loss
falls. What it leaves out: the training entry's checkpoint load, data-parallel/EP communication,
megatron's optimizer wrapper (a torch AdamW steps the adapters) and the real weights' numerics.

    python benchmarks/lora_synthetic.py --base-dtype fp8 --steps 30 --out benchmarks/results/lora_80b_fp8_h200
    python benchmarks/lora_synthetic.py --base-dtype nf4 --steps 30 --out benchmarks/results/lora_80b_nf4_h200
    python benchmarks/lora_synthetic.py --model models/tiny_qwen3_next/config.json --device cpu --steps 3 --seq 256

Writes ``<out>/lora_synthetic.json`` (one run record: ``layers``, ``experts``, ``gpus``, ``base_dtype``,
``synthetic_weights``, ``tokens_per_s_per_gpu``, ``peak_mem_gib``, ``planned_peak_gib``, losses).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qnext.errors import UserError, cli_main  # noqa: E402


@torch.no_grad()
def init_synthetic_(model, std: float, seed: int) -> None:
    """Random dense weights (normal, ``std``); every 1-D parameter 0: Qwen3-Next's norms are zero-centred
    (scale 1 + w), and A_log = 0, dt_bias = 0 are valid Gated DeltaNet decays."""
    gen = None
    for p in model.parameters():
        if gen is None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(std))
        else:
            p.zero_()


@torch.no_grad()
def fill_synthetic_experts(model, std: float, seed: int) -> int:
    """Random routed experts in their storage format, one layer at a time (FP8/NF4: quantized from a bf16
    layer that exists only meanwhile; bf16: drawn in place). Returns the number of expert modules."""
    from qnext.megatron.experts import GroupedGemmExperts

    gen = None
    n = 0
    for m in model.modules():
        if not isinstance(m, GroupedGemmExperts):
            continue
        for sub in (m.linear_fc1, m.linear_fc2):
            dev = sub.device if sub.quantized else sub.weight.device
            if gen is None:
                gen = torch.Generator(device=dev).manual_seed(seed)
            w = torch.randn(tuple(sub.shape), generator=gen, device=dev, dtype=torch.bfloat16).mul_(std)
            if sub.quantized:
                sub.set_quantized_(w)
            else:
                sub.weight.copy_(w)
            del w
        n += 1
    return n


def ep_emulation(hf: dict, experts: int, tokens: int) -> dict:
    """Sets ``hf["num_experts"] = experts`` and returns what the run stands for (one GPU of an expert-parallel
    run of the config's model, and the all-to-all it leaves out: ``qnext.throughput.ep_emulation_record``).
    Empty when ``experts`` is 0 or the config's own count."""
    from qnext.errors import UserError
    from qnext.throughput import ep_emulation_record

    total, topk = int(hf.get("num_experts") or 0), int(hf.get("num_experts_per_tok") or 0)
    if not experts or experts == total:
        return {}
    if experts < topk or total % experts:
        raise UserError(f"--experts {experts} with {total} experts, top-{topk}",
                        hint=f"use a divisor of {total} that is at least {topk} (64 = one EP8 rank of 512)")
    record = ep_emulation_record(dict(hf), experts, tokens)  # the tokens of one step
    hf["num_experts"] = experts
    return record


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "models/qwen3_next_80b_a3b/config.json", help="HF config.json")
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the config's)")
    ap.add_argument("--experts", type=int, default=0,
                    help="routed experts per MoE layer (0: the config's). Fewer than the config's emulates one GPU of "
                         "an expert-parallel run: --layers 48 --experts 64 is one EP8 rank of the 80B model with balanced "
                         "routing (each expert gets the tokens it would get there); the all-to-all is left out and "
                         "estimated in the record")
    ap.add_argument("--base-dtype", default="fp8", choices=["bf16", "fp8", "nf4"],
                    help="storage of the routed experts (nf4 needs torchao)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--mbs", type=int, default=1,
                    help="packed rows per step, in one forward (as the training entry's train.micro_batch_size: on a "
                         "GPU the rows go as one thd row of mbs x seq tokens)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="leading steps left out of the means")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--data", type=Path, default=REPO / "data/sample/chats.jsonl")
    ap.add_argument("--repeat", type=int, default=16, help="the chats this many times over (full packed rows)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--profile", action="store_true",
                    help="one extra step under torch.profiler, left out of the means: <out>/profile_step<N>_rank0.txt")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from qnext.config import load_config
    from qnext.config.schema import LoraConfig
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer
    from qnext.fsutil import atomic_write_text
    from qnext.lora import apply_lora, lora_parameters
    from qnext.megatron.data import megatron_batch, packed_seq_params, to_device
    from qnext.megatron.model import build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device, initialize_parallel, use_torch_gdn_path
    from qnext.metrics import peak_memory_gib
    from qnext.plan import GIB, plan
    from qnext.throughput import mfu, step_flops
    from train_throughput import measure_matmul_peak, repeated_chats

    from qnext.megatron.config import load_hf_config

    hf = load_hf_config(args.model)  # a missing or malformed file is one message, exit 2
    if args.base_dtype == "nf4":
        from qnext.quant.nf4 import _torchao

        _torchao()  # without torchao: its one message before anything is built
    if args.steps < 1 or args.warmup < 0 or args.seq < 16 or args.repeat < 1 or args.mbs < 1:
        raise UserError(f"--steps {args.steps} --warmup {args.warmup} --seq {args.seq} --repeat {args.repeat} "
                        f"--mbs {args.mbs}", hint="need steps >= 1, warmup >= 0, seq >= 16, repeat >= 1, mbs >= 1")
    if args.layers:
        hf["num_hidden_layers"] = args.layers
        if isinstance(hf.get("layer_types"), list):
            hf["layer_types"] = hf["layer_types"][:args.layers]
    emulated = ep_emulation(hf, args.experts, args.seq * args.mbs)  # before the override: the model it stands for
    cpu = args.device == "cpu"
    initialize_parallel(None, backend="gloo" if cpu else None)  # a world of one unless torchrun set RANK
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if cpu else torch.bfloat16
    overrides = {"qnext_expert_base": args.base_dtype, "calculate_per_token_loss": True}
    t0 = time.perf_counter()
    if cpu:
        use_torch_gdn_path()
        with construction_device("cpu"):
            model = build_model(hf, None, dtype, use_te=False,
                                config_overrides={**overrides, **CPU_BUILD_OVERRIDES, "deterministic_mode": True})
    else:
        model = build_model(hf, None, dtype, use_te=False, config_overrides={**overrides, "perform_initialization": False})
    init_synthetic_(model, std=0.02, seed=0)
    n_experts = fill_synthetic_experts(model, std=0.02, seed=0)
    model = apply_lora(model, LoraConfig(r=args.lora_r, alpha=2.0 * args.lora_r), hf_config=hf, seed=0)
    build_s = time.perf_counter() - t0
    startup_peak = peak_memory_gib(device)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=not cpu)
    print(f"[synthetic] built {hf['num_hidden_layers']} layers, {n_experts} expert modules ({args.base_dtype}), "
          f"{sum(p.numel() for p in params) / 1e6:.1f}M LoRA parameters in {build_s:.0f}s; "
          f"start-up peak {startup_peak:.1f} GiB", flush=True)

    tok = load_tokenizer(None)
    pack = not cpu  # megatron's CPU (deterministic) GDN path takes no packed rows: one chat per row there
    data = args.data
    if pack and args.repeat > 1:  # the chats repeated, so that (nearly) every packed row is full at any --seq
        args.out.mkdir(parents=True, exist_ok=True)
        data = repeated_chats(args.data, args.out, args.repeat)
    train, _, _ = build_datasets(data, tok, args.seq, pack=pack, valid_fraction=0.0)
    train = [s for s in train if len(s["input_ids"]) > args.seq // 2] or train  # full rows only (packs fill)
    fill = sum(len(s["input_ids"]) for s in train) / (len(train) * args.seq)
    print(f"[synthetic] data: {len(train)} rows of up to {args.seq} tokens, {100 * fill:.1f}% filled", flush=True)
    pad = int(tok.pad_token_id) % int(hf["vocab_size"])

    def recipe(hf_config) -> list[str]:
        return ["recipe=qwen3_next_80b_lora_1gpu", f"model.hf_config={hf_config}", f"data.seq_length={args.seq}",
                f"train.global_batch_size={args.mbs}", f"train.micro_batch_size={args.mbs}", "parallel.recompute=none",
                f"train.lora.r={args.lora_r}", f"train.lora.base_dtype={args.base_dtype}"]

    cfg = load_config(recipe(args.model))
    if args.layers or args.experts:  # the plan reads the config file: write the overridden one next to the results
        args.out.mkdir(parents=True, exist_ok=True)
        cfg_path = args.out / "model_config.json"
        atomic_write_text(cfg_path, json.dumps(hf, indent=1))
        cfg = load_config(recipe(cfg_path))
    planned = plan(cfg, world_size=1)

    model.train()
    records = []
    if not cpu:
        torch.cuda.reset_peak_memory_stats(device)
    from qnext.metrics import PROFILE_ENV, StepProfile

    if args.profile:
        os.environ[PROFILE_ENV] = str(args.steps + 1)
    else:
        os.environ.pop(PROFILE_ENV, None)  # an inherited QNEXT_PROFILE_STEP would cut the timed steps short
    for step in range(args.steps + (1 if args.profile else 0)):
        rows = [train[(step * args.mbs + i) % len(train)] for i in range(args.mbs)]
        batch = megatron_batch(rows, pad, args.seq, pack=pack)
        batch["tokens"] = batch["tokens"] % int(hf["vocab_size"])
        batch["labels"] = batch["labels"] % int(hf["vocab_size"])
        batch = to_device(batch, device)
        if not cpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        prof = StepProfile(step + 1, args.out)
        with prof, construction_device("cpu") if cpu else contextlib.nullcontext():
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                              packed_seq_params=packed_seq_params(batch))
            mask = batch["loss_mask"]
            loss = (per_token.float() * mask).sum() / mask.sum().clamp_min(1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not cpu:
            torch.cuda.synchronize()
        if prof.active:
            print(f"[synthetic] profiled step {step + 1} (left out of the means): {prof.path}", flush=True)
            break
        dt = time.perf_counter() - t
        tokens = int(sum(batch["chat_lengths"]))
        flops = step_flops(hf, batch["chat_lengths"], lora=True)
        rec = {"step": step + 1, "loss": float(loss), "step_time_s": dt, "tokens": tokens,
               "tokens_per_s": tokens / dt, "tflops": flops / dt / 1e12}
        records.append(rec)
        print(f"[synthetic] step {step + 1}/{args.steps} loss {rec['loss']:.4f} {dt:.3f}s {rec['tokens_per_s']:.0f} tok/s "
              f"peak {peak_memory_gib(device):.1f} GiB", flush=True)
        if not math.isfinite(rec["loss"]):
            raise SystemExit(f"loss is {rec['loss']} at step {step + 1}")

    peak_measured = None if cpu else measure_matmul_peak()["tflops"]
    timed = records[args.warmup:] or records
    total_t = sum(r["step_time_s"] for r in timed)
    tps = sum(r["tokens"] for r in timed) / total_t
    tflops = sum(r["tflops"] * r["step_time_s"] for r in timed) / total_t
    peak = peak_memory_gib(device)
    result = {
        "what": "LoRA steps with synthetic (random) base weights; real sample chats, packed",
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if not cpu else "cpu",
        "layers": int(hf["num_hidden_layers"]), "experts": int(hf.get("num_experts") or 0), "gpus": 1,
        "hidden": int(hf["hidden_size"]), "seq": args.seq, "micro_batch": args.mbs, "row_fill": round(fill, 4), "lora_r": args.lora_r, "base_dtype": args.base_dtype,
        "synthetic_weights": True, "steps": args.steps, "warmup": args.warmup,
        "tokens_per_s_per_gpu": tps, "tflops_per_gpu": tflops,
        "mfu": mfu(tflops, torch.cuda.get_device_name(device)) if not cpu else None,
        "matmul_peak_tflops": peak_measured, "mfu_measured_peak": tflops / peak_measured if peak_measured else None,
        **emulated,
        "peak_mem_gib": peak, "startup_peak_gib": startup_peak,
        "planned_peak_gib": planned.peak / GIB, "planned_step_gib": planned.step_peak / GIB,
        "planned_startup_gib": planned.load / GIB,
        "peak_vs_plan": peak / (planned.step_peak / GIB),
        "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
        "losses": [r["loss"] for r in records], "step_times_s": [r["step_time_s"] for r in records],
        "step_tokens": [r["tokens"] for r in records],
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "leaves_out": "checkpoint load, DP/EP communication, megatron's optimizer wrapper, real weights",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "lora_synthetic.json", json.dumps(result, indent=1) + "\n")
    print("[synthetic] " + json.dumps({k: v for k, v in result.items() if k not in ("losses", "step_times_s", "step_tokens")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
