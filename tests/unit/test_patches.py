"""`make patch` / `make unpatch` on a scratch copy of the installed fla-core: applying twice changes
nothing the second time, reverting restores the pinned wheel's bytes (sha256 from the wheel's RECORD),
and a file that is neither the wheel's nor its patched form is refused and left as it is."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qnext import patches

REPO = Path(__file__).resolve().parents[2]
RULES = patches.load_rules()
PACKAGES = sorted({r.package for r in RULES})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """A site-packages holding the patched packages' dist-info and the pristine wheel files only."""
    root = tmp_path / "site-packages"
    root.mkdir()
    for package in PACKAGES:
        installed = patches.find_site(package)
        assert installed.version is not None, f"{package} is not installed (make setup installs it)"
        dist = next(iter(patches.md.distributions(name=package)))
        info = Path(dist._path)  # the installed *.dist-info directory
        shutil.copytree(info, root / info.name)
    for rule in RULES:
        for rel in rule.files:
            data, _ = patches.pristine_bytes(rule, rel)
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "qnext.patches", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _hashes(site: Path) -> dict[str, str]:
    return {rel: _sha(site / rel) for rule in RULES for rel in rule.files}


def test_rules_hashes_are_the_pinned_wheels_record():
    for rule in RULES:
        record = patches.find_site(rule.package).record
        for rel, want in rule.files.items():
            assert record.get(rel) == want, f"{rule.id}: {rel} RECORD {record.get(rel)} != rule {want}"


def test_apply_twice_then_revert_restores_the_wheel(site: Path):
    pristine = _hashes(site)
    assert pristine == {rel: h for r in RULES for rel, h in r.files.items()}

    first = _cli("apply", "--site", str(site), "--ignore-rules", "--no-verify")
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count(": applied (") == len(RULES), first.stdout
    after_first = _hashes(site)
    assert all(after_first[rel] != pristine[rel] for rel in pristine), "every patched file must change"

    second = _cli("apply", "--site", str(site), "--ignore-rules", "--no-verify")
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(": already-applied (nothing changed)") == len(RULES), second.stdout
    assert _hashes(site) == after_first

    status = _cli("status", "--site", str(site))
    for rule in RULES:
        for rel in rule.files:
            assert f"[patch]   {rel}: patched" in status.stdout, status.stdout

    back = _cli("revert", "--site", str(site))
    assert back.returncode == 0, back.stdout + back.stderr
    assert back.stdout.count(": reverted (") == len(RULES), back.stdout
    assert _hashes(site) == pristine

    again = _cli("revert", "--site", str(site))
    assert again.stdout.count(": already-pristine") == len(RULES), again.stdout
    assert _hashes(site) == pristine


def test_rule_mismatch_is_skipped_without_touching(site: Path):
    before = _hashes(site)
    out = _cli("apply", "--site", str(site), "--arch", "sm80", "--no-verify")
    assert out.returncode == 0, out.stdout + out.stderr
    after = _hashes(site)
    for rule in RULES:
        if "any" in rule.gpu_archs:  # e.g. the non-reentrant checkpoint fix applies on every machine
            assert f"[patch] {rule.id}: applied (" in out.stdout, out.stdout
            continue
        assert f"[patch] {rule.id}: skipped (for GPU arch " in out.stdout and "this machine: sm80" in out.stdout, out.stdout
        assert all(after[rel] == before[rel] for rel in rule.files), rule.id
    assert any("any" not in r.gpu_archs for r in RULES)


def test_foreign_file_is_refused_and_left_alone(site: Path):
    rule = RULES[0]
    rel = next(iter(rule.files))
    target = site / rel
    target.write_bytes(target.read_bytes() + b"\n# local edit\n")
    edited = _sha(target)
    out = _cli("apply", "--site", str(site), "--ignore-rules", "--no-verify", "--only", rule.id)
    assert out.returncode == 1
    assert f"[patch] {rule.id}: error" in out.stdout and "force-reinstall" in out.stdout, out.stdout
    assert _sha(target) == edited
    out = _cli("revert", "--site", str(site), "--only", rule.id)
    assert out.returncode == 1 and "error" in out.stdout
    assert _sha(target) == edited


def test_unknown_patch_id_is_a_clean_error():
    out = _cli("apply", "--only", "no-such-patch", "--no-verify")
    assert out.returncode == 2
    assert "unknown patch id" in out.stderr and "Traceback" not in out.stderr
