"""The environment switches of the TE-free stack's fast paths, read one way: unset or empty means the
default; ``0``, ``false``, ``no`` and ``off`` (any case) mean off; anything else means on."""
from __future__ import annotations

import os


def switch_on(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")
