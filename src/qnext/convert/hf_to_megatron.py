"""HF safetensors -> Megatron ``torch_dist``, streaming on CPU.

Everything that can be checked is checked before a byte is written: config model type, every
shard present and long enough for its header, every tensor known to the weight map with the
expected shape, nothing missing. Then the shards are read one at a time, one tensor at a time;
each tensor is transformed as soon as the other inputs of its rule (e.g. ``in_proj_ba`` for
``in_proj_qkvz``) have been read and written as DCP chunks into one ``.distcp`` file per HF shard.
Memory stays at about one tensor plus the few waiting for a partner.

The output appears under its final name only when complete (written into a temporary sibling,
``.metadata`` and the tracker file last, then renamed); an interrupted run leaves no checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..fsutil import atomic_dir, ensure_empty_output_dir
from ..models.qwen3_next import MODEL_TYPE, Qwen3NextWeightMap, mtp_layers_in
from ..models.qwen3_next_formats import MEGATRON, build_format_map, check_format
from ..models.weight_map import Mapping
from .dcp_io import DcpWriter, prefetch_dcp_import
from .megatron_dir import (
    HF_META,
    RELEASE,
    copy_hf_side_files,
    iteration_dir_name,
    make_world_readable,
    write_backend_config,
    write_common,
    write_run_config,
    write_tracker,
)
from .safetensors_io import ShardHeader, ShardReader, ShardWriter, dtype_name, read_header, shard_files

FORMAT_VERSION = 1
LAYOUT_FILE = "layout.json"  # original shard names, tensor order and dtypes (for export)
EXACT_FILE = "exact.safetensors"  # original bytes of tensors a lossy transform cannot restore
RECORD_FILE = "convert.json"

DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class ConvertSummary:
    out: Path
    hf_tensors: int
    megatron_tensors: int
    chunks: int
    objects: int
    bytes_read: int
    bytes_written: int
    seconds: float
    exact_overrides: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)

    def describe(self) -> str:
        return (
            f"converted {self.hf_tensors} HF tensors -> {self.megatron_tensors} Megatron tensors "
            f"({self.chunks} chunks, {self.objects} objects): read {self.bytes_read / 1e9:.2f} GB, "
            f"wrote {self.bytes_written / 1e9:.2f} GB in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s) -> {self.out}"
        )


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``keep``/None -> None (each tensor keeps its on-disk dtype)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "keep":
        return None
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {value!r}", hint="use keep, bf16, fp16 or fp32") from None


@dataclass
class _Inputs:
    """What the checks produced: the config, the shard headers, the expanded weight map."""

    config: dict
    headers: list[ShardHeader]
    weight_map: Qwen3NextWeightMap
    index_metadata: dict
    had_index: bool


def inspect_hf_checkpoint(hf_dir: str | os.PathLike, fmt: str = MEGATRON) -> _Inputs:
    """All checks that need no tensor data. Raises UserError naming the file or tensor at fault."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"HF checkpoint directory {hf_dir} does not exist", hint="pass HF=<dir with safetensors + config.json>")
    if (hf_dir / "latest_checkpointed_iteration.txt").is_file() or (hf_dir / ".metadata").is_file():
        raise UserError(f"{hf_dir} is a Megatron torch_dist checkpoint, not an HF one",
                        hint="make export turns it into HF safetensors; make relayout changes its layout (ours <-> slime)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing", hint="an HF checkpoint directory holds config.json beside the weights")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg_path}:{err.lineno}: not valid JSON ({err.msg})", hint="fix or re-download it") from None
    if cfg.get("model_type") != MODEL_TYPE:
        raise UserError(
            f"{cfg_path}: model_type is {cfg.get('model_type')!r}, this converter handles {MODEL_TYPE!r}",
            hint="point at a Qwen3-Next checkpoint",
        )
    files, index_map, index_meta = shard_files(hf_dir)
    missing_files = [f for f in files if not (hf_dir / f).is_file()]
    if missing_files:
        raise UserError(
            f"{len(missing_files)} shard(s) listed in model.safetensors.index.json are missing, e.g. {hf_dir / missing_files[0]}",
            hint="finish the download (every file in the index must exist)",
        )
    headers = [read_header(hf_dir / f) for f in files]
    names: dict[str, str] = {}
    for h in headers:
        for name in h.entries:
            if name in names:
                raise UserError(f"tensor {name} is in both {names[name]} and {h.path.name}", hint="re-download the checkpoint")
            names[name] = h.path.name
    if index_map is not None:
        for name, f in index_map.items():
            if names.get(name) != f:
                where = f"in {names[name]}" if name in names else "in no shard"
                raise UserError(f"model.safetensors.index.json puts {name} in {f}, but it is {where}",
                                hint="re-download the checkpoint (index and shards disagree)")
    if any(n.startswith(("decoder.", "embedding.")) for n in names):
        raise UserError(f"{hf_dir} holds Megatron tensor names (e.g. {next(iter(names))}), not an HF checkpoint's",
                        hint="make convert reads HF safetensors; to change a Megatron checkpoint's layout use make relayout")
    wm = build_format_map(cfg, mtp_layers_in(names), fmt)
    unknown = sorted(set(names) - set(wm.by_hf))
    if unknown:
        raise UserError(
            f"{len(unknown)} tensor(s) are not part of Qwen3-Next for this config.json, e.g. {unknown[0]} "
            f"(in {names[unknown[0]]})",
            hint="is config.json the one that came with these weights?",
        )
    missing = [n for n in wm.hf_shapes if n not in names]
    if missing:
        raise UserError(
            f"{len(missing)} tensor(s) that this config.json implies are missing, e.g. {missing[0]}",
            hint="the checkpoint is incomplete or config.json belongs to another model size",
        )
    for h in headers:
        for name, e in h.entries.items():
            expected = wm.hf_shapes[name]
            if tuple(e.shape) != tuple(expected):
                raise UserError(
                    f"tensor {name} in {h.path.name} has shape {list(e.shape)}, expected {list(expected)} "
                    f"for this config.json",
                    hint="is config.json the one that came with these weights?",
                )
    return _Inputs(cfg, headers, wm, index_meta, index_map is not None)


