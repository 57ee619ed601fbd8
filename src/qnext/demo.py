"""``make demo``: the whole FSDP path on a tiny random Qwen3-Next, on CPU, in a few minutes.

1. write a seeded random tiny checkpoint in the hub's layout (``<out>/tiny-hf``; initialisation
   scaled to the tiny width, see ``DEMO_CHECKPOINT_OVERRIDES``)
2. LoRA-train it on the bundled sample chats (recipe ``tiny_lora_cpu``), generating on the eval
   prompts before and after (``<out>/train``: metrics.jsonl, loss_curve.png, checkpoints, adapter)
3. export: the PEFT adapter (``<out>/adapter``) and a merged HF checkpoint (``<out>/merged``)
4. reload both exports (``PeftModel.from_pretrained``, ``AutoModelForCausalLM.from_pretrained``),
   compare their logits with the in-memory merged model, and generate once more from the reload
5. print a summary table; exit 1 when a target is missed (>= 90% of the memorized facts after
   training, exports matching within 1e-5, loss curve written)

``python -m qnext.demo [--out runs/demo] [key=value ...]`` (extra recipe overrides go to training).
"""
from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning threads made the
# same steps up to 15x slower. Only effective before torch loads OpenMP, hence before its import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from .errors import UserError, cli_main  # noqa: E402

DEMO_MARKER = "demo.json"
TARGET_ACCURACY = 0.90
TARGET_LOGIT_DIFF = 1e-5
# transformers initialises matrices with std = initializer_range (0.02, sized for hidden 2048). At the
# tiny width (hidden 128) that leaves activations and logits ~4x smaller than at the real width: a
# frozen LM head of rows with norm 0.23 caps every logit near 2.5, and LoRA cannot make the model
# confident of anything. std 0.08 = 0.02 * sqrt(2048 / 128) restores the real width's scale.
DEMO_CHECKPOINT_OVERRIDES = {"initializer_range": 0.08}


