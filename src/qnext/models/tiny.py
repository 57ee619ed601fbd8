"""A seeded random Qwen3-Next HF checkpoint, laid out as the hub lays out the real one.

Files: ``model-0000i-of-0000N.safetensors`` shards (written by the safetensors library, metadata
``{"format": "pt"}``), ``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``),
``config.json``, ``generation_config.json`` and the tokenizer files. Tensor names are the ON-DISK
names of the weight map in ``qwen3_next.py`` (per-expert ``mlp.experts.{j}.gate_proj.weight``; not
transformers 5's fused in-memory ``gate_up_proj``), plus the MTP block (``mtp.*``) on request.

Values follow transformers' own initialisation (normal(0, initializer_range) matrices, zero
zero-centred norms, ones for the GDN output norm and ``dt_bias``, ``A_log = log U(0.01, 16)``), so
the model trains like a freshly initialised one. Each tensor has its own generator seeded from
``(seed, name)``: a tensor's values do not depend on sharding, dtype rounding aside, or on whether
the MTP block is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fsutil import atomic_dir, ensure_empty_output_dir
from .hf import to_dtype
from .qwen3_next import build_weight_map

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = "models/tiny_qwen3_next/config.json"
DEFAULT_SHARD_BYTES = 50 * 2**20
INDEX_FILE = "model.safetensors.index.json"
MAX_TOTAL_BYTES = 8 * 2**30  # refuse to fill a disk with a random "80B" model by mistake

_ZERO_CENTERED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight",
                        "k_norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")


def resolve_config_path(config_path: str | os.PathLike) -> Path:
    """A config path as given, else relative to the repository root (so tools work from any cwd)."""
    p = Path(config_path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise UserError(f"model config {p} not found", hint=f"pass an HF config.json, e.g. {DEFAULT_CONFIG}")


def load_config(config_path: str | os.PathLike = DEFAULT_CONFIG, overrides: dict | None = None) -> dict[str, Any]:
    p = resolve_config_path(config_path)
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{p}:{err.lineno}: malformed JSON ({err.msg})", hint="fix the config file") from None
    cfg.update(overrides or {})
    return cfg


def init_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """transformers' initialisation for the tensor called ``name``, from a generator seeded by (seed, name)."""
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") >> 1)
    if name.endswith(_ZERO_CENTERED_NORMS) or name in ("model.norm.weight", "mtp.norm.weight"):
        return torch.zeros(shape)  # Qwen3NextRMSNorm computes x_hat * (1 + w)
    if name.endswith(("linear_attn.norm.weight", "linear_attn.dt_bias")):
        return torch.ones(shape)
    if name.endswith("linear_attn.A_log"):
        return torch.empty(shape).uniform_(0.01, 16, generator=g).log_()
    return torch.empty(shape).normal_(0.0, std, generator=g)


PERTURB_STD = 0.1


def perturb_tensor(name: str, t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` moved off transformers' initial value where that value is a constant (norms, ``dt_bias``)
    or a plain draw (``A_log``): + normal(0, 0.1) from a generator seeded by (seed, "perturb", name).

    Test checkpoints need it: with every norm at its initial zeros/ones, a swapped q_norm/k_norm rule
    or a ``1 - w`` for ``w - 1`` in the GDN norm gives the very same logits."""
    if not name.endswith(("norm.weight", "dt_bias", "A_log")):
        return t
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:perturb:{name}".encode()).digest()[:8], "big") >> 1)
    return t + PERTURB_STD * torch.randn(t.shape, generator=g)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in order, as transformers shards: a new shard when the next tensor would overflow."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes.items():
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _transformers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return "5.17.0"


def generation_config(cfg: dict) -> dict:
    """Qwen3-Next-Instruct's generation_config.json with greedy decoding (a random model gains
    nothing from sampling, and greedy makes demos reproducible)."""
    return {
        "bos_token_id": cfg.get("bos_token_id", 151643),
        "do_sample": False,
        "eos_token_id": [cfg.get("eos_token_id", 151645), 151643],
        "pad_token_id": 151643,
        "transformers_version": cfg.get("transformers_version") or _transformers_version(),
    }


def write_tiny_checkpoint(out_dir: str | os.PathLike, config_path: str | os.PathLike = DEFAULT_CONFIG, seed: int = 0,
                          dtype: str | torch.dtype = "float32", max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                          overrides: dict | None = None, overwrite: bool = False, with_mtp: bool = False,
                          perturb: bool = False, tokenizer_path: str | os.PathLike | None = None, with_tokenizer: bool = True,
                          max_total_bytes: int | None = MAX_TOTAL_BYTES) -> Path:
    """Write a random Qwen3-Next checkpoint to ``out_dir`` (atomically) and return its path.

    ``overrides`` patch config.json keys (e.g. ``{"vocab_size": 512}`` for fast tests).
    ``tokenizer_path``: copy that directory's tokenizer instead of the built-in Qwen3-Next one.
    ``perturb``: move every norm, ``dt_bias`` and ``A_log`` off its initial value (:func:`perturb_tensor`),
    so that norm conventions show in the logits (what tests that compare two implementations need).
    ``max_total_bytes``: refuse larger checkpoints (None: no limit, for real-width proxies on purpose).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    ensure_empty_output_dir(out, overwrite=overwrite, what="checkpoint")
    if max_shard_bytes <= 0:
        raise UserError(f"max shard size must be positive, got {max_shard_bytes}", hint="e.g. --shard-mb 50")
    cfg = load_config(config_path, overrides)
    torch_dtype = to_dtype(dtype)
    cfg["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    # as save_pretrained writes it; without it transformers 5.17 takes a local tokenizer directory
    # for a pre-5.0 Mistral one and warns about its regex
    cfg.setdefault("transformers_version", _transformers_version())
    wm = build_weight_map(cfg, mtp_layers=1 if with_mtp else 0)
    std = float(cfg.get("initializer_range", 0.02))
    shapes = wm.hf_shapes
    sizes = {n: math.prod(s) * torch_dtype.itemsize for n, s in shapes.items()}
    total = sum(sizes.values())
    if max_total_bytes is not None and total > max_total_bytes:
        raise UserError(f"{config_path} would make a {total / 2**30:.0f} GiB random checkpoint",
                        hint="random checkpoints are for small test configs, e.g. models/tiny_qwen3_next/config.json; "
                             "for a real-width proxy on purpose raise --max-total-gib")
    shards = plan_shards(sizes, int(max_shard_bytes))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        weight_map = {}
        for k, names in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: init_tensor(n, shapes[n], seed, std) for n in names}
            if perturb:
                tensors = {n: perturb_tensor(n, t, seed) for n, t in tensors.items()}
            tensors = {n: t.to(torch_dtype) for n, t in tensors.items()}
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        if with_tokenizer:
            copy_tokenizer(tmp, tokenizer_path)
        _make_readable(tmp)
    return out


def _make_readable(d: Path) -> None:
    """rwxr-xr-x / rw-r--r-- like a download (temporary directories and safetensors start private)."""
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None) -> None:
    """Put tokenizer files into ``out_dir``: the built-in Qwen3-Next ones (generated once and cached),
    or those of ``tokenizer_path`` re-saved in the hub layout."""
    from ..data.tokenizer import load_tokenizer, qwen_tokenizer_dir, save_tokenizer

    if tokenizer_path is None:
        src = qwen_tokenizer_dir()
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, Path(out_dir) / f)
    else:
        save_tokenizer(load_tokenizer(tokenizer_path), out_dir)
