"""How a compat module replaces a megatron-core function: once, marked, switchable, and only when the
function exists (``QNEXT_MEGATRON_FIXES=0`` leaves megatron as it is, to measure what a fix changes)."""
from __future__ import annotations

import importlib
import os
import warnings

PINNED_MEGATRON_CORE = "0.19.2"  # the version every fix here was measured against (pyproject.toml's pin)
_version_checked = False


def check_megatron_core_version(installed: str | None = None) -> str | None:
    """Warn once per process when the installed megatron-core is not the pinned one: each fix names
    behaviour of that version, and another one may have fixed, moved or changed what is patched.
    Returns the warning text (None when the versions match or it was already said)."""
    global _version_checked
    if _version_checked:
        return None
    _version_checked = True
    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("megatron-core")
        except PackageNotFoundError:
            return None
    if installed == PINNED_MEGATRON_CORE:
        return None
    text = (f"megatron-core {installed} is installed; qnext.megatron.compat was written and checked for "
            f"{PINNED_MEGATRON_CORE}. Re-run `make grad-layouts` and the resume tests before trusting a run, "
            "or install the pinned version (make setup)")
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


def fixes_enabled() -> bool:
    """False under ``QNEXT_MEGATRON_FIXES=0`` (megatron as it is; nothing here is installed)."""
    return os.environ.get("QNEXT_MEGATRON_FIXES", "1") != "0"


def install(module_name: str, attr: str, wrap) -> bool:
    """Replace ``module_name.attr`` by ``wrap(original)`` once (the wrapper is marked ``qnext_fixed``);
    True when the replacement is (now) in place. ``QNEXT_MEGATRON_FIXES=0`` leaves megatron as it is (to
    measure what a fix changes), and a megatron without the function is left alone too."""
    if not fixes_enabled():
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    original = getattr(module, attr, None)
    if original is None:
        return False
    if not getattr(original, "qnext_fixed", False):
        fixed = wrap(original)
        fixed.qnext_fixed = True
        setattr(module, attr, fixed)
    return True