def _check_paths(hf_dir: Path, out: Path) -> None:
    a, b = hf_dir.resolve(), out.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UserError(f"output {out} overlaps the input {hf_dir}", hint="write the conversion to a separate directory")


@contextlib.contextmanager
def _no_crc():
    """torch.save without per-record CRC32 (4x less CPU; torch.load does not need it)."""
    old = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(old)


def convert_hf_to_torch_dist(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "keep",
    fmt: str = MEGATRON,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ConvertSummary:
    """Convert an HF Qwen3-Next checkpoint directory into a Megatron ``torch_dist`` checkpoint.

    ``dtype``: ``keep`` (default: every tensor as stored) or bf16/fp16/fp32. ``fmt``: the
    Megatron-side layout, ``megatron`` (megatron-core's native keys, also Megatron-Bridge's) or
    ``slime`` (slime's Qwen3-Next spec; see ``qnext.models.qwen3_next_formats``). The result at
    ``out`` is what ``megatron.training``'s ``--load out`` reads (a ``release`` checkpoint), plus
    ``out/hf/`` (config, tokenizer, original shard layout) so that export needs nothing else.
    """
    t0 = time.perf_counter()
    prefetch_dcp_import()
    hf_dir, out = Path(hf_dir), Path(out)
    target = parse_dtype(dtype)
    _check_paths(hf_dir, out)
    ensure_empty_output_dir(out, overwrite=overwrite)
    inputs = inspect_hf_checkpoint(hf_dir, check_format(fmt))
    wm = inputs.weight_map
    say = log or (lambda _msg: None)
    stale = sorted(out.parent.glob(f".{out.name}.tmp-*")) if out.parent.is_dir() else []
    if stale:
        say(f"note: {len(stale)} unfinished earlier conversion(s) beside the output ({stale[0]}); delete them to free disk")

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        return target if target is not None and stored.is_floating_point else stored

    stored = {n: e.dtype for h in inputs.headers for n, e in h.entries.items()}
    mg_dtype: dict[str, torch.dtype] = {}
    for m in wm.mappings:
        d = dtype_of(m.hf[0], stored[m.hf[0]])
        for p in m.pieces:
            mg_dtype.setdefault(p.key, d)
    total = sum(e.nbytes for h in inputs.headers for e in h.entries.values())
    say(f"converting {hf_dir} ({len(inputs.headers)} shards, {total / 1e9:.2f} GB, {len(stored)} tensors) -> {out}")

    chunks = 0
    bytes_read = 0
    overrides: dict[str, torch.Tensor] = {}
    with atomic_dir(out, overwrite=overwrite) as tmp, _no_crc():
        make_world_readable(tmp)
        it_dir = tmp / iteration_dir_name(RELEASE)
        writer = DcpWriter(it_dir)
        for key, shape in wm.megatron_shapes.items():
            writer.declare(key, shape, mg_dtype[key])
        pending: dict[int, dict[str, torch.Tensor]] = {}
        bar = _progress(total, progress)
        try:
            for i, header in enumerate(inputs.headers):
                writer.open(f"__{i}_0.distcp")
                with ShardReader(header) as reader:
                    for name, t in reader.read_ahead(list(header.entries)):
                        entry = header.entries[name]
                        bytes_read += entry.nbytes
                        t = t.to(dtype_of(name, t.dtype))
                        m = wm.by_hf[name]
                        got = pending.setdefault(id(m), {})
                        got[name] = t
                        if len(got) == len(m.hf):
                            del pending[id(m)]
                            chunks += _write_mapping(writer, m, [got[n] for n in m.hf], mg_dtype, overrides)
                        bar.update(entry.nbytes)
            if pending:  # cannot happen after inspect_hf_checkpoint; kept as a guard
                raise AssertionError(f"{len(pending)} rules never got all their inputs")
            writer.open(f"__{len(inputs.headers)}_0.distcp")
            for obj in wm.extra_states:
                writer.add_object(obj.key, None)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        write_common(it_dir, {"format_version": FORMAT_VERSION, "source": str(hf_dir.resolve()),
                              "hf_model_type": MODEL_TYPE, "format": fmt,
                              "dtype": "keep" if target is None else dtype_name(target)})
        write_backend_config(it_dir)
        if fmt == MEGATRON:  # Megatron-Bridge reads our layout; it needs its run config
            write_run_config(it_dir, inputs.config, hf_dir.resolve(), mtp=wm.dims.mtp_layers > 0)
        _write_hf_meta(hf_dir, tmp / HF_META, inputs, overrides, target)
        seconds = time.perf_counter() - t0
        record = {
            "format_version": FORMAT_VERSION, "source": str(hf_dir.resolve()), "format": fmt,
            "dtype": "keep" if target is None else dtype_name(target),
            "hf_tensors": len(stored), "megatron_tensors": len(wm.megatron_shapes), "chunks": chunks,
            "objects": len(wm.extra_states), "bytes_read": bytes_read, "bytes_written": writer.bytes_written,
            "seconds": round(seconds, 3), "exact_overrides": sorted(overrides),
            "torch": torch.__version__, "python": platform.python_version(),
        }
        (tmp / HF_META / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_tracker(tmp, RELEASE)  # last: marks the checkpoint complete
    summary = ConvertSummary(out, len(stored), len(wm.megatron_shapes), chunks, len(wm.extra_states),
                             bytes_read, writer.bytes_written, time.perf_counter() - t0, sorted(overrides))
    say(summary.describe())
    return summary


def _write_mapping(writer: DcpWriter, m: Mapping, hf: list[torch.Tensor], mg_dtype: dict[str, torch.dtype],
                   overrides: dict[str, torch.Tensor]) -> int:
    outs = m.to_megatron(hf)
    for piece, t in zip(m.pieces, outs):
        writer.add_chunk(piece.key, piece.offset, t.to(mg_dtype[piece.key]))
    if m.transform.lossy:
        back = m.to_hf([t.to(mg_dtype[p.key]) for p, t in zip(m.pieces, outs)])
        for name, orig, again in zip(m.hf, hf, back):
            if not _bit_equal(orig, again.to(orig.dtype)):
                overrides[name] = orig
                for p, t in zip(m.pieces, outs):
                    overrides[f"{name}::{p.key}"] = t.to(mg_dtype[p.key])
    return len(m.pieces)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _write_hf_meta(hf_dir: Path, dst: Path, inputs: _Inputs, overrides: dict[str, torch.Tensor],
                   target: torch.dtype | None) -> None:
    """Config, tokenizer, the original index and shard layout, and the exact-override tensors."""
    copy_hf_side_files(hf_dir, dst)
    layout = {
        "format_version": FORMAT_VERSION,
        "had_index": inputs.had_index,
        "index_metadata": inputs.index_metadata,
        "dtype_at_convert": "keep" if target is None else dtype_name(target),
        "files": [
            {
                "name": h.path.name,
                "metadata": h.metadata,
                "tensors": [[n, dtype_name(e.dtype)] for n, e in h.entries.items()],
            }
            for h in inputs.headers
        ],
    }
    (dst / LAYOUT_FILE).write_text(json.dumps(layout, indent=1) + "\n")
    if overrides:
        names = sorted(overrides)
        w = ShardWriter(dst / EXACT_FILE, [(n, overrides[n].dtype, tuple(overrides[n].shape)) for n in names],
                        {"format": "pt", "what": "original HF tensors a lossy transform cannot restore bit-exactly"})
        for n in names:
            w.write(n, overrides[n])
        w.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", dynamic_ncols=True)
