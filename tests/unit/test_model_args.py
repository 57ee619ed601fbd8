"""models/*.sh: generated from the registry, up to date, and the flags mean the model we convert for."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qnext.models.megatron_args import flat_args, model_args, registry, render_sh, render_slime_sh

from convert_fixtures import REPO


def test_every_registered_model_has_an_up_to_date_script():
    models = registry(REPO / "models")
    assert {"qwen3_next_80b_a3b", "tiny_qwen3_next"} <= set(models)
    for name, cfg_path in models.items():
        text = render_sh(name, f"models/{name}/config.json", json.loads(cfg_path.read_text()))
        assert (REPO / "models" / f"{name}.sh").read_text() == text, f"models/{name}.sh is stale: run `make model-args`"
        slime = render_slime_sh(name, f"models/{name}/config.json", json.loads(cfg_path.read_text()))
        assert (REPO / "models" / f"{name}.slime.sh").read_text() == slime, f"models/{name}.slime.sh is stale"


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


@pytest.mark.parametrize("name", ["qwen3_next_80b_a3b", "tiny_qwen3_next"])
def test_slime_flags_are_what_slimes_provider_accepts(name):
    """slime 624b824: its provider asserts no --experimental-attention-variant, its spec is given by
    --spec <module> <function>, --moe-layer-freq is a list; dropout is explicit zero in both files."""
    cfg = json.loads((REPO / f"models/{name}/config.json").read_text())
    slime = dict(model_args(cfg, slime=True))
    assert slime["--spec"] == "slime_plugins.models.qwen3_next get_qwen3_next_spec"
    assert not any(f.startswith(("--experimental-attention-variant", "--linear-")) for f in slime)
    assert slime["--moe-layer-freq"] == "[" + ",".join(["1"] * cfg["num_hidden_layers"]) + "]"
    assert "--use-gated-attention" in slime and "--attention-output-gate" in slime
    mg = dict(model_args(cfg))
    for args in (slime, mg):
        assert (args["--attention-dropout"], args["--hidden-dropout"]) == ("0", "0")
    argv = flat_args(cfg, slime=True)
    assert argv[:3] == ["--spec", "slime_plugins.models.qwen3_next", "get_qwen3_next_spec"]
    out = subprocess.run(["bash", "-c", f'source models/{name}.slime.sh && printf "%s\\n" "${{MODEL_ARGS[@]}}"'],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == argv
