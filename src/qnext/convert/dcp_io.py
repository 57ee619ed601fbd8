"""torch.distributed.checkpoint (DCP) files written and read on CPU, one tensor at a time.

Megatron's ``torch_dist`` format is plain DCP: ``.distcp`` data files, each a sequence of
``torch.save`` blobs (one per tensor chunk), and a pickled ``Metadata`` (``.metadata``) that lists
every key with its global shape, dtype and chunks, and where each chunk's bytes are. Megatron's
own writer needs CUDA, DCP's writer wants the whole state dict at once; this writer appends chunks
to the current data file as they are produced and writes the merged ``.metadata`` at the end.

Objects (Megatron ``ShardedObject``: ``_extra_state`` of linear layers) are ``torch.save`` of a
one-element list, under their unique key ``<key>/shard_<offset>_<shape>``, as Megatron writes them.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION in torch 2.11

_prefetch: threading.Thread | None = None


def prefetch_dcp_import() -> None:
    """Import torch.distributed.checkpoint in a background thread. It pulls in DTensor and sympy
    (about 5 s on a small CPU); the writer needs its classes only for ``.metadata`` at the end,
    and the conversion itself waits on I/O, so the import overlaps with useful work."""
    global _prefetch
    if _prefetch is None:
        import importlib

        _prefetch = threading.Thread(target=importlib.import_module, args=("torch.distributed.checkpoint",),
                                     name="dcp-import", daemon=True)
        _prefetch.start()


def _dcp():
    if _prefetch is not None:
        _prefetch.join()
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    return fs, md


class DcpWriter:
    """Declare every tensor (key, global shape, dtype) first, then add chunks file by file."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        # plain records until finish() (the DCP classes are imported late, see prefetch_dcp_import)
        self._tensors: dict[str, tuple[tuple[int, ...], torch.dtype, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = {}
        self._objects: list[str] = []
        self._storage: list[tuple[str, tuple[int, ...] | None, str, int, int]] = []
        self._covered: dict[str, int] = {}
        self._file = None
        self._file_name = ""
        self.bytes_written = 0
        # finished data files are fsynced by a background thread, so the disk flush of one file
        # overlaps reading and transforming the next; finish() waits for all before .metadata
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-fsync")
        self._flushes: list = []

    def declare(self, key: str, global_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._tensors[key] = (tuple(global_shape), dtype, [])
        self._covered[key] = 0

    def open(self, file_name: str) -> None:
        """Start a data file (``__<n>_0.distcp``); later chunks go there."""
        self.close_file()
        self._file_name = file_name
        self._file = open(self.dir / file_name, "wb")

    def add_chunk(self, key: str, offset: tuple[int, ...], tensor: torch.Tensor) -> None:
        size, dtype, chunks = self._tensors[key]
        if tensor.dtype != dtype:
            raise AssertionError(f"{key}: chunk dtype {tensor.dtype}, declared {dtype}")
        if len(offset) != len(size) or any(o + s > g for o, s, g in zip(offset, tensor.shape, size)):
            raise AssertionError(f"{key}: chunk {list(tensor.shape)} at {list(offset)} outside {list(size)}")
        t = tensor.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # torch.save writes the whole storage of a view
        begin = self._file.tell()
        torch.save(t, self._file)
        length = self._file.tell() - begin
        chunks.append((tuple(offset), tuple(t.shape)))
        self._storage.append((key, tuple(offset), self._file_name, begin, length))
        self._covered[key] += t.numel()
        self.bytes_written += length

    def add_object(self, unique_key: str, obj: Any = None) -> None:
        buf = io.BytesIO()
        torch.save([obj], buf)
        begin = self._file.tell()
        self._file.write(buf.getbuffer())
        self._objects.append(unique_key)
        self._storage.append((unique_key, None, self._file_name, begin, self._file.tell() - begin))

    def close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._flushes.append(self._flusher.submit(_fsync_and_close, self._file))
            self._file = None

    def wait_for_disk(self) -> None:
        """Block until every closed data file is on disk (re-raises a failed fsync)."""
        for f in self._flushes:
            f.result()
        self._flushes.clear()

    def abort(self) -> None:
        """Stop without writing metadata (an error or interrupt): close everything."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._flusher.shutdown(wait=True, cancel_futures=False)

    def finish(self):
        """Check every declared tensor is fully covered, wait until the data is on disk, then
        write ``.metadata`` atomically."""
        self.close_file()
        self.wait_for_disk()
        self._flusher.shutdown(wait=True)
        for key, (size, _, _) in self._tensors.items():
            if self._covered[key] != math.prod(size):
                raise AssertionError(f"{key}: chunks cover {self._covered[key]} of {math.prod(size)} elements")
        fs, md = _dcp()
        entries: dict[str, Any] = {
            key: md.TensorStorageMetadata(
                properties=md.TensorProperties(dtype=dtype),
                size=torch.Size(size),
                chunks=[md.ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks],
            )
            for key, (size, dtype, chunks) in self._tensors.items()
        }
        entries.update({key: md.BytesStorageMetadata() for key in self._objects})
        storage = {
            md.MetadataIndex(key, offset): fs._StorageInfo(rel, begin, length)
            for key, offset, rel, begin, length in self._storage
        }
        meta = md.Metadata(state_dict_metadata=entries, planner_data={}, storage_data=storage, version=DCP_VERSION)
        tmp = self.dir / f"{METADATA_FILE}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / METADATA_FILE)
        return meta


def _fsync_and_close(f) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def read_metadata(directory: str | os.PathLike):
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {METADATA_FILE}: not a complete torch_dist checkpoint",
                        hint="point at a checkpoint that finished saving")
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory)).read_metadata()


class DcpReader:
    """Reads any region of any tensor, loading only the chunks that overlap it.

    Works for checkpoints of any parallel layout (chunks per TP/EP rank, per expert, SwiGLU
    halves). Decoded chunks are kept in a small LRU cache (``cache_bytes``) because neighbouring
    HF tensors often come from one chunk (an expert's gate and up halves)."""

    def __init__(self, directory: str | os.PathLike, cache_bytes: int = 512 * 2**20):
        self.dir = Path(directory)
        self.meta = read_metadata(directory)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._files: dict[str, Any] = {}

    def tensors(self) -> dict[str, Any]:
        """key -> TensorStorageMetadata (``.size``, ``.properties.dtype``, ``.chunks``)."""
        _, md = _dcp()
        return {k: v for k, v in self.meta.state_dict_metadata.items() if isinstance(v, md.TensorStorageMetadata)}

    def objects(self) -> list[str]:
        _, md = _dcp()
        return [k for k, v in self.meta.state_dict_metadata.items() if isinstance(v, md.BytesStorageMetadata)]

    def read(self, key: str, offset: tuple[int, ...] | None = None,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
        md = self.meta.state_dict_metadata.get(key)
        if not hasattr(md, "chunks"):
            raise UserError(f"checkpoint {self.dir} has no tensor {key}",
                            hint="is it a Qwen3-Next torch_dist checkpoint of this config?")
        gshape = tuple(md.size)
        offset = tuple(offset) if offset is not None else (0,) * len(gshape)
        shape = tuple(shape) if shape is not None else gshape
        for chunk in md.chunks:  # the common case: the region is one whole chunk (no copy)
            if tuple(chunk.offsets) == offset and tuple(chunk.sizes) == shape:
                return self._chunk(key, offset)
        out = torch.empty(shape, dtype=md.properties.dtype)
        filled = 0
        for chunk in md.chunks:
            c_off, c_size = tuple(chunk.offsets), tuple(chunk.sizes)
            lo = [max(a, b) for a, b in zip(offset, c_off)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offset, shape, c_off, c_size)]
            if any(l >= h for l, h in zip(lo, hi)) and len(shape):
                continue
            data = self._chunk(key, c_off)
            src = data[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, c_off))]
            out[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, offset))] = src
            filled += src.numel()
        if filled != math.prod(shape):
            raise UserError(f"checkpoint {self.dir}: chunks of {key} cover {filled} of {math.prod(shape)} elements "
                            f"of the region {list(offset)}+{list(shape)}", hint="the checkpoint is incomplete")
        return out

    def _chunk(self, key: str, offset: tuple[int, ...]) -> torch.Tensor:
        ck = (key, offset)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        info = self.meta.storage_data[_dcp()[1].MetadataIndex(key, offset)]
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{key}: stored with transforms {info.transform_descriptors}, not supported",
                            hint="save the checkpoint without DCP storage extensions")
        f = self._files.get(info.relative_path)
        if f is None:
            f = self._files[info.relative_path] = open(self.dir / info.relative_path, "rb")
        f.seek(info.offset)
        buf = f.read(info.length)
        if len(buf) != info.length:
            raise UserError(f"{self.dir / info.relative_path} is truncated (reading {key})",
                            hint="the checkpoint is incomplete or damaged")
        t = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
        del buf
        nbytes = t.numel() * t.element_size()
        if nbytes <= self._cache_bytes:
            self._cache[ck] = t
            self._cached += nbytes
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.numel() * old.element_size()
        return t

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._cache.clear()
        self._cached = 0
