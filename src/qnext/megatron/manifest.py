"""The torch_dist manifest: every checkpoint key with its global shape and dtype.

``read_manifest`` reads a checkpoint's ``.metadata`` (CPU is enough) and is what the converter's
output is compared with. ``dump_model_manifest`` builds the Megatron model on a GPU, saves it with
megatron-core's own ``dist_checkpointing.save`` and reads that checkpoint back: the golden manifest
(``tests/fixtures/megatron_manifest_tiny.json``) is the contract between this model and the converter.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

SHARD_SEP = "/shard_"  # torch_dist stores a ShardedObject under "<key>/shard_<offset>_<fragments>"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """{"tensors": sorted [{key, global_shape, dtype}], "objects": sorted object keys, "files": [...]}."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    path = Path(ckpt_dir)
    meta = FileSystemReader(str(path)).read_metadata()
    tensors, objects = [], set()
    for key, md in meta.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            tensors.append({"key": key, "global_shape": list(md.size), "dtype": _dtype_name(md.properties.dtype)})
        elif isinstance(md, BytesStorageMetadata):
            objects.add(key.split(SHARD_SEP)[0])
        else:  # pragma: no cover - torch adds no other kinds today
            objects.add(key)
    tensors.sort(key=lambda r: r["key"])
    files = sorted(p.name for p in path.iterdir())
    out: dict[str, Any] = {"tensors": tensors, "objects": sorted(objects), "files": files}
    mj = path / "metadata.json"
    if mj.is_file():
        out["metadata_json"] = json.loads(mj.read_text())
    return out


def sharded_manifest(model) -> dict[str, Any]:
    """The manifest ``model.sharded_state_dict()`` implies on this rank (no file written, any device).

    Gives the keys this rank's shards belong to, each with the *global* shape and dtype; the union
    over ranks is what a torch_dist save of the model would hold.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from .model import _sharded_metadata

    sd = model.sharded_state_dict(metadata=_sharded_metadata())
    apply_factories(sd)
    tensors: dict[str, dict[str, Any]] = {}
    objects = set()
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            row = {"key": v.key, "global_shape": list(v.global_shape), "dtype": _dtype_name(v.dtype)}
            if tensors.setdefault(v.key, row) != row:
                raise AssertionError(f"{v.key}: inconsistent shards {tensors[v.key]} vs {row}")
        elif isinstance(v, ShardedObject):
            objects.add(v.key)
    return {"tensors": [tensors[k] for k in sorted(tensors)], "objects": sorted(objects)}


def model_manifest_without_gpu(hf_config: Any, dtype: torch.dtype = torch.bfloat16, device: str = "meta"):
    """The TE-free model's manifest built on ``meta`` (any size) or ``cpu``, in a world of one.

    Initialises a gloo world of one (and megatron's groups) when none exists.
    """
    from .model import build_model
    from .parallel import CPU_BUILD_OVERRIDES, construction_device, initialize_parallel

    initialize_parallel()
    with construction_device(device):
        model = build_model(hf_config, None, dtype, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))
    return sharded_manifest(model)


def compare_manifests(expected: dict[str, Any], actual: dict[str, Any], *, objects: bool = False) -> list[str]:
    """Human-readable differences in tensor keys, global shapes and dtypes (empty list = equal);
    with ``objects`` also in the ShardedObject keys (``common_state`` aside: only saves have it)."""
    exp = {r["key"]: r for r in expected["tensors"]}
    act = {r["key"]: r for r in actual["tensors"]}
    problems = [f"missing tensor {k}" for k in sorted(exp.keys() - act.keys())]
    problems += [f"unexpected tensor {k}" for k in sorted(act.keys() - exp.keys())]
    for k in sorted(exp.keys() & act.keys()):
        for field in ("global_shape", "dtype"):
            if exp[k][field] != act[k][field]:
                problems.append(f"{k}: {field} {act[k][field]} != expected {exp[k][field]}")
    if objects:
        eo = set(expected.get("objects", [])) - {"common_state"}
        ao = set(actual.get("objects", [])) - {"common_state"}
        problems += [f"missing object {k}" for k in sorted(eo - ao)]
        problems += [f"unexpected object {k}" for k in sorted(ao - eo)]
    return problems


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "megatron_core": importlib.metadata.version("megatron-core"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command,
        **extra,
    }


def dump_model_manifest(
    hf_config: str | Path,
    out_json: str | Path,
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype,
    command: str,
    parallel: Any = None,
) -> dict[str, Any]:
    """Build the model (TE-free unless TE imports), save it with megatron's torch_dist, write the manifest."""
    from .model import build_model, save_torch_dist
    from .parallel import initialize_parallel

    p = initialize_parallel(parallel)
    model = build_model(hf_config, p, dtype)
    save_torch_dist(model, ckpt_dir)
    torch.distributed.barrier()
    manifest = read_manifest(ckpt_dir)
    manifest = {
        "provenance": provenance(
            command,
            hf_config=str(hf_config),
            backend=model.qnext_backend,
            params_dtype=_dtype_name(dtype),
            parallel=dict(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp),
            world_size=torch.distributed.get_world_size(),
        ),
        **manifest,
    }
    if torch.distributed.get_rank() == 0:
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.replace(out)
    return manifest
