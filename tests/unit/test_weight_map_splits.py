"""``Rule.split`` (how each Megatron tensor is spread over ranks) against megatron-core itself: the tiny
model is built on CPU and every checkpoint tensor's parameter is looked up; tensor-parallel rules must
name parameters megatron marks ``tensor_model_parallel``, replicated rules parameters it does not, and
expert rules the stacked routed-expert weights. The planner counts memory by these splits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models/tiny_qwen3_next/config.json"


@pytest.fixture(scope="module")
def model():
    from qnext.megatron.model import build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device, initialize_parallel

    initialize_parallel()
    with construction_device("cpu"):
        return build_model(TINY, None, torch.float32, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))


def _param_of_key(model) -> dict[str, tuple[str, torch.nn.Parameter]]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from qnext.megatron.model import _sharded_metadata

    by_storage = {p.untyped_storage().data_ptr(): (n, p) for n, p in model.named_parameters()}
    sd = model.sharded_state_dict(metadata=_sharded_metadata())
    apply_factories(sd)
    out = {}
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            hit = by_storage.get(v.data.untyped_storage().data_ptr())
            if hit is not None:
                out[v.key] = hit
    return out


def test_every_rule_split_matches_megatrons_parameter(model):
    from qnext.models.qwen3_next import build_weight_map
    from qnext.models.weight_map import EXPERT_PARALLEL, REPLICATED, TENSOR_PARALLEL

    params = _param_of_key(model)
    wm = build_weight_map(json.loads(TINY.read_text()))
    seen = {REPLICATED: 0, TENSOR_PARALLEL: 0, EXPERT_PARALLEL: 0}
    for m in wm.mappings:
        for piece in m.pieces:
            if piece.key.startswith("mtp."):
                continue  # the MTP block is not built for training
            name, p = params[piece.key]
            tp = bool(getattr(p, "tensor_model_parallel", False))
            expert = ".mlp.experts." in name
            split = m.rule.split
            seen[split] += 1
            assert expert == (split == EXPERT_PARALLEL), (piece.key, name, split)
            assert tp == (split != REPLICATED), (piece.key, name, split, tp)
    assert all(seen.values()), seen


def test_slime_gdn_rows_are_replicated():
    from qnext.models.qwen3_next_formats import SLIME_WEIGHT_MAP
    from qnext.models.weight_map import REPLICATED

    gdn = [r for r in SLIME_WEIGHT_MAP if any(".self_attention.linear_attn." in k or ".self_attention.input_layernorm" in k
                                               for k in r.mg)]
    assert len(gdn) == 8 and all(r.split == REPLICATED for r in gdn)


def test_unknown_split_is_refused():
    from qnext.models.weight_map import Rule

    with pytest.raises(ValueError, match="split"):
        Rule.of("model", "a", "b", split="sideways")
