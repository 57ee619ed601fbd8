"""``qnext.megatron.compat.step_reductions``: train_step's post-optimizer reductions in a one-rank group
return megatron's answer without touching the device; larger groups go to megatron's own reduction."""
from __future__ import annotations

import struct

import pytest

pytest.importorskip("megatron.training")


def test_one_rank_group_answers_without_the_device(monkeypatch):
    import megatron.training.training as training
    from megatron.training.utils import common_utils

    from qnext.megatron.compat import step_reductions
    from qnext.syncs import planned_reason

    monkeypatch.setattr(training, "logical_and_across_model_parallel_group",
                        common_utils.logical_and_across_model_parallel_group)
    monkeypatch.setattr(training, "reduce_max_stat_across_model_parallel_group",
                        common_utils.reduce_max_stat_across_model_parallel_group)
    with pytest.raises(Exception):  # megatron's own builds a CUDA tensor: no GPU here
        training.reduce_max_stat_across_model_parallel_group(1.5)
    assert step_reductions.install_step_reductions_fix()
    assert step_reductions.install_step_reductions_fix()  # idempotent
    land = training.logical_and_across_model_parallel_group
    rmax = training.reduce_max_stat_across_model_parallel_group
    assert land.qnext_fixed and land.__wrapped__ is common_utils.logical_and_across_model_parallel_group
    assert land(True) is True and land(False) is False
    norm = 0.1234567890123  # not a float32 value: megatron hands back its float32 rounding
    assert rmax(norm) == struct.unpack("f", struct.pack("f", norm))[0] != norm
    assert rmax(None) is None and rmax(-1.0) is None  # -1.0 is megatron's "no rank has it"
    assert rmax(3.0) == 3.0

    calls = []
    monkeypatch.setattr(step_reductions, "_group_size", lambda group: 2)  # a model-parallel group
    fixed_and = step_reductions._logical_and(lambda input, group=None: calls.append(("and", input)) or False)
    fixed_max = step_reductions._reduce_max(lambda stat, group=None: calls.append(("max", stat)) or 7.0)
    assert fixed_and(True) is False and fixed_max(1.0) == 7.0
    assert calls == [("and", True), ("max", 1.0)]
    frame = "/x/megatron/training/utils/common_utils.py:310 logical_and_across_model_parallel_group"
    assert planned_reason([frame]) is not None  # what remains at mp > 1 is named


def test_switch_off_leaves_megatron(monkeypatch):
    import megatron.training.training as training
    from megatron.training.utils import common_utils

    from qnext.megatron.compat import step_reductions

    monkeypatch.setattr(training, "logical_and_across_model_parallel_group",
                        common_utils.logical_and_across_model_parallel_group)
    monkeypatch.setenv("QNEXT_MEGATRON_FIXES", "0")
    assert not step_reductions.install_step_reductions_fix()
    assert training.logical_and_across_model_parallel_group is common_utils.logical_and_across_model_parallel_group
