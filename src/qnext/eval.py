"""Evaluation shared by the backends: held-out loss / perplexity, and greedy generations on chosen
prompts scored by whether the expected answer appears in the reply.

The functions take small callables instead of a model class, so the FSDP trainer (a sharded model,
every rank in lockstep), the demo (a plain HF or PEFT model) and later the Megatron backend use the
same code:

- ``loss_fn(batch) -> (ce_sum, n_tokens)``: summed cross-entropy over labelled tokens of a collated batch.
- ``generate_fn(input_ids, attention_mask, generation_config) -> token ids`` (prompt + continuation).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import UserError


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    answer: str
    kind: str = ""  # optional grouping, e.g. "trained" (seen verbatim) / "heldout" (paraphrase)


def load_eval_prompts(path: str | os.PathLike) -> list[EvalPrompt]:
    """JSONL of ``{"prompt": ..., "answer": ...}``; a bad line is reported as ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval prompts file {path} not found", hint="set data.eval_prompts=<file> or data.eval_prompts=null")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})", hint="fix or remove that line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("answer"), str):
                raise UserError(f"{path}:{lineno}: expected {{\"prompt\": str, \"answer\": str}}", hint="fix that line")
            out.append(EvalPrompt(rec["prompt"], rec["answer"], str(rec.get("kind", ""))))
    if not out:
        raise UserError(f"eval prompts file {path} has no prompts", hint="add lines or set data.eval_prompts=null")
    return out


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_answer(reply: str, answer: str) -> bool:
    """Case- and whitespace-insensitive containment."""
    return _normalize(answer) in _normalize(reply)


def score(prompts: Sequence[EvalPrompt], replies: Sequence[str]) -> dict[str, Any]:
    """Overall and per-``kind`` "answer contained" accuracy, plus every item."""
    items = [
        {"prompt": p.prompt, "answer": p.answer, "kind": p.kind, "reply": r, "correct": contains_answer(r, p.answer)}
        for p, r in zip(prompts, replies)
    ]
    correct = sum(it["correct"] for it in items)
    by_kind: dict[str, dict[str, Any]] = {}
    for it in items:
        if it["kind"]:
            k = by_kind.setdefault(it["kind"], {"correct": 0, "total": 0})
            k["correct"] += int(it["correct"])
            k["total"] += 1
    for k in by_kind.values():
        k["accuracy"] = k["correct"] / k["total"]
    return {"correct": correct, "total": len(items), "accuracy": correct / max(1, len(items)), "by_kind": by_kind,
            "items": items}


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The chat template applied to one user turn, with the assistant generation prompt (the same
    rendering the training data went through, see ``qnext.data.chat``)."""
    from .data.chat import encode_prompt

    return encode_prompt([{"role": "user", "content": prompt}], tokenizer)


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def greedy_config(tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stops,
                            pad_token_id=pad, use_cache=True)


@torch.no_grad()
def generate_replies(
    generate_fn: Callable[..., torch.Tensor],
    tokenizer,
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy replies, batched with left padding; decoded without special tokens."""
    gen_cfg = greedy_config(tokenizer, max_new_tokens)
    pad = gen_cfg.pad_token_id
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_token_ids(tokenizer, p.prompt) for p in prompts[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        out = generate_fn(ids.to(device), mask.to(device), gen_cfg)
        for row in out[:, width:].tolist():
            replies.append(tokenizer.decode(row, skip_special_tokens=True))
    return replies


def hf_generate_fn(model) -> Callable[..., torch.Tensor]:
    """``generate_fn`` for a plain (unsharded) HF or PEFT model."""

    def fn(input_ids, attention_mask, gen_cfg):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)

    return fn


@torch.no_grad()
def heldout_loss(
    loss_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    all_reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over ``batches`` (this rank's share; sums
    are combined over ranks by ``all_reduce``). ``{"eval_loss", "eval_ppl", "eval_tokens"}``."""
    ce, n = 0.0, 0.0
    for batch in batches:
        c, k = loss_fn(batch)
        ce += float(c)
        n += float(k)
    if all_reduce is not None:
        ce, n = all_reduce([ce, n])
    if n == 0:
        return {}
    loss = ce / n
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(n)}


def write_generations(path: str | os.PathLike, result: dict[str, Any]) -> None:
    from .fsutil import atomic_write_text

    lines = [json.dumps(it, ensure_ascii=False) for it in result["items"]]
    atomic_write_text(path, "\n".join(lines) + "\n")


__all__ = [
    "EvalPrompt",
    "load_eval_prompts",
    "contains_answer",
    "score",
    "generate_replies",
    "hf_generate_fn",
    "heldout_loss",
    "write_generations",
]
