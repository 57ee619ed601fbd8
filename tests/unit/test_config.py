"""Recipe composition, typed overrides and the early validation messages."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qnext.config import load_config, validate_config
from qnext.config.load import RECIPES_DIR, available
from qnext.config.validate import check_divisibility
from qnext.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_and_recipe_override():
    base = load_config([])
    assert base.model.name == "tiny_qwen3_next" and base.parallel.backend == "fsdp"
    cfg = load_config(["recipe=tiny_lora_cpu", "train.steps=7", "parallel.dtype=fp32"])
    assert cfg.train.steps == 7
    assert cfg.parallel.device == "cpu"
    assert cfg.output_dir == "runs/tiny_qwen3_next-lora"  # interpolation resolved


def test_every_recipe_composes():
    for name in available("recipe"):
        cfg = load_config([f"recipe={name}"])
        assert cfg.model.hf_config.endswith("config.json"), name


def test_unknown_key_on_command_line_is_named():
    with pytest.raises(UserError) as e:
        load_config(["train.lrr=1"])
    assert "train.lrr" in e.value.message and "train.lr" in e.value.message


@pytest.mark.parametrize("typo, meant", [("train.lr_max", "train.lr"), ("train.warmup", "train.warmup_steps"),
                                         ("parallel.tpp", "parallel.tp"), ("train.lora.rank", "train.lora.r"),
                                         ("data.seq_len", "data.seq_length")])
def test_did_you_mean_suggests_the_intended_key(typo, meant):
    with pytest.raises(UserError) as e:
        load_config([f"{typo}=1"])
    assert f"did you mean '{meant}'?" in e.value.message, e.value.message


def test_wrong_type_is_named():
    with pytest.raises(UserError) as e:
        load_config(["parallel.tp=two"])
    assert "parallel.tp" in e.value.message


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    rdir = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, rdir)
    with open(rdir / "train" / "lora.yaml", "a") as f:
        f.write("learning_rat: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config([], recipes_dir=rdir)
    assert "train.learning_rat" in e.value.message
    assert "train/lora.yaml" in e.value.message


def test_unknown_group_choice_lists_choices():
    with pytest.raises(UserError) as e:
        load_config(["parallel=nope"])
    assert "cpu" in (e.value.hint or "")


def test_divisibility_real_model():
    import json

    hf = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    assert check_divisibility(hf, tp=2, ep=8, pp=4) == []
    probs = check_divisibility(hf, tp=4, ep=3, pp=5)
    text = "\n".join(probs)
    assert "parallel.tp=4" in text and "num_key_value_heads" in text  # 2 KV heads
    assert "parallel.ep=3" in text and "512 experts" in text
    assert "parallel.pp=5" in text and "48 layers" in text


def test_validate_world_size_and_batch(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    cfg = load_config(["parallel=1gpu", "parallel.tp=2", f"data.path={data}", "data.eval_prompts=null",
                       "train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(UserError) as e:
        validate_config(cfg, world_size=4)
    assert "train.global_batch_size=6" in e.value.message
    cfg.train.global_batch_size = 8
    assert validate_config(cfg, world_size=4)["model_type"] == "qwen3_next"
    with pytest.raises(UserError) as e:
        validate_config(cfg, world_size=3)
    assert "tp*pp*cp" in e.value.message


def test_cli_gives_clean_error_and_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "qnext.config", "validate", "parallel=1gpu", "parallel.tp=3"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "parallel.tp=3 does not divide the 4 attention heads" in proc.stderr
