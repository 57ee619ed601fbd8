"""Megatron ``torch_dist`` -> HF safetensors with the original on-disk names, streaming on CPU.

The HF layout (shard file names, which tensor goes in which file and in what order, dtypes,
index metadata) comes from, in order: ``--like <original HF dir>``, the layout recorded at convert
time in ``<ckpt>/hf/layout.json``, or size-based sharding. Each shard is written tensor by tensor:
the header is computed from the known shapes, then every HF tensor is made from the Megatron
regions its rule needs (read chunk by chunk, any parallel layout) and appended.

Works on a converted checkpoint and on one a Megatron run saved (``iter_XXXXXXX``, padded vocab,
chunks per TP/EP rank, optimizer state ignored).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..fsutil import atomic_dir, ensure_empty_output_dir
from ..models.qwen3_next import MODEL_TYPE
from ..models.qwen3_next_formats import MEGATRON, build_format_map, check_format, require_format
from .dcp_io import DcpReader
from .hf_to_megatron import EXACT_FILE, LAYOUT_FILE, _bit_equal, _progress, parse_dtype
from .megatron_dir import copy_hf_side_files, hf_meta_dir, make_world_readable, resolve_iteration_dir
from .safetensors_io import ShardReader, ShardWriter, read_header, shard_files, write_index

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_PADDED_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class ExportSummary:
    out: Path
    tensors: int
    files: int
    bytes_written: int
    seconds: float
    layout: str

    def describe(self) -> str:
        return (f"exported {self.tensors} tensors into {self.files} shard(s) ({self.layout} layout): "
                f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"({self.bytes_written / 1e9 / max(self.seconds, 1e-9):.2f} GB/s) -> {self.out}")


@dataclass
class _ShardPlan:
    name: str
    tensors: list[str]
    metadata: dict
    dtypes: dict[str, torch.dtype]  # original dtypes when known


def _layout_from_hf_dir(hf_dir: Path) -> tuple[list[_ShardPlan], bool, dict]:
    files, index_map, index_meta = shard_files(hf_dir)
    plans = []
    for f in files:
        h = read_header(hf_dir / f)
        plans.append(_ShardPlan(f, list(h.entries), h.metadata, {n: e.dtype for n, e in h.entries.items()}))
    return plans, index_map is not None, index_meta


def _layout_from_record(meta: Path) -> tuple[list[_ShardPlan], bool, dict] | None:
    path = meta / LAYOUT_FILE
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    plans = [
        _ShardPlan(f["name"], [n for n, _ in f["tensors"]], dict(f.get("metadata") or {}),
                   {n: getattr(torch, d) for n, d in f["tensors"]})
        for f in rec["files"]
    ]
    return plans, bool(rec.get("had_index", True)), dict(rec.get("index_metadata") or {})


def _layout_by_size(names: list[str], nbytes: Callable[[str], int], max_bytes: int) -> list[_ShardPlan]:
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = nbytes(n)
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    k = len(groups)
    if k == 1:
        return [_ShardPlan("model.safetensors", groups[0], {"format": "pt"}, {})]
    return [_ShardPlan(f"model-{i + 1:05d}-of-{k:05d}.safetensors", g, {"format": "pt"}, {}) for i, g in enumerate(groups)]


def export_torch_dist_to_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    like: str | os.PathLike | None = None,
    hf_meta: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "keep",
    fmt: str = MEGATRON,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExportSummary:
    """Write an HF checkpoint directory from a torch_dist checkpoint (root or iteration dir).

    ``like``: an HF checkpoint whose shard names / tensor assignment / dtypes to reproduce (and
    whose config and tokenizer to copy); ``hf_meta``: a directory with config.json + tokenizer
    (default: ``<ckpt>/hf``). ``dtype``: ``keep`` (each tensor in its original HF dtype when
    ``like`` or the convert record knows it, else as stored in the checkpoint) or bf16/fp16/fp32.
    ``max_shard_bytes``: size-based shards of at most this size instead of the recorded layout
    (also the fallback, at 5 GB, when there is no recorded layout). ``fmt``: the checkpoint's layout,
    ``megatron`` (ours, Megatron-Bridge's) or ``slime`` (slime's converter and training runs).
    """
    if like is not None and max_shard_bytes is not None:
        raise UserError("--like and --max-shard-size both choose the sharding", hint="pass one of them")
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    out = Path(out)
    target = parse_dtype(dtype)
    check_format(fmt)
    it_dir = resolve_iteration_dir(ckpt)
    like = Path(like) if like is not None else None
    record = hf_meta_dir(ckpt)  # what convert kept: config, tokenizer, layout, exact overrides
    side_src = Path(hf_meta) if hf_meta is not None else (record or like)
    if side_src is None or not (side_src / "config.json").is_file():
        raise UserError(
            f"no HF config for {ckpt}: it has no hf/ directory",
            hint="pass --hf-meta <dir with config.json + tokenizer> or --like <original HF checkpoint>",
        )
    cfg = json.loads((side_src / "config.json").read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise UserError(f"{side_src / 'config.json'}: model_type {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")
    ensure_empty_output_dir(out, overwrite=overwrite)

    reader = DcpReader(it_dir)
    stored = reader.tensors()
    require_format(stored, fmt, f"checkpoint {it_dir}")
    mtp_in_ckpt = len({k.split(".")[2] for k in stored if k.startswith("mtp.layers.")})
    wm = build_format_map(cfg, mtp_in_ckpt, fmt)
    _check_checkpoint(wm, stored, it_dir)

    # layout and dtypes: "keep" = the original HF dtype where known (--like or the convert record),
    # else the checkpoint's
    recorded = _layout_from_record(record) if record is not None else None
    original = _layout_from_hf_dir(like) if like is not None else recorded
    original_dtypes = {n: d for p in (original[0] if original else []) for n, d in p.dtypes.items()}

    def dtype_of(n: str) -> torch.dtype:
        return target or original_dtypes.get(n) or stored[wm.by_hf[n].pieces[0].key].properties.dtype

    if like is not None:
        plans, had_index, index_meta = original
        layout_name = f"like {like}"
    elif max_shard_bytes is None and recorded is not None:
        plans, had_index, index_meta = recorded
        layout_name = "recorded at convert"
    else:
        max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        sizes = {n: math.prod(s) * dtype_of(n).itemsize for n, s in wm.hf_shapes.items()}
        plans, had_index, index_meta = _layout_by_size(list(wm.hf_shapes), sizes.__getitem__, max_shard_bytes), True, {}
        layout_name = f"size-based, <= {max_shard_bytes / 1e9:g} GB"
    plans, mtp_from_like = _reconcile(plans, wm, like, say)
    overrides = _load_overrides(record)
    spec_of = {n: (e.dtype, e.shape) for n, (_, e) in mtp_from_like.items()}
    spec_of.update({n: (dtype_of(n), wm.hf_shapes[n]) for p in plans for n in p.tensors if n not in spec_of})
    total = sum(math.prod(shape) * dt.itemsize for dt, shape in spec_of.values())
    say(f"exporting {it_dir} -> {out} ({sum(len(p.tensors) for p in plans)} tensors, {len(plans)} shard(s), "
        f"{total / 1e9:.2f} GB, layout {layout_name})")
    weight_map: dict[str, str] = {}
    written = 0
    ready: dict[str, torch.Tensor] = {}  # outputs of multi-tensor rules waiting for their turn
    bar = _progress(total, progress)
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            make_world_readable(tmp)
            for plan in plans:
                spec = [(n, *spec_of[n]) for n in plan.tensors]
                writer = ShardWriter(tmp / plan.name, spec, plan.metadata or {"format": "pt"})
                for n, dt, _shape in spec:
                    if n in mtp_from_like:
                        header, _entry = mtp_from_like[n]
                        with ShardReader(header) as r:
                            t = r.read(n)
                    else:
                        t = _hf_tensor(n, wm, reader, ready, overrides, dt)
                    writer.write(n, t)
                    weight_map[n] = plan.name
                    bar.update(t.numel() * t.element_size())
                    del t
                writer.close()
                written += writer.nbytes
            if had_index or len(plans) > 1:
                write_index(tmp / "model.safetensors.index.json", weight_map, total,
                            {k: v for k, v in index_meta.items() if k != "total_size"})
            copy_hf_side_files(side_src, tmp)
    finally:
        bar.close()
        reader.close()
    summary = ExportSummary(out, len(weight_map), len(plans), written, time.perf_counter() - t0, layout_name)
    say(summary.describe())
    return summary


def _check_checkpoint(wm, stored: dict, it_dir: Path) -> None:
    """Every key the map needs, with its global shape (vocab rows may be padded by Megatron)."""
    for key, shape in wm.megatron_shapes.items():
        md = stored.get(key)
        if md is None:
            raise UserError(f"checkpoint {it_dir} lacks {key}",
                            hint="is it a Qwen3-Next checkpoint of the config in hf/ (layer count, MTP)?")
        got = tuple(md.size)
        if got == tuple(shape):
            continue
        padded = key in _PADDED_VOCAB_KEYS and got[1:] == tuple(shape[1:]) and got[0] >= shape[0]
        if not padded:
            raise UserError(f"checkpoint {it_dir}: {key} has shape {list(got)}, expected {list(shape)} for this config",
                            hint="export with the config.json of the model that was trained (--hf-meta)")


def _reconcile(plans: list[_ShardPlan], wm, like: Path | None, say) -> tuple[list[_ShardPlan], dict]:
    """Match the layout's tensor list to what the checkpoint can produce. MTP tensors the
    checkpoint no longer has (a run without MTP) come from ``like`` when given, else are dropped."""
    listed = [n for p in plans for n in p.tensors]
    producible = set(wm.hf_shapes)
    unknown = [n for n in listed if n not in producible]
    from_like: dict = {}
    if unknown:
        mtp = [n for n in unknown if n.startswith("mtp.")]
        other = [n for n in unknown if not n.startswith("mtp.")]
        if other:
            raise UserError(f"the target layout lists {len(other)} tensor(s) this checkpoint cannot produce, e.g. {other[0]}",
                            hint="use --like with the original checkpoint of this model, or drop --like for size-based shards")
        if like is not None:
            files, index_map, _ = shard_files(like)
            headers = {f: read_header(like / f) for f in files}
            for h in headers.values():
                for n, e in h.entries.items():
                    if n in mtp:
                        from_like[n] = (h, e)
            say(f"note: the checkpoint has no MTP block; copying {len(from_like)} mtp.* tensors from {like}")
        else:
            say(f"note: the checkpoint has no MTP block; the export leaves out {len(mtp)} mtp.* tensors "
                "(pass --like <original HF dir> to copy them)")
        keep = producible | set(from_like)
        plans = [_ShardPlan(p.name, [n for n in p.tensors if n in keep], p.metadata, p.dtypes) for p in plans]
        plans = [p for p in plans if p.tensors]
    missing = producible - set(n for p in plans for n in p.tensors)
    if missing:
        raise UserError(f"the target layout has no place for {len(missing)} tensor(s), e.g. {sorted(missing)[0]}",
                        hint="the layout belongs to another model; drop --like for size-based shards")
    return plans, from_like


def _load_overrides(meta: Path | None) -> dict[str, torch.Tensor]:
    if meta is None or not (meta / EXACT_FILE).is_file():
        return {}
    h = read_header(meta / EXACT_FILE)
    with ShardReader(h) as r:
        return {n: r.read(n) for n in h.entries}


def _hf_tensor(name: str, wm, reader: DcpReader, ready: dict, overrides: dict, dtype: torch.dtype) -> torch.Tensor:
    if name in ready:
        return ready.pop(name).to(dtype)
    m = wm.by_hf[name]
    pieces = [reader.read(p.key, p.offset, p.shape) for p in m.pieces]
    outs = dict(zip(m.hf, m.to_hf(pieces)))
    for n, t in outs.items():
        orig = overrides.get(n)
        if orig is not None and orig.dtype == dtype and all(
            f"{n}::{p.key}" in overrides and _bit_equal(overrides[f"{n}::{p.key}"], x) for p, x in zip(m.pieces, pieces)
        ):
            outs[n] = orig  # the checkpoint still holds exactly what convert wrote: restore the original bytes
    for n, t in outs.items():
        if n != name:
            ready[n] = t
    return outs[name].to(dtype)

