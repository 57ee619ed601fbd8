"""A torch_dist checkpoint in one Megatron-side layout -> the same weights in another (ours <-> slime's),
streaming on CPU, without writing an HF checkpoint in between.

Both layouts are tables over the same HF tensors (``qnext.models.qwen3_next_formats``), so each
target rule is fed with the HF tensors the source rule makes from its checkpoint regions, in
memory, one rule at a time. The only rounding step is the +-1 of the GDN output norm (stored
zero-centred in ours, plain in slime's); the original bytes of any tensor it cannot restore are
kept in ``<out>/hf/exact.safetensors``, so ours -> slime -> ours and slime -> ours -> slime are
bit-exact, as HF -> ours -> HF is.

The output is a ``release`` checkpoint (weights only: a training run's optimizer and RNG state do
not carry over to another layout), with ``hf/`` (config, tokenizer, recorded HF layout) beside it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..fsutil import atomic_dir, ensure_empty_output_dir
from ..models.qwen3_next import MODEL_TYPE
from ..models.qwen3_next_formats import MEGATRON, build_format_map, check_format, detect_format, require_format
from .dcp_io import DcpReader, DcpWriter, prefetch_dcp_import
from .hf_to_megatron import EXACT_FILE, FORMAT_VERSION, _bit_equal
from .megatron_dir import (
    HF_META,
    RELEASE,
    copy_hf_side_files,
    hf_meta_dir,
    iteration_dir_name,
    make_world_readable,
    resolve_iteration_dir,
    write_backend_config,
    write_common,
    write_run_config,
    write_tracker,
)
from .megatron_to_hf import _check_checkpoint, _load_overrides
from .safetensors_io import ShardWriter

FILE_BYTES = 4 * 10**9  # start a new .distcp data file after this many bytes


@dataclass
class RelayoutSummary:
    out: Path
    source_format: str
    target_format: str
    tensors: int
    bytes_written: int
    seconds: float

    def describe(self) -> str:
        return (f"relaid {self.source_format} -> {self.target_format}: {self.tensors} tensors, "
                f"{self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s -> {self.out}")


def relayout_torch_dist(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str,
    source_format: str | None = None,
    hf_meta: str | os.PathLike | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> RelayoutSummary:
    """Rewrite the torch_dist checkpoint ``ckpt`` (root or iteration dir) in layout ``to``
    (``megatron`` or ``slime``). ``source_format``: the layout of ``ckpt``, else read off its keys.
    ``hf_meta``: a directory with the HF config.json (+ tokenizer), default ``<ckpt>/hf``."""
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    prefetch_dcp_import()
    out = Path(out)
    check_format(to)
    it_dir = resolve_iteration_dir(ckpt)
    record = hf_meta_dir(ckpt)
    side_src = Path(hf_meta) if hf_meta is not None else record
    if side_src is None or not (side_src / "config.json").is_file():
        raise UserError(f"no HF config for {ckpt}: it has no hf/ directory",
                        hint="pass --hf-meta <dir with the model's config.json> (e.g. the HF checkpoint it came from)")
    cfg = json.loads((side_src / "config.json").read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise UserError(f"{side_src / 'config.json'}: model_type {cfg.get('model_type')!r}, expected {MODEL_TYPE!r}")

    reader = DcpReader(it_dir)
    stored = reader.tensors()
    src = source_format or detect_format(stored)
    if src is None:
        raise UserError(f"cannot tell the layout of {it_dir} from its keys", hint="pass --from megatron or --from slime")
    require_format(stored, check_format(src), f"checkpoint {it_dir}", flag="--from")
    if src == to:
        raise UserError(f"{it_dir} is already in the {to} layout", hint="nothing to convert; use the checkpoint as it is")
    ensure_empty_output_dir(out, overwrite=overwrite)
    mtp = len({k.split(".")[2] for k in stored if k.startswith("mtp.layers.")})
    ws, wt = build_format_map(cfg, mtp, src), build_format_map(cfg, mtp, to)
    _check_checkpoint(ws, stored, it_dir)
    overrides = _load_overrides(record)
    kept: dict[str, torch.Tensor] = {}  # new exact originals found on the way
    ready: dict[str, torch.Tensor] = {}

    def hf_tensor(name: str) -> torch.Tensor:
        if name in ready:
            return ready.pop(name)
        m = ws.by_hf[name]
        pieces = [reader.read(p.key, p.offset, p.shape) for p in m.pieces]
        outs = dict(zip(m.hf, m.to_hf(pieces)))
        if m.transform.lossy:
            for n in m.hf:
                keys = [f"{n}::{p.key}" for p in m.pieces]
                if n in overrides and all(k in overrides and _bit_equal(overrides[k], x) for k, x in zip(keys, pieces)):
                    outs[n] = overrides[n]  # the checkpoint holds what was converted: the original bytes
                elif not all(_bit_equal(x, y.to(x.dtype)) for x, y in zip(pieces, m.to_megatron([outs[n]]))):
                    kept[n] = outs[n]
                    kept.update(zip(keys, pieces))
        for n, t in outs.items():
            if n != name:
                ready[n] = t
        return outs[name]

    dtypes: dict[str, torch.dtype] = {}
    for m in wt.mappings:
        d = stored[ws.by_hf[m.hf[0]].pieces[0].key].properties.dtype
        for p in m.pieces:
            dtypes.setdefault(p.key, d)
    say(f"relaying {it_dir} ({src} layout) -> {out} ({to} layout), {len(wt.megatron_shapes)} tensors")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        make_world_readable(tmp)
        it_out = tmp / iteration_dir_name(RELEASE)
        writer = DcpWriter(it_out)
        for key, shape in wt.megatron_shapes.items():
            writer.declare(key, shape, dtypes[key])
        n_file = 0
        writer.open(f"__{n_file}_0.distcp")
        try:
            for m in wt.mappings:
                hf = [hf_tensor(n) for n in m.hf]
                outs = [t.to(dtypes[p.key]) for p, t in zip(m.pieces, m.to_megatron(hf))]
                if m.transform.lossy:
                    outs = _exact_pieces(m, hf, outs, {**overrides, **kept}, kept)
                for p, t in zip(m.pieces, outs):
                    writer.add_chunk(p.key, p.offset, t)
                if writer.bytes_written > (n_file + 1) * FILE_BYTES:
                    n_file += 1
                    writer.open(f"__{n_file}_0.distcp")
            writer.open(f"__{n_file + 1}_0.distcp")
            for obj in wt.extra_states:
                writer.add_object(obj.key, None)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
        write_common(it_out, {"format_version": FORMAT_VERSION, "source": str(Path(it_dir).resolve()),
                              "hf_model_type": MODEL_TYPE, "format": to, "relaid_from": src})
        write_backend_config(it_out)
        if to == MEGATRON:
            write_run_config(it_out, cfg, cfg.get("_name_or_path"), mtp=mtp > 0)
        _write_meta(side_src, tmp / HF_META, {**overrides, **kept})
        write_tracker(tmp, RELEASE)
    summary = RelayoutSummary(out, src, to, len(wt.megatron_shapes), writer.bytes_written, time.perf_counter() - t0)
    say(summary.describe())
    return summary


def _exact_pieces(m, hf: list[torch.Tensor], outs: list[torch.Tensor], known: dict[str, torch.Tensor],
                  kept: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A lossy rule's pieces: the recorded originals when ``hf`` is what they were recorded with,
    else the computed ones, recording the HF bytes when the computed pieces cannot restore them."""
    (n,) = m.hf
    keys = [f"{n}::{p.key}" for p in m.pieces]
    if n in known and _bit_equal(known[n], hf[0]) and all(k in known for k in keys):
        return [known[k] for k in keys]
    (back,) = m.to_hf(outs)
    if not _bit_equal(back.to(hf[0].dtype), hf[0]):
        kept[n] = hf[0]
        kept.update(zip(keys, outs))
    return outs


def _write_meta(src: Path, dst: Path, exact: dict[str, torch.Tensor]) -> None:
    """``hf/``: the source's config, tokenizer and recorded HF layout, and the exact originals."""
    copy_hf_side_files(src, dst)
    for name in ("layout.json", "convert.json"):
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    if exact:
        names = sorted(exact)
        w = ShardWriter(dst / EXACT_FILE, [(n, exact[n].dtype, tuple(exact[n].shape)) for n in names],
                        {"format": "pt", "what": "original tensors a lossy transform cannot restore bit-exactly"})
        for n in names:
            w.write(n, exact[n].contiguous())
        w.close()
