"""A converted checkpoint carries what Megatron-Bridge (NVIDIA-NeMo/Megatron-Bridge 067f987) reads
before it loads weights: ``training/checkpointing.py`` reads the tracker, the common state
(megatron-core's ``load_common_state_dict`` + ``load_content_metadata``) and ``<iteration dir>/
run_config.yaml`` (``model.{tensor,pipeline}_model_parallel_size``, ``checkpoint.{save_rng,save_optim,
fully_parallel_save}``; without the file it raises "Legacy checkpoint missing 'args'"), and AutoBridge
builds its model config from the file's ``model`` section. Read here the same way, with megatron-core's
own functions where Bridge calls them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from qnext.convert import convert_hf_to_torch_dist

from convert_fixtures import write_hf_checkpoint

# fields of Bridge's GPTModelProvider (and its Qwen3-Next bridge) that are not TransformerConfig's
PROVIDER_ONLY = {"_target_", "transformer_layer_spec", "hetereogenous_dist_checkpoint", "hf_model_id", "seq_length",
                 "vocab_size", "share_embeddings_and_output_weights", "position_embedding_type", "rotary_percent",
                 "rotary_base"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    hf = write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    convert_hf_to_torch_dist(hf, out, progress=False, log=None)
    return hf, out


def test_bridge_loader_finds_run_config_and_common_state(converted):
    from megatron.core import dist_checkpointing

    hf, ckpt = converted
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    it = ckpt / "release"  # Bridge's get_checkpoint_name(..., release=True)
    assert dist_checkpointing.check_is_distributed_checkpoint(str(it))
    common = dist_checkpointing.load_common_state_dict(str(it))
    assert dist_checkpointing.load_content_metadata(preloaded_state_dict=common) == {
        "singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    run = yaml.safe_load((it / "run_config.yaml").read_text())
    assert (run["model"]["tensor_model_parallel_size"], run["model"]["pipeline_model_parallel_size"]) == (1, 1)
    assert run["checkpoint"] == {"save_optim": False, "save_rng": False, "fully_parallel_save": False}
    assert run["model"]["hf_model_id"] == str(hf.resolve())


def test_autobridge_model_section_is_the_qwen3_next_provider(converted):
    from megatron.core.transformer import TransformerConfig

    hf, ckpt = converted
    model = yaml.safe_load((ckpt / "release" / "run_config.yaml").read_text())["model"]
    cfg = json.loads((hf / "config.json").read_text())
    assert model["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    assert model["transformer_layer_spec"]["_target_"].endswith("get_transformer_block_with_experimental_attention_variant_spec")
    unknown = set(model) - PROVIDER_ONLY - {f.name for f in dataclasses.fields(TransformerConfig)}
    assert not unknown, f"not TransformerConfig fields: {sorted(unknown)}"
    # what Bridge's Qwen3NextBridge.provider_bridge sets, from this config.json
    want = {"num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
            "num_attention_heads": cfg["num_attention_heads"], "num_query_groups": cfg["num_key_value_heads"],
            "kv_channels": cfg["head_dim"], "num_moe_experts": cfg["num_experts"],
            "moe_ffn_hidden_size": cfg["moe_intermediate_size"], "moe_router_topk": cfg["num_experts_per_tok"],
            "moe_shared_expert_intermediate_size": cfg["shared_expert_intermediate_size"],
            "linear_attention_freq": cfg["full_attention_interval"], "linear_num_key_heads": cfg["linear_num_key_heads"],
            "linear_num_value_heads": cfg["linear_num_value_heads"], "experimental_attention_variant": "gated_delta_net",
            "layernorm_zero_centered_gamma": True, "attention_output_gate": True, "moe_shared_expert_gate": True,
            "qk_layernorm": True, "gated_linear_unit": True, "hidden_dropout": 0.0, "mtp_num_layers": 1,
            "share_embeddings_and_output_weights": False, "hetereogenous_dist_checkpoint": True}
    assert {k: model.get(k) for k in want} == want


def test_slime_layout_gets_no_bridge_run_config(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf", with_mtp=False)
    convert_hf_to_torch_dist(hf, tmp_path / "s", fmt="slime", progress=False, log=None)
    assert not (tmp_path / "s" / "release" / "run_config.yaml").exists()
    assert (tmp_path / "s" / "release" / "common.pt").is_file()
