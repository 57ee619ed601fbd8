"""The baseline of benchmarks/train_throughput.py: what users write when they fall back to transformers (one
worker process per run, started by train_throughput.py ``--hf-worker``; its per-step records go to
``<out>/metrics.jsonl`` in the backends' format)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional


def hf_worker(mode: str, hf_dir: Path, seq: int, gbs: int, steps: int, out: Path, data: Optional[Path] = None,
              mbs: int = 1, *, lora: dict, lr: float) -> int:
    """What users write when they fall back to transformers: ``device_map="auto"`` over the visible GPUs,
    PEFT LoRA (or every weight), gradient checkpointing, torch AdamW, a plain loop; the same packed
    sequences as the backends (as one causal sequence each: transformers' SDPA has no packed mask),
    ``mbs`` of them per forward (right-padded to the longest, padding masked and unlabelled)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qnext.config import load_config
    from qnext.data.dataset import IGNORE_INDEX, build_datasets
    from qnext.data.tokenizer import load_tokenizer
    from qnext.metrics import StepProfile, peak_memory_gib, peak_reserved_gib, reset_step_peak
    from qnext.errors import start_stack_dumps
    from qnext.throughput import step_flops

    start_stack_dumps()
    if not torch.cuda.is_available():  # a CPU smoke run: fla's kernels need a GPU
        from qnext.models.hf import force_torch_gdn_path

        force_torch_gdn_path()
    cfg = load_config(["data=sample", f"data.seq_length={seq}", "data.pack=true", "data.valid_fraction=0.01"])
    train, _, _ = build_datasets(data or cfg.data.path, load_tokenizer(None), seq, pack=True, valid_fraction=0.01)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16, device_map="auto")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        from qnext.config.schema import DEFAULT_LORA_TARGETS

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                 target_modules=list(DEFAULT_LORA_TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    first = next(model.parameters()).device
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str) or [first]
    sync = lambda: [torch.cuda.synchronize(d) for d in devices if d.type == "cuda"]  # noqa: E731
    model.train()
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(steps):
            idx = [(step * gbs + i) % len(train) for i in range(gbs)]
            sync()
            for d in devices:
                reset_step_peak(d)
            t0 = time.perf_counter()
            with StepProfile(step + 1, out, 0) as prof:
                total, n_tok, lengths = 0.0, 0, []
                for m in range(0, gbs, mbs):
                    rows = [train[i] for i in idx[m:m + mbs]]
                    longest = max(len(r["input_ids"]) for r in rows)
                    pad = [longest - len(r["input_ids"]) for r in rows]
                    ids = torch.tensor([r["input_ids"] + [0] * p for r, p in zip(rows, pad)], device=first)
                    labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * p for r, p in zip(rows, pad)], device=first)
                    mask = None if not any(pad) else torch.tensor(
                        [[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)], device=first)
                    loss = model(input_ids=ids, labels=labels, attention_mask=mask).loss * len(rows) / gbs
                    loss.backward()
                    total += float(loss.detach())
                    n_tok += sum(len(r["input_ids"]) for r in rows)
                    lengths += [len(r["input_ids"]) for r in rows]
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
            dt = time.perf_counter() - t0
            flops = step_flops(hf_cfg, lengths, lora=mode == "lora")
            rec = {"step": step + 1, "loss": total, "step_time_s": dt, "tokens_per_s": n_tok / dt,
                   "tflops_per_device": flops / dt / len(devices) / 1e12,
                   "peak_mem_gib": max(peak_memory_gib(d) for d in devices),
                   "peak_reserved_gib": max((peak_reserved_gib(d) or 0.0) for d in devices),
                   "loss_tokens": sum(1 for i in idx for x in train[i]["labels"] if x != IGNORE_INDEX)}
            if prof.active:
                rec["profiled"] = 1
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"[hf] step {step + 1}: loss {total:.4f} {dt:.2f}s {rec['peak_mem_gib']:.1f} GiB", flush=True)
    return 0
