"""A script in benchmarks/ must not share its name with a package that transformers probes: running a
benchmark puts benchmarks/ first on sys.path, and transformers' availability checks import what they find
there. ``benchmarks/kernels.py`` once did, so every HF model built with benchmarks/ on the path imported our
kernel suites (and failed to build on the meta device)."""
from __future__ import annotations

import re
from pathlib import Path

import transformers.utils.import_utils as iu

REPO = Path(__file__).resolve().parents[2]


def test_no_benchmark_script_shadows_a_package_transformers_imports():
    probed = set(re.findall(r'_is_package_available\(\s*"([A-Za-z0-9_]+)"', Path(iu.__file__).read_text()))
    assert len(probed) > 50 and "kernels" in probed  # the pattern still finds transformers' checks
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
    assert not scripts & probed, sorted(scripts & probed)
