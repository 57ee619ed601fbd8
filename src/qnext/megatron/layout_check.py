"""Layout invariance of one training step: the loss and every gradient of the same global batch at any
TP / EP / ETP / PP / sequence-parallel layout, compared tensor by tensor with another layout's.

Run under torchrun, one process per rank (CPU with gloo, or GPUs with NCCL)::

    torchrun --nproc-per-node 2 -m qnext.megatron.layout_check --hf H --megatron-ckpt M --tp 2 --out D/tp2
    python -m qnext.megatron.layout_check --compare D/tp1 D/tp2 ...

What one run does, the way the Megatron training entry does it: build this rank's part of the model
(``qnext.megatron.model.build_model``), load the converted ``torch_dist`` checkpoint, optionally attach
LoRA, wrap it in megatron's ``DistributedDataParallel`` and run forward and backward over the global
batch, one sample per micro-batch, this data-parallel rank's share of it (``qnext.megatron.data``'s
``forward_step``/``loss_func``; pipeline stages exchange activations and their gradients point to
point). ``finalize_model_grads`` then does megatron's gradient reductions (data-parallel, expert
data-parallel, sequence-parallel norms, embeddings) and the per-token normalisation. The gradients are
read back through the model's ``sharded_state_dict``, the same map a checkpoint save uses, so the chunks
of every rank assemble into whole tensors under the checkpoint's keys (LoRA: the adapters' gradients
as HF PEFT tensors). Rank 0 writes ``grads.pt`` and ``summary.json`` (loss, token count, gradient
norm, per-tensor norms) into ``--out``.

``--compare`` reports, for every layout against the first: relative difference of the loss and of
the gradient norm, and the largest per-tensor relative L2 difference of the gradients.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..errors import UserError, cli_main
from ..fsutil import atomic_write_text


def _global_batch(hf_config: dict, seq: int, samples: int, data: Path) -> tuple[list[dict], int]:
    """The first ``samples`` training chats of ``data`` that fit ``seq`` tokens; token ids folded into
    the model's vocabulary when it is smaller than the tokenizer's (tiny test models). Returns them and
    the pad id."""
    from ..data.dataset import build_datasets
    from ..data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    train, _, _ = build_datasets(data, tok, seq, pack=False, valid_fraction=0.05)
    vocab = int(hf_config["vocab_size"])
    chosen = [s for s in train if len(s["input_ids"]) <= seq][:samples]
    if len(chosen) < samples:
        raise UserError(f"{data} has only {len(chosen)} training chats of at most {seq} tokens; {samples} needed",
                        hint="lower --samples or raise --seq")
    fold = [{**s, "input_ids": [t % vocab for t in s["input_ids"]],
             "labels": [t % vocab if t >= 0 else t for t in s["labels"]]} for s in chosen]
    return fold, int(tok.pad_token_id) % vocab


def _stage_step(ddp, batch: dict, hidden_shape: tuple[int, ...], dtype: torch.dtype, device: str):
    """Forward and backward of one micro-batch through this pipeline stage; returns the loss report
    [sum, count] on the last stage, None elsewhere."""
    from megatron.core import parallel_state as ps

    from .data import forward_step

    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    inner = ddp.module
    received = None
    if not first:
        received = torch.empty(hidden_shape, dtype=dtype, device=device)
        torch.distributed.recv(received, src=ps.get_pipeline_model_parallel_prev_rank())
        received.requires_grad_(True)
        inner.set_input_tensor(received)
    output, loss_fn = forward_step(iter([batch]), ddp)
    report = None
    if last:
        loss, _count, rep = loss_fn(output)
        loss.backward()  # the sum: finalize_model_grads divides by the global batch's token count
        report = rep["lm loss"].detach()
    else:
        torch.distributed.send(output.detach().contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        grad = torch.empty_like(output)
        torch.distributed.recv(grad, src=ps.get_pipeline_model_parallel_next_rank())
        torch.autograd.backward(output, grad)
    if received is not None:
        torch.distributed.send(received.grad.contiguous(), dst=ps.get_pipeline_model_parallel_prev_rank())
    return report


@contextlib.contextmanager
def _grads_as_data(params: Sequence[torch.nn.Parameter]):
    """Inside: every parameter's ``data`` is its reduced gradient (``main_grad``), so that the model's
    ``sharded_state_dict`` hands out gradient chunks under the checkpoint's keys."""
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad  # fp32 (grad_reduce_in_fp32), also for bf16 weights: nothing is rounded
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _gradient_chunks(model, params: Sequence[torch.nn.Parameter], replicated: frozenset = frozenset()) -> list[tuple]:
    """(key, global shape, global offset, chunk, main) for every main-replica chunk of a trained weight,
    and (``main`` False) every other replica of the keys in ``replicated``: the tensors the weight map
    says are whole on every tensor-parallel rank (``Rule.split``), whose copies must agree."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from .model import _sharded_metadata

    with _grads_as_data(params):
        storages = {p.data.untyped_storage().data_ptr() for p in params}
        sd = model.sharded_state_dict(metadata=_sharded_metadata())
        apply_factories(sd)
        rows = []
        for v in nested_values(sd):
            if not isinstance(v, ShardedTensor) or not torch.is_tensor(v.data):
                continue
            if v.data.untyped_storage().data_ptr() not in storages:
                continue
            main = all(r == 0 for r in v.replica_id)
            if main or v.key in replicated:
                rows.append((v.key, tuple(v.global_shape), tuple(v.global_offset),
                             v.data.detach().float().cpu().clone(), main))
    return rows


def replicated_keys(hf: dict) -> frozenset:
    """Checkpoint keys of the tensors the weight map marks replicated over tensor parallelism."""
    from ..models.qwen3_next import build_weight_map
    from ..models.weight_map import REPLICATED

    return frozenset(piece.key for m in build_weight_map(hf).mappings if m.rule.split == REPLICATED for piece in m.pieces)


def replica_disagreement(rows: list[tuple], full: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(copies compared, largest relative L2 difference of a copy to the assembled tensor)."""
    worst, n = 0.0, 0
    for key, _, offset, chunk, main in rows:
        if main:
            continue
        shape = (1,) * (len(offset) - chunk.dim()) + tuple(chunk.shape)
        ref = full[key][tuple(slice(o, o + sz) for o, sz in zip(offset, shape))].reshape(chunk.shape)
        worst = max(worst, _rel(chunk, ref))
        n += 1
    return n, worst


