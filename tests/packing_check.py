"""Packed rows against each chat alone, through the FSDP backend's own pieces (``collate``,
``batch_to_device``, ``CausalLMLoss``) on a real transformers Qwen3-Next. Shared by the CPU test
(``tests/integration/test_fsdp_packing.py``) and its GPU form (``tests/gpu/test_fsdp_packing_gpu.py``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
ROWS = ([20, 12], [9, 15, 7])  # chat lengths packed into each row (row 0 gets a padding tail)


def make_chats(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Samples in the data module's format; labels on an 'assistant' span, never on a chat's first token."""
    g = torch.Generator().manual_seed(seed)
    chats = []
    for n in (n for row in ROWS for n in row):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        start = int(torch.randint(1, n // 2, (1,), generator=g))
        labels = [t if i >= start else IGNORE for i, t in enumerate(ids)]
        chats.append({"input_ids": ids, "labels": labels, "position_ids": list(range(n)), "seq_lens": [n]})
    return chats


def pack_rows(chats: list[dict]) -> list[dict]:
    rows, i = [], 0
    for lens in ROWS:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for c in chats[i:i + len(lens)]:
            for k in row:
                row[k].extend(c[k])
        rows.append(row)
        i += len(lens)
    return rows


def packed_batch(samples: list[dict], device: torch.device) -> dict[str, Any]:
    """What ``qnext.fsdp.train.Trainer._batch`` feeds the model for ``data.pack=true``."""
    from qnext.data.collate import collate
    from qnext.fsdp.model import batch_to_device

    b = collate(samples, pad_id=0)
    b.pop("attention_mask")
    b.pop("max_seqlen")
    return batch_to_device(b, device)


def solo_batch(sample: dict, device: torch.device) -> dict[str, Any]:
    from qnext.data.collate import collate
    from qnext.fsdp.model import batch_to_device

    b = collate([sample], pad_id=0)
    b.pop("cu_seqlens")
    b.pop("max_seqlen")
    return batch_to_device(b, device)


def logits_of(root, batch: dict[str, Any]) -> torch.Tensor:
    lm = root.lm
    extra = {k: v for k, v in batch.items() if k != "labels"}
    hidden = lm.model(**extra, use_cache=False).last_hidden_state
    return lm.lm_head(hidden).float()


def hand_ce(logits: torch.Tensor, labels: list[int]) -> tuple[torch.Tensor, int]:
    """Sum of -log p(label[t+1] | ..t) over positions whose next token is labelled (written out)."""
    lab = torch.tensor(labels, device=logits.device)
    nxt = lab[1:]
    keep = nxt != IGNORE
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    picked = logp[torch.arange(len(nxt), device=logits.device)[keep], nxt[keep]]
    return -picked.sum(), int(keep.sum())


def compare(root, device: torch.device, vocab: int) -> dict[str, float]:
    """Max differences between packed and solo: logits, per-chat loss, CausalLMLoss sum, gradients."""
    chats = make_chats(vocab)
    rows = pack_rows(chats)
    named = [(n, p) for n, p in root.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    root.zero_grad(set_to_none=True)
    batch = packed_batch(rows, device)
    ce_packed, n_packed, _ = root(**batch)
    ce_packed.backward()
    g_packed = [p.grad.detach().clone() for p in params]
    with torch.no_grad():
        lp = logits_of(root, batch)

    root.zero_grad(set_to_none=True)
    res = {"logits": 0.0, "chat_loss": 0.0, "hand_vs_module": 0.0}
    ce_solo_total, n_solo = 0.0, 0
    i = 0
    for r, lens in enumerate(ROWS):
        off = 0
        for n in lens:
            c = chats[i]
            sb = solo_batch(c, device)
            ce, k, _ = root(**sb)
            ce.backward()  # gradients of every chat alone accumulate
            with torch.no_grad():
                ls = logits_of(root, sb)[0]
                lpc = lp[r, off:off + n]
                res["logits"] = max(res["logits"], float((lpc - ls).abs().max()))
                hp, _ = hand_ce(lpc, c["labels"])
                hs, nk = hand_ce(ls, c["labels"])
                res["chat_loss"] = max(res["chat_loss"], float(abs(hp - hs)) / max(nk, 1))
                res["hand_vs_module"] = max(res["hand_vs_module"], float(abs(hs - ce.double())) / max(nk, 1))
            ce_solo_total += float(ce.detach())
            n_solo += int(k)
            off += n
            i += 1
    res["loss_sum_rel"] = abs(float(ce_packed.detach()) - ce_solo_total) / abs(ce_solo_total)
    res["token_count_diff"] = float(abs(int(n_packed) - n_solo))
    per_tensor = {n: float((a - p.grad).norm() / p.grad.norm().clamp_min(1e-30)) for a, (n, p) in zip(g_packed, named)}
    res["grad_rel"] = max(per_tensor.values())  # worst tensor
    res["grad_worst"] = max(per_tensor, key=per_tensor.get)  # type: ignore[arg-type]
    diff = torch.cat([(a - p.grad).flatten().double() for a, p in zip(g_packed, params)])
    res["grad_global_rel"] = float(diff.norm() / torch.cat([p.grad.flatten().double() for p in params]).norm())
    res["grad_rel_by_tensor"] = dict(sorted(per_tensor.items(), key=lambda kv: -kv[1])[:6])
    root.zero_grad(set_to_none=True)
    return res
