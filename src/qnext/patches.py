"""Apply, revert and inspect the patches in ``patches/`` (unified diffs against pinned wheels).

``python -m qnext.patches apply|revert|status`` — what ``make patch`` / ``make unpatch`` run.

Each patch in ``patches/rules.toml`` names a package and exact version, the GPU architectures and
Triton versions it is for, and the sha256 of every file it touches as shipped in the pinned wheel.
A file is only ever changed from a state we can prove: ``pristine`` (hash equals the wheel's) or
``patched`` (reverse-applying the diff gives the wheel's hash). Anything else is ``unknown`` and
left alone. So ``apply`` twice changes nothing the second time and ``revert`` restores the wheel's
bytes. The diffs are applied here, in Python: no ``patch`` binary is needed.

Files are replaced atomically (new inode): installers such as uv hard-link site-packages files to
their cache, and an in-place write would corrupt the cache for every other environment.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, cli_main
from .unidiff import FileDiff, Hunk, PatchError, apply_file_diff, parse_unified_diff  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCHES_DIR = Path(os.environ.get("QNEXT_PATCHES", REPO_ROOT / "patches"))

PRISTINE, PATCHED, UNKNOWN, MISSING = "pristine", "patched", "unknown", "missing"


# ----------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class PatchRule:
    id: str
    diff: Path
    package: str
    version: str
    gpu_archs: tuple[str, ...]
    triton: str
    why: str
    upstream: tuple[str, ...]
    files: dict[str, str]  # relative path -> sha256 of the pristine file in the pinned wheel
    wheel_sha256: str | None = None
    requires_parity: str | None = None

    def file_diffs(self) -> list[FileDiff]:
        return parse_unified_diff(self.diff.read_text())


def load_rules(patches_dir: Path = PATCHES_DIR) -> list[PatchRule]:
    path = patches_dir / "rules.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found", hint="run from the repository, or set QNEXT_PATCHES=/path/to/patches")
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: {err}")
    rules, owners = [], {}
    for entry in data.get("patch", []):
        try:
            rule = PatchRule(
                id=entry["id"], diff=patches_dir / entry["diff"], package=entry["package"],
                version=entry["version"], gpu_archs=tuple(entry["gpu_archs"]), triton=entry["triton"],
                why=" ".join(entry["why"].split()), upstream=tuple(entry.get("upstream", ())),
                files=dict(entry["files"]), wheel_sha256=entry.get("wheel_sha256"),
                requires_parity=entry.get("requires_parity"),
            )
        except KeyError as err:
            raise UserError(f"{path}: patch {entry.get('id', '?')!r} lacks the key {err}")
        diff_paths = {fd.path for fd in rule.file_diffs()}
        if diff_paths != set(rule.files):
            raise UserError(f"{path}: patch {rule.id!r}: files {sorted(rule.files)} != files in {rule.diff.name} {sorted(diff_paths)}")
        for f in rule.files:  # one owner per file keeps every state provable
            if (rule.package, f) in owners:
                raise UserError(f"{path}: {f} is patched by both {owners[rule.package, f]!r} and {rule.id!r}")
            owners[rule.package, f] = rule.id
        rules.append(rule)
    return rules


# ----------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class Machine:
    archs: tuple[str, ...]  # e.g. ("sm90",); empty without a GPU
    gpu_names: tuple[str, ...]
    triton: str | None

    def describe(self) -> str:
        gpus = ", ".join(f"{n} ({a})" for n, a in zip(self.gpu_names, self.archs)) or "no GPU"
        return f"{gpus}; triton {self.triton or 'not installed'}"


def detect_machine(arch_override: str | None = None) -> Machine:
    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = None
    if arch_override:
        archs = tuple(a.strip() for a in arch_override.split(",") if a.strip())
        return Machine(archs, tuple("(--arch)" for _ in archs), triton_version)
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        caps = [torch.cuda.get_device_capability(i) for i in range(n)]
        names = tuple(torch.cuda.get_device_name(i) for i in range(n))
    except Exception:  # no torch or a broken driver: treat as no GPU
        caps, names = [], ()
    return Machine(tuple(f"sm{a}{b}" for a, b in caps), names, triton_version)


def _version_in(version: str | None, spec: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    return version is not None and Version(version.split("+")[0]) in SpecifierSet(spec)


def rule_matches(rule: PatchRule, machine: Machine) -> tuple[bool, str]:
    if "any" not in rule.gpu_archs:
        hit = sorted(set(rule.gpu_archs) & set(machine.archs))
        if not hit:
            seen = ",".join(machine.archs) or "no GPU visible"
            return False, f"for GPU arch {'/'.join(rule.gpu_archs)}; this machine: {seen}"
    if not _version_in(machine.triton, rule.triton):
        return False, f"for triton {rule.triton}; installed: {machine.triton}"
    return True, f"matches ({machine.describe()})"


# ----------------------------------------------------------------------------- installed files
@dataclass(frozen=True)
class Site:
    root: Path  # directory that holds the package (site-packages)
    version: str | None  # installed version of the rule's package, None if absent
    record: dict[str, str] = field(default_factory=dict)  # RECORD: relpath -> sha256 hex


def _record_hashes(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            digest = parts[1].split("=", 1)[1]
            out[parts[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def find_site(package: str, site_dir: Path | None = None) -> Site:
    """Where ``package`` is installed (or its dist-info inside ``site_dir``), its version and RECORD."""
    try:
        dists = list(md.distributions(name=package, path=[str(site_dir)])) if site_dir else [md.distribution(package)]
    except md.PackageNotFoundError:
        dists = []
    if not dists:
        return Site(site_dir or Path("."), None)
    dist = dists[0]
    return Site(Path(dist.locate_file("")), dist.version, _record_hashes(dist.read_text("RECORD") or ""))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def classify(data: bytes | None, pristine_sha: str, diff: FileDiff) -> str:
    if data is None:
        return MISSING
    if sha256(data) == pristine_sha:
        return PRISTINE
    try:
        back = apply_file_diff(data.decode("utf-8"), diff, reverse=True)
    except (PatchError, UnicodeDecodeError):
        return UNKNOWN
    return PATCHED if sha256(back.encode()) == pristine_sha else UNKNOWN


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".qnext")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- actions
@dataclass
class Outcome:
    rule: PatchRule
    action: str  # applied | already-applied | reverted | already-pristine | skipped | error | would-apply ...
    detail: str
    files: dict[str, str] = field(default_factory=dict)  # relpath -> state after the action

    @property
    def ok(self) -> bool:
        return self.action != "error"

    def line(self) -> str:
        return f"[patch] {self.rule.id}: {self.action} ({self.detail})"


def _states(rule: PatchRule, site: Site) -> dict[str, tuple[str, bytes | None, FileDiff]]:
    out = {}
    for fd in rule.file_diffs():
        data = _read(site.root / fd.path)
        out[fd.path] = (classify(data, rule.files[fd.path], fd), data, fd)
    return out


def _check_site(rule: PatchRule, site: Site) -> str | None:
    if site.version is None:
        return f"{rule.package} is not installed"
    if site.version != rule.version:
        return f"for {rule.package}=={rule.version}; installed: {site.version}"
    for rel, want in rule.files.items():
        have = site.record.get(rel)
        if have is not None and have != want:
            return f"{rel}: the installed wheel's RECORD has sha256 {have[:12]}, the rule expects {want[:12]} (another build?)"
    return None


def apply_rule(rule: PatchRule, site: Site, *, dry_run: bool = False) -> Outcome:
    problem = _check_site(rule, site)
    if problem:
        return Outcome(rule, "skipped", problem)
    states = _states(rule, site)
    bad = {p: s for p, (s, _, _) in states.items() if s in (UNKNOWN, MISSING)}
    if bad:
        return Outcome(rule, "error", "; ".join(f"{p} is {s} (neither the wheel's file nor its patched form)" for p, s in bad.items())
                       + f"; fix: reinstall {rule.package}=={rule.version} (pip install --force-reinstall --no-deps), then make patch")
    todo = {p: v for p, v in states.items() if v[0] == PRISTINE}
    if not todo:
        return Outcome(rule, "already-applied", "nothing changed", {p: PATCHED for p in states})
    new_bytes = {}
    for path, (_, data, fd) in todo.items():
        new = apply_file_diff(data.decode("utf-8"), fd).encode()
        if classify(new, rule.files[path], fd) != PATCHED:  # must revert to the wheel's bytes
            return Outcome(rule, "error", f"{path}: patched text does not reverse to the wheel's file")
        new_bytes[path] = new
    if dry_run:
        return Outcome(rule, "would-apply", ", ".join(todo), {p: PRISTINE for p in states})
    for path, data in new_bytes.items():
        _write_atomic(site.root / path, data)
    detail = ", ".join(f"{p} sha256 {rule.files[p][:12]} -> {sha256(d)[:12]}" for p, d in new_bytes.items())
    return Outcome(rule, "applied", detail, {p: PATCHED for p in states})


def revert_rule(rule: PatchRule, site: Site, *, dry_run: bool = False) -> Outcome:
    if site.version is None:
        return Outcome(rule, "skipped", f"{rule.package} is not installed")
    if site.version != rule.version:
        return Outcome(rule, "skipped", f"for {rule.package}=={rule.version}; installed: {site.version}")
    states = _states(rule, site)
    bad = {p: s for p, (s, _, _) in states.items() if s in (UNKNOWN, MISSING)}
    if bad:
        return Outcome(rule, "error", "; ".join(f"{p} is {s}" for p, s in bad.items())
                       + f"; fix: pip install --force-reinstall --no-deps {rule.package}=={rule.version}")
    todo = {p: v for p, v in states.items() if v[0] == PATCHED}
    if not todo:
        return Outcome(rule, "already-pristine", "nothing changed", {p: PRISTINE for p in states})
    new_bytes = {}
    for path, (_, data, fd) in todo.items():
        new = apply_file_diff(data.decode("utf-8"), fd, reverse=True).encode()
        if sha256(new) != rule.files[path]:
            return Outcome(rule, "error", f"{path}: reversed text does not hash to the wheel's file")
        new_bytes[path] = new
    if dry_run:
        return Outcome(rule, "would-revert", ", ".join(todo), {p: PATCHED for p in states})
    for path, data in new_bytes.items():
        _write_atomic(site.root / path, data)
    detail = ", ".join(f"{p} restored, sha256 {rule.files[p][:12]} (= wheel)" for p in new_bytes)
    return Outcome(rule, "reverted", detail, {p: PRISTINE for p in states})


def status_rule(rule: PatchRule, site: Site, machine: Machine) -> Outcome:
    match, why = rule_matches(rule, machine)
    problem = _check_site(rule, site)
    if problem:
        return Outcome(rule, "not-applicable", problem)
    states = {p: s for p, (s, _, _) in _states(rule, site).items()}
    summary = ",".join(sorted(set(states.values())))
    return Outcome(rule, summary, f"rule {'matches' if match else 'does not match: ' + why}", states)


def apply_all(rules: list[PatchRule], machine: Machine, *, site_dir: Path | None = None,
              only: set[str] | None = None, ignore_rules: bool = False, dry_run: bool = False) -> list[Outcome]:
    outcomes = []
    for rule in rules:
        if only and rule.id not in only:
            continue
        match, why = rule_matches(rule, machine)
        if not (match or ignore_rules):
            outcomes.append(Outcome(rule, "skipped", why))
            continue
        outcomes.append(apply_rule(rule, find_site(rule.package, site_dir), dry_run=dry_run))
    return outcomes


def revert_all(rules: list[PatchRule], *, site_dir: Path | None = None, only: set[str] | None = None,
               dry_run: bool = False) -> list[Outcome]:
    return [revert_rule(r, find_site(r.package, site_dir), dry_run=dry_run) for r in rules if not only or r.id in only]


# ----------------------------------------------------------------------------- pristine bytes
def wheel_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("QNEXT_WHEEL_DIRS", "").split(os.pathsep) if p]
    return dirs + [REPO_ROOT / ".whl", Path.home() / ".cache" / "qnext" / "wheels", Path("/opt/wheels")]


def find_wheel(rule: PatchRule) -> Path | None:
    """The pinned wheel file, if one is on this machine (checked against ``wheel_sha256``)."""
    stem = f"{rule.package.replace('-', '_')}-{rule.version}-"
    for d in wheel_dirs():
        for whl in sorted(d.glob(f"{stem}*.whl")) if d.is_dir() else []:
            if rule.wheel_sha256 is None or sha256(whl.read_bytes()) == rule.wheel_sha256:
                return whl
    return None


def pristine_bytes(rule: PatchRule, relpath: str, site: Site | None = None) -> tuple[bytes, str]:
    """The wheel's bytes of ``relpath`` and where they came from; always hash-checked."""
    want = rule.files[relpath]
    whl = find_wheel(rule)
    if whl is not None:
        with zipfile.ZipFile(whl) as z:
            data = z.read(relpath)
        source = f"wheel {whl}"
    else:
        site = site or find_site(rule.package)
        data = _read(site.root / relpath)
        fd = next(f for f in rule.file_diffs() if f.path == relpath)
        state = classify(data, want, fd)
        if state == PATCHED:
            data = apply_file_diff(data.decode(), fd, reverse=True).encode()
        elif state != PRISTINE:
            raise PatchError(f"{relpath}: installed file is {state}; no pinned wheel found in {[str(d) for d in wheel_dirs()]}")
        source = f"installed {site.root / relpath} ({state})"
    if sha256(data) != want:
        raise PatchError(f"{relpath} from {source}: sha256 {sha256(data)[:12]} != wheel's {want[:12]}")
    return data, source