def _assemble(rows: list[tuple]) -> dict[str, torch.Tensor]:
    """Whole tensors from the chunks of every rank; every element must be written exactly once."""
    full: dict[str, torch.Tensor] = {}
    cover: dict[str, torch.Tensor] = {}
    for key, gshape, offset, chunk, *main in rows:
        if main and not main[0]:
            continue  # another replica: checked by replica_disagreement
        if key not in full:
            full[key] = torch.zeros(gshape, dtype=torch.float32)
            cover[key] = torch.zeros(gshape, dtype=torch.int16)
        shape = (1,) * (len(offset) - chunk.dim()) + tuple(chunk.shape)  # leading (expert) axes of size 1
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        full[key][index] = chunk.reshape(shape)
        cover[key][index] += 1
    bad = [k for k, c in cover.items() if not bool((c == 1).all())]
    if bad:
        raise RuntimeError(f"gradient chunks do not tile {len(bad)} tensor(s) exactly once, e.g. {bad[:3]}")
    return full


def _seed_lora_b(model, std: float, seed: int) -> None:
    """Give every LoRA B a non-zero value, the same whole tensor at every layout (drawn per HF module,
    then sharded as the branch is), so that A's gradients are not trivially zero at the first step."""
    import zlib

    from ..lora.apply import lora_modules

    with torch.no_grad():
        for module in lora_modules(model).values():
            for br in module.lora.values():
                bp = br.plan
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(bp.hf_module.encode()))
                b_full = torch.randn(bp.out_features, br.lora_A.shape[0], generator=g) * std
                _, b = module.lora_plan.shard(bp, torch.zeros(br.lora_A.shape[0], bp.in_features), b_full)
                br.lora_B.copy_(b.to(br.lora_B.dtype))


