"""models/*.sh: generated from the registry, up to date, and the flags mean the model we convert for."""
from __future__ import annotations

import json
import subprocess
import sys

from qnext.models.megatron_args import flat_args, model_args, registry, render_sh

from convert_fixtures import REPO


def test_every_registered_model_has_an_up_to_date_script():
    models = registry(REPO / "models")
    assert {"qwen3_next_80b_a3b", "tiny_qwen3_next"} <= set(models)
    for name, cfg_path in models.items():
        text = render_sh(name, f"models/{name}/config.json", json.loads(cfg_path.read_text()))
        assert (REPO / "models" / f"{name}.sh").read_text() == text, f"models/{name}.sh is stale: run `make model-args`"


def test_80b_flags():
    cfg = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    args = dict(model_args(cfg))
    assert args["--linear-attention-freq"] == "4" and args["--experimental-attention-variant"] == "gated_delta_net"
    assert (args["--num-experts"], args["--moe-router-topk"], args["--moe-ffn-hidden-size"]) == ("512", "10", "512")
    assert (args["--num-attention-heads"], args["--num-query-groups"], args["--kv-channels"]) == ("16", "2", "256")
    assert args["--rotary-percent"] == "0.25" and args["--rotary-base"] == "10000000"
    assert "--apply-layernorm-1p" in args and "--attention-output-gate" in args and "--moe-shared-expert-gate" in args
    assert "--moe-router-pre-softmax" not in args  # norm_topk_prob: top-k then softmax
    assert "--mtp-num-layers" not in args and flat_args(cfg, mtp=True)[-2:] == ["--mtp-num-layers", "1"]


def test_irregular_patterns_become_lists():
    cfg = json.loads((REPO / "models/tiny_qwen3_next/config.json").read_text())
    cfg.update(layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
               mlp_only_layers=[3])
    args = dict(model_args(cfg))
    assert args["--linear-attention-freq"] == "[1,0,0,1]" and args["--moe-layer-freq"] == "[1,1,1,0]"
    assert '--linear-attention-freq "[1,0,0,1]"' in render_sh("x", "x", cfg)


def test_the_script_is_valid_bash():
    out = subprocess.run(["bash", "-c", 'source models/qwen3_next_80b_a3b.sh && echo "${#MODEL_ARGS[@]}"'],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(flat_args(json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())))
