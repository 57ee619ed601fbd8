"""The Megatron-side checkpoint layouts of Qwen3-Next: megatron-core's native one (ours, also
Megatron-Bridge's) and slime's. Each is a table of the same :class:`Rule` vocabulary over the same
HF tensors, so converter, exporter and the layout-to-layout converter walk whichever is asked for.

slime's layout (read at THUDM/slime 624b824, ``slime_plugins/models/qwen3_next.py`` and
``slime/backends/megatron_utils/{hf_to_megatron,megatron_to_hf}/qwen3_next.py``; facts, not code):

- slime's spec replaces the attention module of every linear-attention layer with a wrapper that
  holds transformers' Gated DeltaNet as ``linear_attn`` and its own input norm. The checkpoint keys
  are that module's plain ``state_dict`` names under ``self_attention.``:
  ``linear_attn.{in_proj_qkvz,in_proj_ba,out_proj}.weight``, ``linear_attn.conv1d.weight``,
  ``linear_attn.{A_log,dt_bias}``, ``linear_attn.norm.weight`` and ``input_layernorm.weight``, each
  in HF's own layout (fused per key-head group, plain gated-norm weight, zero-centred input norm),
  replicated across tensor-parallel ranks. These plain modules have no ``_extra_state``.
- Full-attention layers, MoE layers, embeddings, head and the MTP block use megatron's standard
  Transformer Engine spec, so their keys and layouts are those of our table.
- slime swaps the two column halves of the MTP ``eh_proj`` when it loads HF ``mtp.fc.weight`` and
  swaps them back on export. megatron-core 0.19.2 (``MultiTokenPredictionLayer._concat_embeddings``)
  feeds ``eh_proj`` with [embedding; hidden], and vLLM's ``qwen3_next_mtp.py`` feeds ``mtp.fc``
  with [embedding; hidden] too, so the HF tensor is already in megatron's order: our table copies
  it unchanged (as Megatron-Bridge does), and a slime checkpoint holds the halves swapped. The
  ``slime`` table reproduces slime's swap, so a checkpoint moves between slime and HF/ours
  bit-exactly; ``tests/unit/test_slime_format.py`` checks the order against megatron-core's code.
"""
from __future__ import annotations

from typing import Any, Mapping as TMapping, Sequence

import torch

from ..errors import UserError
from .qwen3_next import EXTRA_STATE_MODULES, WEIGHT_MAP, Qwen3NextWeightMap, build_weight_map
from .weight_map import REPLICATED, Rule, Transform

MEGATRON = "megatron"
SLIME = "slime"
FORMATS = (MEGATRON, SLIME)


class SwapColumnHalves(Transform):
    """The two halves of the input dimension (dim 1) exchanged: [a | b] <-> [b | a]."""

    @staticmethod
    def _swap(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=1)
        return torch.cat([b, a], dim=1)

    def to_megatron(self, hf, dims):
        return [self._swap(hf[0])]

    def to_hf(self, mg, dims):
        return [self._swap(mg[0])]

    def row_permutation(self, hf_rows, dims):
        return None  # a column shuffle: no LoRA B rows to move


_SLIME_GDN = "{mg}.self_attention.linear_attn."
_GDN_TENSORS = ("in_proj_qkvz.weight", "in_proj_ba.weight", "conv1d.weight", "dt_bias", "A_log", "norm.weight",
                "out_proj.weight")


def _slime_rules() -> tuple[Rule, ...]:
    """Our table with the linear-attention rows and the MTP ``eh_proj`` row replaced."""
    rows: list[Rule] = [r for r in WEIGHT_MAP
                        if r.scope != "linear_attention" and r.mg != ("mtp.layers.{k}.eh_proj.weight",)]
    rows.append(Rule.of("linear_attention", "{hf}.input_layernorm.weight",
                        "{mg}.self_attention.input_layernorm.weight",
                        note="slime's own Qwen3NextRMSNorm: zero-centred, as HF", split=REPLICATED))
    for name in _GDN_TENSORS:
        rows.append(Rule.of("linear_attention", "{hf}.linear_attn." + name, _SLIME_GDN + name,
                            note="transformers' GatedDeltaNet module, HF layout, whole on every TP rank",
                            split=REPLICATED))
    rows.append(Rule.of("mtp", "mtp.fc.weight", "mtp.layers.{k}.eh_proj.weight", SwapColumnHalves(),
                        note="slime stores [hidden | embedding] columns; HF and megatron-core use [embedding | hidden]"))
    return tuple(rows)


SLIME_WEIGHT_MAP: tuple[Rule, ...] = _slime_rules()
SLIME_EXTRA_STATE_MODULES: tuple[tuple[str, str], ...] = tuple(
    (scope, t) for scope, t in EXTRA_STATE_MODULES if scope != "linear_attention")

_TABLES = {MEGATRON: (WEIGHT_MAP, EXTRA_STATE_MODULES), SLIME: (SLIME_WEIGHT_MAP, SLIME_EXTRA_STATE_MODULES)}

# One key that only a checkpoint of that layout has (the first linear-attention layer is layer 0 in
# every released config; ``detect_format`` looks for the suffix on any layer).
_SIGNATURE = {MEGATRON: ".self_attention.in_proj.weight.query", SLIME: ".self_attention.linear_attn.in_proj_qkvz.weight"}


def check_format(fmt: str) -> str:
    if fmt not in _TABLES:
        raise UserError(f"unknown checkpoint format {fmt!r}", hint=f"use --format {' or --format '.join(FORMATS)}")
    return fmt


def build_format_map(cfg: TMapping[str, Any], mtp_layers: int = 0, fmt: str = MEGATRON) -> Qwen3NextWeightMap:
    """The weight map of one Megatron-side layout (``megatron`` = ours, ``slime``)."""
    rules, extra = _TABLES[check_format(fmt)]
    return build_weight_map(cfg, mtp_layers, rules=rules, extra_state_modules=extra)


def detect_format(keys: Sequence[str] | TMapping[str, Any]) -> str | None:
    """Which layout a checkpoint's tensor keys are in (None: neither signature is present)."""
    found = [f for f, suffix in _SIGNATURE.items() if any(k.endswith(suffix) for k in keys)]
    return found[0] if len(found) == 1 else None


def require_format(keys: Sequence[str] | TMapping[str, Any], fmt: str, where: str, flag: str = "--format") -> None:
    """A UserError naming the right ``--format`` when a checkpoint is in the other layout."""
    found = detect_format(keys)
    if found is not None and found != fmt:
        raise UserError(
            f"{where} is a {found}-layout checkpoint (it has *{_SIGNATURE[found]}), but {flag} {fmt} was asked for",
            hint=f"pass {flag} {found}" + (" (slime's own converter and training runs write this layout)"
                                           if found == SLIME else " (make convert's default layout)"),
        )