def run(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from .config import ParallelSizes
    from .data import megatron_batch
    from .model import build_model, load_torch_dist
    from .compat.cpu import cpu_training
    from .parallel import CPU_BUILD_OVERRIDES, destroy_parallel, initialize_parallel, use_torch_gdn_path

    hf_dir = Path(args.hf)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"--hf {hf_dir}: no config.json there", hint="pass the HF checkpoint directory")
    if not Path(args.megatron_ckpt).is_dir():
        raise UserError(f"--megatron-ckpt {args.megatron_ckpt}: no such directory",
                        hint="convert the --hf checkpoint first: make convert HF=<hf dir> OUT=<dir>")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (args.tp * args.pp) or world % (args.ep * args.etp * args.pp):
        raise UserError(f"{world} rank(s) do not fit --tp {args.tp} --pp {args.pp} --ep {args.ep} --etp {args.etp}",
                        hint="start torchrun with --nproc-per-node a multiple of tp x pp and of ep x etp x pp")
    cpu = args.device == "cpu"
    p = ParallelSizes(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sequence_parallel=args.sp)
    initialize_parallel(p, seed=args.seed, backend="gloo" if cpu else None)
    device = "cpu" if cpu else f"cuda:{torch.cuda.current_device()}"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    overrides: dict[str, Any] = {"calculate_per_token_loss": True}
    if args.moe_aux_loss_coeff is not None:
        overrides["moe_aux_loss_coeff"] = args.moe_aux_loss_coeff
    if cpu:
        use_torch_gdn_path()
        overrides.update(CPU_BUILD_OVERRIDES, deterministic_mode=True)
        # megatron-core's jit_fuser (torch.compile) of the GDN input preparation miscompiles a bf16 input
        # with transposed strides under torch 2.11 on AVX-512 CPUs (NaN or values off by ~1700x); eager is right
        torch._dynamo.config.disable = True
    on_device = cpu_training if cpu else contextlib.nullcontext
    hf = json.loads((hf_dir / "config.json").read_text())
    samples, pad_id = _global_batch(hf, args.seq, args.samples, Path(args.data))

    with on_device():
        model = build_model(hf_dir, p, dtype, False if cpu else None, config_overrides=overrides)
    load_torch_dist(model, args.megatron_ckpt)
    if args.split_k > 1:
        _round_row_parallel_as_split(model, args.split_k)
    if args.mode == "lora":
        from ..config.schema import LoraConfig
        from ..lora import apply_lora

        model = apply_lora(model, LoraConfig(r=args.lora_rank, alpha=2.0 * args.lora_rank), hf_config=hf, seed=args.seed)
        if args.lora_b_std > 0:
            _seed_lora_b(model, args.lora_b_std, args.seed)
    with on_device():
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=False, overlap_grad_reduce=False), model)
    ddp.zero_grad_buffer()
    ddp.train()

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = samples[dp_rank::dp]
    seq_local = args.seq // args.tp if args.sp else args.seq
    hidden_shape = (seq_local, 1, int(hf["hidden_size"]))
    reports = []
    with on_device():
        for sample in mine:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v)
                     for k, v in megatron_batch([sample], pad_id, args.seq, pack=False).items()}
            rep = _stage_step(ddp, batch, hidden_shape, dtype, device)
            if rep is not None:
                reports.append(rep)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        local = torch.stack(reports).sum(0) if reports else torch.zeros(2, device=device)
        num_tokens = local[1].round().to(torch.int) if last else torch.zeros((), dtype=torch.int, device=device)
        finalize_model_grads([ddp], num_tokens=num_tokens.reshape(()))

    # loss over the global batch: sum over the last stage's data-parallel ranks
    totals = local.double().cpu() if last else torch.zeros(2, dtype=torch.float64)
    totals = totals.to(device)
    torch.distributed.all_reduce(totals)  # non-last stages add zeros; the last stage's TP ranks repeat it
    totals = (totals / args.tp).cpu()

    trained = [q for q in ddp.module.parameters() if q.requires_grad]
    if args.mode == "lora":
        from ..lora.peft_io import _gather_to_rank0, hf_lora_tensors

        for q in trained:
            q.grad = q.main_grad
        with on_device():
            grads = _gather_to_rank0(hf_lora_tensors(ddp.module, grads=True))
    else:
        rows = _gradient_chunks(ddp.module, trained, replicated_keys(hf))
        parts = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
        torch.distributed.gather_object(rows, parts, dst=0)
        grads, replicas = None, (0, 0.0)
        if parts is not None:
            every = [r for part in parts for r in part]
            grads = _assemble(every)
            replicas = replica_disagreement(every, grads)
    summary = None
    if torch.distributed.get_rank() == 0:
        norms = {k: float(v.double().norm()) for k, v in sorted(grads.items())}
        summary = {
            "layout": {"tp": args.tp, "pp": args.pp, "ep": args.ep, "etp": args.etp, "sp": args.sp,
                       "world_size": torch.distributed.get_world_size(), "dp": dp},
            "mode": args.mode, "dtype": args.dtype, "device": args.device,
            "samples": len(samples), "seq": args.seq,
            "loss": float(totals[0] / totals[1]), "loss_tokens": int(round(float(totals[1]))),
            "grad_norm": math.sqrt(sum(n * n for n in norms.values())),
            "tensors": len(norms), "grad_norms": norms,
        }
        if args.mode != "lora":
            summary["replicas_compared"], summary["replica_max_rel_diff"] = replicas
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "grads.pt.tmp"
        torch.save(grads, tmp)
        tmp.replace(out / "grads.pt")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        print(f"[layout] {_name(summary['layout'])}: loss {summary['loss']:.6f} over {summary['loss_tokens']} tokens, "
              f"grad norm {summary['grad_norm']:.6f} ({len(norms)} tensors) -> {out}", flush=True)
    destroy_parallel()
    return summary


