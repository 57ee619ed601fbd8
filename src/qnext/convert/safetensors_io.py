"""Streaming safetensors: read one tensor at a time, write a shard tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
[begin, end) in the data section, plus ``__metadata__``), then the data. Reading with ``readinto``
into a fresh tensor keeps the resident memory at one tensor (an ``mmap`` of a 5 GB shard would add
every page it touches to the process's RSS), and the header alone tells whether a file is
truncated before any work starts. Writing needs only the names, dtypes and shapes up front.
"""
from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: absolute byte range in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    path: Path
    entries: dict[str, Entry]  # in file (data offset) order
    metadata: dict[str, str]
    file_size: int


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and check a shard's header: every tensor's bytes must lie inside the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard {path} is missing", hint="re-download the checkpoint (every file in the index must exist)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"shard {path} is truncated ({size} bytes, no header)", hint="re-download this file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise UserError(f"shard {path} is truncated or not safetensors (header of {n} bytes, file of {size})",
                            hint="re-download this file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"shard {path} has a corrupt header", hint="re-download this file") from None
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"shard {path}: unreadable header entry for {name!r}", hint="re-download this file") from None
        if e - b != math.prod(shape) * dtype.itemsize:
            raise UserError(f"shard {path}: {name} has {e - b} bytes for shape {list(shape)} {info['dtype']}",
                            hint="re-download this file")
        entries.append(Entry(name, dtype, shape, start + b, start + e))
    entries.sort(key=lambda x: x.begin)
    end = max((x.end for x in entries), default=start)
    if end > size:
        raise UserError(
            f"shard {path} is truncated: {size} bytes, its header needs {end}",
            hint="the download or copy was interrupted; re-download this file",
        )
    return ShardHeader(path, {x.name: x for x in entries}, dict(meta), size)


class ShardReader:
    """Reads whole tensors from one shard with plain reads (no mmap)."""

    def __init__(self, header: ShardHeader):
        self.header = header
        self._f = open(header.path, "rb", buffering=0)

    def read(self, name: str) -> torch.Tensor:
        e = self.header.entries[name]
        out = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy())
        self._f.seek(e.begin)
        got = 0
        while got < e.nbytes:
            n = self._f.readinto(view[got:])
            if not n:
                raise UserError(f"shard {self.header.path} ended while reading {name}", hint="re-download this file")
            got += n
        return out.view(e.dtype).reshape(e.shape)

    def read_ahead(self, names: Sequence[str], max_bytes: int = 1 << 30) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in order while a thread reads the next ones (at most ``max_bytes``
        waiting, at least one): the copy out of the page cache then overlaps the caller's writing."""
        q: queue.Queue = queue.Queue()
        budget = {"free": max_bytes}
        lock = threading.Condition()
        stop = threading.Event()

        def produce() -> None:
            try:
                for n in names:
                    size = self.header.entries[n].nbytes
                    with lock:
                        lock.wait_for(lambda: stop.is_set() or budget["free"] >= size or budget["free"] == max_bytes)
                        if stop.is_set():
                            return
                        budget["free"] -= size
                    q.put((n, self.read(n), size))
                q.put(None)
            except BaseException as err:  # handed to the consumer
                q.put(err)

        worker = threading.Thread(target=produce, name="safetensors-read-ahead", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                n, t, size = item
                yield n, t
                del t, item
                with lock:
                    budget["free"] += size
                    lock.notify_all()
        finally:
            stop.set()
            with lock:
                lock.notify_all()
            worker.join()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes a shard whose tensor list is known up front, one tensor at a time, in that order."""

    def __init__(self, path: str | os.PathLike, tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [name for name, _, _ in tensors]
        self._spec = {name: (dtype, tuple(shape)) for name, dtype, shape in tensors}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0
        self.nbytes = 8 + len(blob) + offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise AssertionError(f"{self.path.name}: got {name}, expected {expected}")
        dtype, shape = self._spec[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: {tensor.dtype} {list(tensor.shape)}, header says {dtype} {list(shape)}")
        t = tensor.detach().contiguous().cpu()
        self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        missing = self._order[self._next:]
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if missing:
            raise AssertionError(f"{self.path.name}: {len(missing)} tensors never written, first {missing[0]}")


def write_index(path: str | os.PathLike, weight_map: dict[str, str], total_size: int,
                extra_metadata: dict | None = None) -> None:
    """``model.safetensors.index.json`` as transformers writes it."""
    meta = dict(extra_metadata or {})
    meta["total_size"] = int(total_size)
    body = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def shard_files(hf_dir: str | os.PathLike) -> tuple[list[str], dict[str, str] | None, dict]:
    """The shard file names of an HF checkpoint directory, its weight_map (None without an
    index) and the index's metadata. Raises UserError when neither an index nor a single
    ``model.safetensors`` is there."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            body = json.loads(index.read_text())
            weight_map = dict(body["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index} is not a valid safetensors index", hint="re-download it") from None
        files = sorted(set(weight_map.values()))
        return files, weight_map, dict(body.get("metadata") or {})
    if (hf_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None, {}
    raise UserError(
        f"{hf_dir} has no model.safetensors.index.json or model.safetensors",
        hint="point at an HF checkpoint directory (safetensors weights + config.json)",
    )


def iter_entries(headers: Iterable[ShardHeader]) -> Iterable[tuple[ShardHeader, Entry]]:
    for h in headers:
        for e in h.entries.values():
            yield h, e
