#!/usr/bin/env python
"""Packed-sequence attention and RoPE of the TE-free Megatron stack, timed side by side in one process:
forward + backward of one pack of sample chats (their real lengths, repeated until the pack is full),
Qwen3-Next's attention shapes (16 query heads, 2 KV groups, head dim 256, 25% rotary).

- attention: ``SDPAttention`` with ``QNEXT_PACKED_ATTENTION=loop`` (one SDPA call per chat), ``masked``
  (one call with a block-diagonal causal mask) and, on GPUs, ``varlen`` (torch's flash ``varlen_attn``);
- RoPE: megatron's per-sequence ``_apply_rotary_pos_emb_thd`` and qnext's one-pass replacement.

Each variant's output and gradients are compared with the first one's. Writes ``<out>/packed_attention.json``
and ``.md`` with the GPU name, times in ms and the ratios.

  python benchmarks/packed_attention.py --out benchmarks/results/packed_attention_h200     (GPU, bf16)
  python benchmarks/packed_attention.py --out /tmp/pa --device cpu --tokens 512 --repeats 2 (a CPU smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def chat_lengths(tokens: int) -> list[int]:
    """The sample chats' token counts, in file order, cycled until ``tokens`` are filled (the last cut)."""
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer

    train, _, _ = build_datasets(REPO / "data/sample/chats.jsonl", load_tokenizer(None), 4096, pack=False,
                                 valid_fraction=0.0)
    base = [len(s["input_ids"]) for s in train]
    out: list[int] = []
    while sum(out) < tokens:
        out.append(min(base[len(out) % len(base)], tokens - sum(out)))
    return out


def timed(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in ms (CUDA-synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the pack")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from qnext.megatron.attention import SDPAttention, varlen_usable
    from qnext.megatron.config import hf_to_transformer_config
    from qnext.fsutil import atomic_write_text
    from qnext.megatron.compat.thd_rope import _thd_rope_vectorized

    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    hf = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    nh, ng, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    rot = int(hd * hf.get("partial_rotary_factor", 1.0))
    lengths = chat_lengths(args.tokens)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=dev)
    t = args.tokens
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                          max_seqlen_kv=max(lengths))

    class _PG:  # a TP group of one
        tp = type("G", (), {"size": staticmethod(lambda: 1)})()

    cfg = hf_to_transformer_config(hf, None, dtype).config
    attn = SDPAttention(cfg, 1, AttnMaskType.causal, pg_collection=_PG())
    g = torch.Generator(device="cpu").manual_seed(0)
    q0, k0, v0 = (torch.randn(t, n, hd, generator=g).to(dev, dtype) for n in (nh, ng, ng))
    grad_out = torch.randn(t, nh * hd, generator=g).to(dev, dtype)

    def attention(mode: str):
        os.environ["QNEXT_PACKED_ATTENTION"] = mode
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))

        def step():
            for x in (q, k, v):
                x.grad = None
            out = attn(q, k, v, None, packed_seq_params=psp)
            out.backward(grad_out)
            return out

        ms = timed(step, args.repeats, dev)
        out = step()
        return ms, [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]

    inv = 1.0 / (hf.get("rope_theta", 10000.0) ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    f = torch.outer(torch.arange(max(lengths) + 1, dtype=torch.float32), inv)
    freqs = torch.cat([f, f], -1)[:, None, None, :].to(dev)  # megatron's table: [max_seqlen, 1, 1, rot]

    class _CP:  # a context-parallel group of one
        size = staticmethod(lambda: 1)
        rank = staticmethod(lambda: 0)

    loop_rope = rope_utils._apply_rotary_pos_emb_thd
    loop_rope = getattr(loop_rope, "__wrapped__", loop_rope)
    x0 = torch.randn(t, nh, hd, generator=g).to(dev, dtype)
    gx = torch.randn(t, nh, hd, generator=g).to(dev, dtype)

    def rope(fn):
        x = x0.clone().requires_grad_(True)

        def step():
            x.grad = None
            y = fn(x, cu, freqs, cp_group=_CP())
            y.backward(gx)
            return y

        ms = timed(step, args.repeats, dev)
        y = step()
        return ms, [y.detach().float(), x.grad.float()]

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    rows = []
    attention_variants = {"loop": lambda: attention("loop"), "masked": lambda: attention("masked")}
    if varlen_usable(q0):
        attention_variants["varlen"] = lambda: attention("varlen")
    for part, variants in (("attention", attention_variants),
                           ("rope", {"megatron loop": lambda: rope(loop_rope),
                                     "one pass": lambda: rope(_thd_rope_vectorized(loop_rope))})):
        ref = None
        for name, fn in variants.items():
            ms, tensors = fn()
            if ref is None:
                ref = (ms, tensors)
            rows.append({"part": part, "variant": name, "ms_fwd_bwd": round(ms, 3), "speedup_vs_first": round(ref[0] / ms, 2),
                         "max_rel_l2_vs_first": max(rel(a, b) for a, b in zip(tensors, ref[1]))})
            print(f"[packed_attention] {part} {name}: {ms:.2f} ms", flush=True)
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    env = {"date": time.strftime("%Y-%m-%d"), "device": gpu, "dtype": str(dtype).removeprefix("torch."),
           "tokens": t, "chats": len(lengths), "heads": [nh, ng, hd], "rotary_dim": rot, "repeats": args.repeats,
           "torch": torch.__version__, "command": "python benchmarks/packed_attention.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "packed_attention.json", json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = [f"# Packed attention and RoPE, forward + backward ({env['date']}, {gpu}, {env['dtype']})", "",
             f"Command: `{env['command']}`; {t} tokens in {len(lengths)} chats (the sample's lengths), heads "
             f"{nh}/{ng} x {hd}, rotary {rot}; median of {args.repeats}.", "",
             "| part | variant | ms (fwd+bwd) | speed-up vs first | max rel. L2 vs first (out, grads) |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['part']} | {r['variant']} | {r['ms_fwd_bwd']:.2f} | {r['speedup_vs_first']:.2f}x | "
              f"{r['max_rel_l2_vs_first']:.1e} |" for r in rows]
    atomic_write_text(args.out / "packed_attention.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