def _prepare_out(out: Path) -> None:
    """The demo owns its directory: replaced when it holds an earlier demo, refused otherwise."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory", hint="pass --out <new directory>")
        if any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
            raise UserError(f"{out} is not empty and is not an earlier demo", hint="pass --out <new directory>")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _compare_exports(base: Path, adapter: Path, merged: Path, prompts_path: Path | None) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .eval import generate_replies, hf_generate_fn, load_eval_prompts, score
    from .data.tokenizer import load_tokenizer
    from .models.hf import force_torch_gdn_path, load_hf_model

    force_torch_gdn_path()
    tok = load_tokenizer(base)
    text = "<|im_start|>user\nWhat day was I born?<|im_end|>\n<|im_start|>assistant\nJanuary 1, 2058<|im_end|>\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    res: dict = {}
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(load_hf_model(base, "float32", "cpu"), str(adapter)).eval()
        logits_adapter = peft_model(input_ids=ids).logits
        in_memory = peft_model.merge_and_unload().eval()
        logits_mem = in_memory(input_ids=ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        logits_merged = reloaded(input_ids=ids).logits
    res["merged_vs_in_memory"] = (logits_merged - logits_mem).abs().max().item()
    res["adapter_vs_in_memory"] = (logits_adapter - logits_mem).abs().max().item()
    # the adapter runs unmerged (x W + s B A x), the reference merged (x (W + s B A)): they differ by
    # float32 rounding, which grows with the logits' size; so this one is judged relative to it
    res["adapter_vs_in_memory_rel"] = res["adapter_vs_in_memory"] / logits_mem.abs().max().item()
    if prompts_path is not None:
        prompts = load_eval_prompts(prompts_path)
        replies = generate_replies(hf_generate_fn(reloaded), tok, prompts, max_new_tokens=24)
        res["reloaded_generations"] = score(prompts, replies)
    return res


def _accuracy(result: dict | None, kind: str = "trained") -> tuple[float, str]:
    if not result:
        return float("nan"), "-"
    k = result.get("by_kind", {}).get(kind)
    if k:
        return k["accuracy"], f"{k['correct']}/{k['total']}"
    return result["accuracy"], f"{result['correct']}/{result['total']}"


def run_demo(out: Path, overrides: list[str]) -> int:
    from .export import merge_adapter, read_adapter
    from .fsdp import train as fsdp_train
    from .fsdp.dist import init_distributed  # noqa: F401  (import cost paid before the timers)
    from .metrics import read_metrics
    from .models.tiny import write_tiny_checkpoint

    t_all = time.time()
    _prepare_out(out)
    times: dict[str, float] = {}

    t = time.time()
    ckpt = write_tiny_checkpoint(out / "tiny-hf", seed=0, overrides=DEMO_CHECKPOINT_OVERRIDES)
    times["checkpoint"] = time.time() - t
    print(f"[demo] tiny checkpoint: {ckpt} ({times['checkpoint']:.1f}s)", flush=True)

    t = time.time()
    train_dir = out / "train"
    args = ["recipe=tiny_lora_cpu", f"model.checkpoint={ckpt}", f"output_dir={train_dir}", *overrides]
    cfg, hf, plan = fsdp_train.prepare(args, world_size=1)
    summary = fsdp_train.train(cfg, hf, plan)
    times["train"] = time.time() - t

    t = time.time()
    adapter_src = train_dir / "adapter"
    read_adapter(adapter_src)
    adapter = out / "adapter"
    shutil.copytree(adapter_src, adapter)
    merged = merge_adapter(ckpt, adapter, out / "merged")
    times["export"] = time.time() - t
    print(f"[demo] exported: adapter {adapter}, merged checkpoint {merged} ({times['export']:.1f}s)", flush=True)

    t = time.time()
    from .config.validate import resolve_path

    prompts = resolve_path(cfg.data.eval_prompts) if cfg.data.eval_prompts else None
    cmp = _compare_exports(ckpt, adapter, merged, prompts)
    times["reload"] = time.time() - t
    wall = time.time() - t_all

    recs = [r for r in read_metrics(train_dir / "metrics.jsonl") if "loss" in r]
    before = _load(train_dir / "generations_before.jsonl")
    after = _load(train_dir / "generations_after.jsonl")
    acc_before, frac_before = _accuracy(before)
    acc_after, frac_after = _accuracy(after)
    acc_reload, frac_reload = _accuracy(cmp.get("reloaded_generations"))
    held_before = _accuracy(before, "heldout")[1]
    held_after = _accuracy(after, "heldout")[1]
    png = train_dir / "loss_curve.png"
    checks = {
        f"memorized facts after training >= {TARGET_ACCURACY:.0%}": acc_after >= TARGET_ACCURACY,
        f"merged export logits = in-memory merge (< {TARGET_LOGIT_DIFF:g})": cmp["merged_vs_in_memory"] < TARGET_LOGIT_DIFF,
        f"adapter export logits = in-memory merge (< {TARGET_LOGIT_DIFF:g} of max |logit|)":
            cmp["adapter_vs_in_memory_rel"] < TARGET_LOGIT_DIFF,
        "loss curve written": png.is_file(),
    }
    rows = [
        ("training steps", f"{summary.get('steps')} (global batch {cfg.train.global_batch_size}, "
                           f"LoRA r={cfg.train.lora.r}, lr {cfg.train.lr:g})"),
        ("train loss first -> last", f"{recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}" if recs else "-"),
        ("held-out loss / perplexity", f"{summary.get('eval_loss', float('nan')):.3f} / {summary.get('eval_ppl', float('nan')):.1f}"),
        ("memorized facts (trained prompts)", f"before {frac_before} ({acc_before:.0%}) -> after {frac_after} ({acc_after:.0%})"),
        ("paraphrased prompts (held out)", f"before {held_before} -> after {held_after}"),
        ("reloaded merged model, trained prompts", f"{frac_reload} ({acc_reload:.0%})"),
        ("max |logits| diff merged reload vs in-memory", f"{cmp['merged_vs_in_memory']:.2e}"),
        ("max |logits| diff adapter vs in-memory merge",
         f"{cmp['adapter_vs_in_memory']:.2e} ({cmp['adapter_vs_in_memory_rel']:.1e} of max |logit|)"),
        ("time: checkpoint / train / export / reload", " / ".join(f"{times[k]:.0f}s" for k in ("checkpoint", "train", "export", "reload"))),
        ("wall time", f"{wall:.0f}s"),
        ("loss curve", str(png)),
        ("outputs", f"{out}/ (tiny-hf, train, adapter, merged)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * 78)
    print("demo summary")
    print("-" * 78)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("-" * 78)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print("=" * 78, flush=True)
    result = {"rows": dict(rows), "checks": checks, "times": times, "wall_s": wall, "logit_diffs": {
        k: v for k, v in cmp.items() if k != "reloaded_generations"}}
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if all(checks.values()) else 1


def _load(path: Path) -> dict | None:
    if not path.is_file():
        return None
    from .eval import EvalPrompt, score

    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return score([EvalPrompt(i["prompt"], i["answer"], i.get("kind", "")) for i in items], [i["reply"] for i in items])


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qnext.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo directory (replaced if an earlier demo)")
    p.add_argument("overrides", nargs="*", help="recipe overrides for training, e.g. train.steps=50")
    args = p.parse_args(argv)
    return run_demo(args.out, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
