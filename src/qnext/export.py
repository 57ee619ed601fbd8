"""Export trained weights for transformers / PEFT / vLLM: a PEFT adapter directory, or a merged HF
checkpoint laid out exactly like the input one.

Merged checkpoints are written by streaming the *input* checkpoint shard by shard: every on-disk
tensor keeps its name (per-expert ``mlp.experts.{i}.gate_proj.weight`` etc., ``mtp.*``), dtype, shard
file and order, and the input's ``model.safetensors.index.json`` is reused as it is; only the values
change. transformers 5 fuses experts in memory (``mlp.experts.gate_up_proj``); ``ondisk_value``
maps those back. Config, generation config and tokenizer files are copied. Every output appears
atomically (written to a temporary sibling, then renamed).

``python -m qnext.export --help`` (or ``tools/export_hf.py``) is the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import torch

from .convert.safetensors_io import ShardReader, ShardWriter, read_header, shard_files
from .errors import UserError, cli_main
from .fsutil import atomic_dir
from .peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, save_peft_adapter  # noqa: F401  (re-exported)

INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


# --------------------------------------------------------------------------- merging an adapter


def lora_deltas(adapter_cfg: dict, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{on-disk weight name: delta}`` with delta = (B @ A) * scaling in float32, as PEFT merges it."""
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter type {adapter_cfg.get('peft_type')} is not LoRA", hint="export a LoRA adapter")
    for key in ("use_dora", "target_parameters", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if adapter_cfg.get(key):
            raise UserError(f"adapter_config.json sets {key}, which the streaming merge does not support",
                            hint="merge with PEFT in memory (PeftModel.merge_and_unload) instead")
    r, alpha = int(adapter_cfg["r"]), float(adapter_cfg["lora_alpha"])
    scaling = alpha / (r ** 0.5) if adapter_cfg.get("use_rslora") else alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise UserError(f"adapter tensor {key!r} is not a LoRA A/B weight", hint="export a plain LoRA adapter")
        parts.setdefault(m["module"], {})[m["ab"]] = t
    deltas = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"adapter has lora_{''.join(ab)} but not both A and B for {module}", hint="re-export the adapter")
        a, b = ab["A"].float(), ab["B"].float()
        if adapter_cfg.get("fan_in_fan_out"):
            raise UserError("fan_in_fan_out adapters are not supported", hint="train with fan_in_fan_out=false")
        deltas[f"{module}.weight"] = (b @ a) * scaling
    return deltas


# --------------------------------------------------------------------------- checkpoint rewriting


def rewrite_checkpoint(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    value: Callable[[str, torch.Tensor], torch.Tensor],
    *,
    overwrite: bool = False,
) -> Path:
    """Stream ``base_dir``'s shards into ``out_dir`` with the same files, names, dtypes, shapes and
    index; ``value(name, tensor)`` gives each tensor's new value (cast back to the on-disk dtype)."""
    base_dir = Path(base_dir)
    files, _weight_map, _meta = shard_files(base_dir)
    headers = [read_header(base_dir / f) for f in files]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for h in headers:
            spec = [(e.name, e.dtype, e.shape) for e in h.entries.values()]
            writer = ShardWriter(tmp / h.path.name, spec, metadata=h.metadata or {"format": "pt"})
            try:
                with ShardReader(h) as reader:
                    for e in h.entries.values():
                        t = reader.read(e.name)
                        new = value(e.name, t)
                        if tuple(new.shape) != e.shape:
                            raise UserError(f"{e.name}: new value has shape {list(new.shape)}, checkpoint has {list(e.shape)}",
                                            hint="export against the checkpoint the run was trained from")
                        writer.write(e.name, new.to(e.dtype))
            finally:
                writer.close()
        copy_side_files(base_dir, tmp)
    return Path(out_dir)


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Everything but the weight shards: config.json, generation_config.json, tokenizer files, the index."""
    for p in sorted(base_dir.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and not p.name.startswith("."):
            shutil.copy2(p, out_dir / p.name)


def merge_adapter(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Merged HF checkpoint = base + LoRA deltas, same layout as ``base_dir``."""
    cfg, weights = read_adapter(adapter_dir)
    deltas = lora_deltas(cfg, weights)
    used: set[str] = set()

    def value(name: str, t: torch.Tensor) -> torch.Tensor:
        d = deltas.get(name)
        if d is None:
            return t
        if tuple(d.shape) != tuple(t.shape):
            raise UserError(f"adapter delta for {name} has shape {list(d.shape)}, checkpoint has {list(t.shape)}",
                            hint="the adapter was trained on another model; export against its own base checkpoint")
        used.add(name)
        return t.float() + d if t.dtype != torch.float32 else t + d

    out = rewrite_checkpoint(base_dir, out_dir, value, overwrite=overwrite)
    missing = sorted(set(deltas) - used)
    if missing:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(f"{len(missing)} adapted weights are not in {base_dir}, e.g. {missing[0]}",
                        hint="export against the checkpoint the adapter was trained on")
    return out


