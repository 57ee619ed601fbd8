"""``parallel.recompute=auto``: the planner picks the least recompute whose plan fits the GPU."""
from __future__ import annotations

from pathlib import Path

import pytest

from qnext.config import load_config
from qnext.plan import AUTO_HEADROOM, GIB, choose_recompute, plan, resolve_recompute

REPO = Path(__file__).resolve().parents[2]


def _proxy(tmp_path, mode: str) -> list[str]:
    import json

    cfg = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text()) | {"num_hidden_layers": 4}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return [f"model.hf_config={path}", "parallel=1gpu", f"train={mode}", "data.seq_length=4096",
            "train.global_batch_size=2", "train.micro_batch_size=1"]


def test_auto_takes_the_least_recompute_that_fits(tmp_path):
    lora = load_config(_proxy(tmp_path, "lora"))
    assert lora.parallel.recompute == "auto"  # the default
    level, why = choose_recompute(lora, 1, 141 * GIB)
    assert level == "none" and "none" in why
    # full training of the 4-layer proxy: no recompute needs more than an H200 holds; the planner's
    # numbers decide, so the choice is exactly the first level whose plan fits
    full = load_config(_proxy(tmp_path, "full"))
    level, why = choose_recompute(full, 1, 141 * GIB)
    from dataclasses import replace

    peaks = {lv: plan(replace(full, parallel=replace(full.parallel, recompute=lv)), 1).peak
             for lv in ("none", "selective", "full")}
    expect = next((lv for lv in ("none", "selective", "full") if peaks[lv] <= AUTO_HEADROOM * 141 * GIB), "full")
    assert level == expect, (level, {k: v / GIB for k, v in peaks.items()})
    assert peaks["none"] > peaks["selective"] > peaks["full"]
    # a small GPU pushes LoRA to recompute too
    small, why = choose_recompute(lora, 1, 20 * GIB)  # its plan without recompute: 19.2 GiB (16 GiB of tensors + 3 buffers)
    assert small != "none" and "none 19." in why, why


def test_a_recipe_level_is_kept_and_resolution_is_concrete(tmp_path):
    cfg = load_config([*_proxy(tmp_path, "lora"), "parallel.recompute=selective"])
    assert choose_recompute(cfg, 1, 141 * GIB) == ("selective", "set by the recipe")
    auto = load_config(_proxy(tmp_path, "lora"))
    resolved, _ = resolve_recompute(auto, 1, 141 * GIB)
    assert resolved.parallel.recompute == "none" and auto.parallel.recompute == "auto"


def test_megatron_flags_of_auto_are_a_concrete_level(tmp_path):
    from qnext.config import validate_config
    from qnext.megatron.args import megatron_argv
    from qnext.megatron.checkpoint import checkpoint_plan

    cfg = load_config([*_proxy(tmp_path, "lora"), "parallel.backend=megatron", f"output_dir={tmp_path / 'out'}"])
    hf = validate_config(cfg, world_size=1, check_files=False)
    argv = megatron_argv(cfg, hf, use_te=False, ckpt=checkpoint_plan(cfg), wandb_installed=False)
    assert "--recompute-granularity" not in argv  # LoRA of the proxy fits 80 GiB without recompute


def test_bad_recompute_value_is_named():
    from qnext.config import validate_config
    from qnext.errors import UserError

    with pytest.raises(UserError, match="parallel.recompute='some'"):
        validate_config(load_config(["parallel.recompute=some"]), world_size=1, check_files=False)


def test_full_proxy_on_an_h200_keeps_selective_recompute(tmp_path):
    """Measured on one H200 (139.8 GiB visible), full training of the proxy at 16 sequences, 2 rows per
    micro-batch: no recompute allocated 130.9 GiB and was slower (the allocator ran short and synchronized,
    1.317 s per step) than selective recompute (1.218 s at 126.5 GiB). auto must keep choosing selective there."""
    ov = [*_proxy(tmp_path, "full"), "train.micro_batch_size=2", "train.global_batch_size=16"]
    level, why = choose_recompute(load_config(ov), 1, 139.8 * GIB)
    assert level == "selective", why  # (experts_act keeps nearly what none keeps: 0.3 GiB less planned)