# ----------------------------------------------------------------------------- command line
def _verify_parity(outcomes: list[Outcome]) -> int:
    """Run the parity check that lifts a guard, for applied patches that need one (GPU only)."""
    rc = 0
    for o in outcomes:
        if o.action not in ("applied", "already-applied") or not o.rule.requires_parity:
            continue
        cmd = [sys.executable, "-m", "qnext.kernels", "--suite", f"{o.rule.requires_parity}-fast", "--record"]
        print(f"[patch] {o.rule.id}: running the {o.rule.requires_parity} parity check that enables it: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run(cmd, env=env)
        if res.returncode == 0:
            print(f"[patch] {o.rule.id}: parity passed and recorded; the guarded kernel is enabled on this machine")
        else:
            print(f"[patch] {o.rule.id}: parity FAILED (exit {res.returncode}); the guard stays on, the kernel is refused")
            rc = 1
    return rc


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qnext.patches", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["apply", "revert", "status"])
    ap.add_argument("--only", default="", help="comma-separated patch ids (default: all)")
    ap.add_argument("--arch", default=None, help="GPU arch(s) to match instead of the visible GPUs, e.g. sm90")
    ap.add_argument("--ignore-rules", action="store_true", help="apply even where the rule does not match (testing)")
    ap.add_argument("--site", type=Path, default=None, help="site-packages directory to patch (default: where the package is installed)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="do not run the parity check that enables guarded patches")
    args = ap.parse_args(argv)
    rules = load_rules()
    only = {s for s in args.only.split(",") if s} or None
    unknown = (only or set()) - {r.id for r in rules}
    if unknown:
        raise UserError(f"unknown patch id(s) {sorted(unknown)}", hint=f"choose from {[r.id for r in rules]}")
    machine = detect_machine(args.arch)
    if args.command == "apply":
        outcomes = apply_all(rules, machine, site_dir=args.site, only=only, ignore_rules=args.ignore_rules, dry_run=args.dry_run)
    elif args.command == "revert":
        outcomes = revert_all(rules, site_dir=args.site, only=only, dry_run=args.dry_run)
    else:
        outcomes = [status_rule(r, find_site(r.package, args.site), machine) for r in rules if not only or r.id in only]
    for o in outcomes:
        print(o.line())
        if args.command == "status":
            for path, state in o.files.items():
                print(f"[patch]   {path}: {state}")
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.action] = counts.get(o.action, 0) + 1
    print(f"[patch] {args.command}: " + ", ".join(f"{n} {a}" for a, n in counts.items()) + f" — {machine.describe()}")
    rc = 0 if all(o.ok for o in outcomes) else 1
    if args.command == "apply" and not args.dry_run and not args.no_verify and machine.archs and args.arch is None:
        rc = max(rc, _verify_parity(outcomes))
    return rc


if __name__ == "__main__":
    sys.exit(main())