def ondisk_value(name: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The value of on-disk tensor ``name`` from an in-memory (transformers 5) state dict, or None
    when the model has no such weight (e.g. ``mtp.*``, which transformers does not load).

    Fused experts: ``gate_up_proj[e]`` is [gate; up] stacked on rows (transformers' conversion
    concatenates gate then up), ``down_proj[e]`` is expert e's down projection."""
    if name in state:
        return state[name]
    m = _EXPERT.match(name)
    if not m:
        return None
    e = int(m["e"])
    if m["proj"] == "down_proj":
        fused = state.get(f"{m['prefix']}.down_proj")
        return None if fused is None else fused[e]
    fused = state.get(f"{m['prefix']}.gate_up_proj")
    if fused is None:
        return None
    gate, up = fused[e].chunk(2, dim=0)
    return gate if m["proj"] == "gate_proj" else up


def write_checkpoint_like(
    base_dir: str | os.PathLike, state: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """A full in-memory state dict (transformers names) written in ``base_dir``'s on-disk layout.
    Tensors the model does not hold (``mtp.*``) are copied from ``base_dir`` unchanged."""

    def value(name: str, t: torch.Tensor) -> torch.Tensor:
        v = ondisk_value(name, state)
        return t if v is None else v

    return rewrite_checkpoint(base_dir, out_dir, value, overwrite=overwrite)


# --------------------------------------------------------------------------- command line


def _megatron_run_adapter(run_dir: Path, into: Path) -> Path:
    """A Megatron LoRA run's adapter, written into ``into`` from the newest torch_dist checkpoint of
    ``<run>/checkpoints`` (the LoRA tensors are stored in HF layout; r/alpha from the run's config)."""
    import yaml

    from .config.schema import LoraConfig
    from .lora import export_adapter_from_checkpoint

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run_dir} is a Megatron run without its config.yaml", hint="was the run directory copied in part?")
    try:
        train = (yaml.safe_load(cfg_file.read_text()) or {}).get("train") or {}
    except (yaml.YAMLError, AttributeError) as err:
        raise UserError(f"{cfg_file} is not the YAML mapping a training run writes: {err}",
                        hint="restore the run's config.yaml, or export with --adapter") from None
    if train.get("mode") != "lora":
        raise UserError(f"{run_dir} is a Megatron train.mode={train.get('mode')} run: it has no adapter",
                        hint=f"full-training checkpoints export with `make export CKPT={run_dir / 'checkpoints'} OUT=<dir>`")
    known = set(LoraConfig.__dataclass_fields__)
    lora = LoraConfig(**{k: v for k, v in (train.get("lora") or {}).items() if k in known})
    return export_adapter_from_checkpoint(run_dir / "checkpoints", into, lora)


def _run_paths(run_dir: Path, scratch: Path) -> tuple[Path | None, Path | None]:
    """(base checkpoint, adapter dir) of a training output directory. A Megatron run's adapter is
    exported from its torch_dist checkpoint into ``scratch``; its base is a torch_dist checkpoint, so
    the HF base of a merged export must be given with --base."""
    base = None
    marker = run_dir / "run.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("backend") == "megatron":
            return None, _megatron_run_adapter(run_dir, scratch / "adapter")
        base = Path(info.get("checkpoint", "")) or None
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        from .fsdp.checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir)
        adapter = last.path / "adapter" if last is not None else None
    return base, adapter if adapter is not None and adapter.is_dir() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_hf",
        description="Export a LoRA run as a PEFT adapter directory and/or a merged HF checkpoint with the base "
        "checkpoint's names, sharding and index.",
    )
    src = p.add_argument_group("source (one of)")
    src.add_argument("--run", type=Path, help="training output directory of either backend (FSDP: its final adapter, else its newest checkpoint; Megatron: its newest torch_dist checkpoint)")
    src.add_argument("--adapter", type=Path, help="PEFT adapter directory")
    p.add_argument("--base", type=Path, help="base HF checkpoint (default: the one the run trained from)")
    p.add_argument("--merged-out", type=Path, help="write the merged HF checkpoint here")
    p.add_argument("--adapter-out", type=Path, help="copy the PEFT adapter here")
    p.add_argument("--overwrite", action="store_true", help="replace non-empty output directories")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qnext_export_") as scratch:
        return _export(args, Path(scratch))


def _export(args: argparse.Namespace, scratch: Path) -> int:
    base, adapter = args.base, args.adapter
    if args.run is not None:
        if not args.run.is_dir():
            raise UserError(f"--run {args.run} is not a directory", hint="point at a training output_dir")
        run_base, run_adapter = _run_paths(args.run, scratch)
        base = base or run_base
        adapter = adapter or run_adapter
        if adapter is None:
            raise UserError(f"{args.run} has no adapter (final or in a checkpoint)",
                            hint="full-training runs write <output_dir>/model, already an HF checkpoint")
    if adapter is None:
        raise UserError("nothing to export: give --run or --adapter", hint="see --help")
    if args.merged_out is None and args.adapter_out is None:
        raise UserError("no output: give --merged-out and/or --adapter-out", hint="see --help")
    read_adapter(adapter)  # fail early on a broken adapter
    for out in (args.merged_out, args.adapter_out):
        if out is not None and out.exists() and any(out.iterdir()) and not args.overwrite:
            raise UserError(f"output directory {out} is not empty", hint="choose a new directory or pass --overwrite")
    if args.adapter_out is not None:
        with atomic_dir(args.adapter_out, overwrite=args.overwrite) as tmp:
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(adapter / name, tmp / name)
        print(f"adapter: {args.adapter_out}")
    if args.merged_out is not None:
        if base is None:
            raise UserError("the HF base checkpoint is unknown (a Megatron run trains from torch_dist)",
                            hint="pass --base <HF checkpoint dir> (the one `make convert` read)")
        if not base.is_dir():
            raise UserError(f"base checkpoint {base} not found", hint="pass --base <HF checkpoint dir>")
        merge_adapter(base, adapter, args.merged_out, overwrite=args.overwrite)
        print(f"merged checkpoint: {args.merged_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