def _round_row_parallel_as_split(model, parts: int) -> int:
    """Make every row-parallel linear at TP=1 compute its product as ``parts`` partial products over
    slices of the input dimension, summed in the working dtype, as the all-reduce of TP=``parts`` does:
    the same function, with TP's rounding. A 1-rank bf16 run so changed measures how much a tensor's
    gradient moves with rounding alone (``compare``'s noise). Returns the number of layers changed."""
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    def split(original):
        def forward_impl(input, weight, *args, **kwargs):
            xs, ws = input.chunk(parts, dim=-1), weight.chunk(parts, dim=1)
            out = original(xs[0], ws[0], *args, **kwargs)
            for x, w in zip(xs[1:], ws[1:]):
                out = out + original(x, w, *args, **kwargs)
            return out

        return forward_impl

    n = 0
    for m in model.modules():
        if isinstance(m, RowParallelLinear) and m.tp_group.size() == 1 and m.weight.shape[1] % parts == 0:
            m._forward_impl = split(m._forward_impl)
            n += 1
    return n


def _name(layout: dict) -> str:
    parts = [f"{k}{layout[k]}" for k in ("tp", "ep", "etp", "pp") if layout.get(k, 1) > 1]
    return ("_".join(parts) or "1rank") + ("_sp" if layout.get("sp") else "")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (the norm of a when b is zero)."""
    denom = float(b.double().norm())
    diff = float((a.double() - b.double()).norm())
    return diff / denom if denom > 0 else float(a.double().norm())


def compare(dirs: Sequence[Path], noise: Optional[Path | Sequence[Path]] = None, floor: float = 5e-2) -> list[dict[str, Any]]:
    """Every layout against the first: loss, gradient norm, worst per-tensor relative L2 difference.

    ``noise``: runs of the first layout with other, equally valid rounding, when the runs are bf16: the
    same run in float32, and the same run with its row-parallel products rounded as TP2 rounds them
    (``--split-k 2``). Each tensor's limit is then ``max(2 x its largest difference to a noise run, floor)``:
    in bf16 the router and the experts behind it change by tens of percent with rounding alone (a token
    routed to another expert), and GDN's ``A_log``/``dt_bias`` gradients are sums that cancel 17-22x, so
    one fixed tolerance would fail every bf16 run or pass real errors elsewhere; measured per tensor, a
    tensor whose rounding noise is small keeps a tight limit (a halved head fails it). ``worst_excess``
    is the largest difference / limit (at most 1 passes)."""
    noises = [] if noise is None else [Path(noise)] if isinstance(noise, (str, Path)) else [Path(n) for n in noise]
    for d in [*dirs, *noises]:
        if not (Path(d) / "summary.json").is_file() or not (Path(d) / "grads.pt").is_file():
            raise UserError(f"{d}: no summary.json and grads.pt there", hint="give the --out directories of finished runs")
    ref_dir = Path(dirs[0])
    ref = json.loads((ref_dir / "summary.json").read_text())
    ref_grads = torch.load(ref_dir / "grads.pt")
    limits: dict[str, float] = {}
    for n in noises:
        other = torch.load(n / "grads.pt")
        for k, r in ref_grads.items():
            if k in other:
                limits[k] = max(limits.get(k, floor), 2 * _rel(r, other[k]))
    rows = []
    for d in dirs[1:]:
        s = json.loads((Path(d) / "summary.json").read_text())
        g = torch.load(Path(d) / "grads.pt")
        if set(g) != set(ref_grads):
            missing, extra = sorted(set(ref_grads) - set(g)), sorted(set(g) - set(ref_grads))
            raise RuntimeError(f"{d}: other tensors than {ref_dir}: missing {missing[:3]}, extra {extra[:3]}")
        errs = {k: _rel(g[k], r) for k, r in ref_grads.items()}
        worst_key = max(errs, key=lambda k: errs[k])
        row = {
            "layout": _name(s["layout"]), "reference": _name(ref["layout"]),
            "loss": s["loss"], "loss_ref": ref["loss"], "loss_rel_diff": abs(s["loss"] - ref["loss"]) / abs(ref["loss"]),
            "tokens_equal": s["loss_tokens"] == ref["loss_tokens"],
            "grad_norm": s["grad_norm"], "grad_norm_ref": ref["grad_norm"],
            "grad_norm_rel_diff": abs(s["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"],
            "worst_tensor": worst_key, "worst_tensor_rel_l2": errs[worst_key], "tensors": len(g),
            # copies of replicated tensors (Rule.split) on the other TP ranks against the main one
            "replicas_compared": s.get("replicas_compared"), "replica_max_rel_diff": s.get("replica_max_rel_diff"),
        }
        if limits:
            excess = {k: e / limits.get(k, floor) for k, e in errs.items()}
            key = max(excess, key=lambda k: excess[k])
            row.update(worst_excess=excess[key], worst_excess_tensor=key, worst_excess_limit=limits.get(key, floor))
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    noisy = any("worst_excess" in r for r in rows)
    lines = ["| layout | vs | loss | rel. diff | grad norm | rel. diff | worst tensor (rel. L2) |"
             + (" worst tensor / its bf16 limit |" if noisy else ""),
             "|---|---|---:|---:|---:|---:|---|" + ("---|" if noisy else "")]
    for r in rows:
        line = (f"| {r['layout']} | {r['reference']} | {r['loss']:.6f} | {r['loss_rel_diff']:.1e} | "
                f"{r['grad_norm']:.6f} | {r['grad_norm_rel_diff']:.1e} | `{r['worst_tensor']}` "
                f"({r['worst_tensor_rel_l2']:.1e}) |")
        if noisy:
            line += (f" `{r['worst_excess_tensor']}` {r['worst_excess']:.2f} (limit {r['worst_excess_limit']:.1e}) |"
                     if "worst_excess" in r else " |")
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m qnext.megatron.layout_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs="+", type=Path, metavar="DIR", help="compare finished runs (first = reference)")
    ap.add_argument("--noise", type=Path, nargs="+", metavar="DIR",
                    help="with --compare of bf16 runs: the reference layout's fp32 run and/or its --split-k 2 run "
                         "(per-tensor bf16 limits)")
    ap.add_argument("--hf", help="HF checkpoint directory (config.json is read)")
    ap.add_argument("--megatron-ckpt", help="its torch_dist conversion")
    ap.add_argument("--out", help="directory for grads.pt and summary.json")
    for name in ("tp", "ep", "etp", "pp"):
        ap.add_argument(f"--{name}", type=int, default=1)
    ap.add_argument("--mode", choices=("full", "lora"), default="full")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-b-std", type=float, default=0.02,
                    help="LoRA: B drawn with this std (the same at every layout) instead of zeros, so A has gradients")
    ap.add_argument("--samples", type=int, default=4, help="global batch, one sample per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "data/sample/chats.jsonl"))
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-k", type=int, default=1,
                    help="at TP=1: row-parallel products summed from this many partial products, rounded as at "
                         "TP=N (a bf16 rounding-noise run for --compare --noise)")
    ap.add_argument("--moe-aux-loss-coeff", type=float, help="override the model's router load-balancing loss weight")
    args = ap.parse_args(argv)
    args.sp = args.tp > 1  # megatron trains MoE with TP only under sequence parallelism, as the recipes do
    if not args.compare:
        missing = [f"--{n.replace('_', '-')}" for n in ("hf", "megatron_ckpt", "out") if not getattr(args, n)]
        if missing:
            ap.error(f"{', '.join(missing)} required (or --compare DIR ...)")
        if args.seq % args.tp:
            ap.error(f"--seq {args.seq} must be divisible by --tp {args.tp}")
    return args


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        rows = compare(args.compare, noise=args.noise)
        print(markdown(rows))
        print(json.dumps(rows, indent=1))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
