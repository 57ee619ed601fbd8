"""The fast-path environment switches (qnext.megatron.switches) read one way."""
from __future__ import annotations

import pytest

from qnext.megatron.switches import switch_on


@pytest.mark.parametrize("value,default,want", [
    (None, True, True), (None, False, False), ("", True, True), ("  ", False, False),
    ("0", True, False), ("OFF", True, False), ("no", True, False), ("false", True, False),
    ("1", False, True), ("yes", False, True), ("on", False, True),
])
def test_switch_values(monkeypatch, value, default, want):
    if value is None:
        monkeypatch.delenv("QNEXT_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("QNEXT_TEST_SWITCH", value)
    assert switch_on("QNEXT_TEST_SWITCH", default) is want
