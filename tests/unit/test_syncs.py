"""``qnext.syncs``: the step number switch and how a recorded sync site is classified (the recording
itself needs CUDA: ``tests/gpu/test_megatron_train_gpu.py``)."""
from __future__ import annotations

import traceback

import pytest

from qnext.errors import UserError
from qnext.syncs import PLANNED, SyncCheck, _caller, planned_reason, sync_check_wanted


def test_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("QNEXT_SYNC_CHECK", raising=False)
    assert not sync_check_wanted(3) and not SyncCheck(3, tmp_path).active
    monkeypatch.setenv("QNEXT_SYNC_CHECK", "3")
    assert sync_check_wanted(3) and not sync_check_wanted(2)
    monkeypatch.setenv("QNEXT_SYNC_CHECK", "third")
    with pytest.raises(UserError, match="QNEXT_SYNC_CHECK"):
        sync_check_wanted(3)


def test_planned_sites_are_named_and_others_are_not():
    (suffix, func), why = next(iter(PLANNED.items()))
    frames = [f"/x/site-packages/{suffix}:120 {func}", "/repo/src/qnext/megatron/train.py:300 train_step"]
    assert planned_reason(frames) == why
    assert planned_reason(["/repo/src/qnext/megatron/attention.py:190 _forward_packed_varlen"]) is None
    assert planned_reason([f"/x/{suffix}:1 some_other_function"]) is None


def test_caller_skips_torch_frames():
    stack = [traceback.FrameSummary("/repo/src/qnext/megatron/gdn.py", 10, "_resolve_cu_seqlens"),
             traceback.FrameSummary("/venv/lib/torch/_tensor.py", 20, "item")]
    assert _caller(stack) == ["/repo/src/qnext/megatron/gdn.py:10 _resolve_cu_seqlens"]
