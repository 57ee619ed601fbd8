"""The run directory, one policy for both backends: what ``output_dir``, ``overwrite`` and ``resume``
mean, the marker that says a directory holds a qnext run, and where the tokenizer comes from.

``plan_output_dir`` decides from the file system alone (it changes nothing, so every rank can call it
and agree), with a backend's own notion of "has a checkpoint" passed in:

| output_dir | ``resume=auto`` | ``resume=never`` | ``overwrite=true`` |
|---|---|---|---|
| missing or empty | fresh | fresh | fresh |
| not empty, no run marker (not ours) | error | error | fresh, contents replaced |
| our run with a checkpoint | resume from it | error | fresh, contents replaced |
| our run without a checkpoint (stopped before its first save) | fresh, contents replaced | error | fresh, contents replaced |

``resume=<checkpoint>`` continues from that checkpoint (the backend checks it is one) into an
``output_dir`` that is empty or ours. ``overwrite=true`` refuses ``/``, the home directory and any
directory containing the current one.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from .config.schema import RecipeConfig
from .config.validate import resolve_path
from .errors import UserError
from .fsutil import atomic_write_text

RUN_MARKER = "run.json"
SUMMARY_FILE = "summary.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

FRESH, RESUME = "fresh", "resume"


@dataclass(frozen=True)
class OutputPlan:
    output_dir: Path
    start: str  # FRESH | RESUME (from this directory's newest checkpoint, or from resume=<checkpoint>)
    clear: bool  # delete the directory's contents before the run writes anything
    explicit_resume: Optional[Path] = None  # resume=<checkpoint>


def is_our_run(path: Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def refuse_dangerous(out: Path) -> None:
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd.is_relative_to(resolved):
        raise UserError(f"refusing overwrite=true on {out}: it is /, your home, or contains the current directory",
                        hint="choose a dedicated output_dir=...")


def plan_output_dir(cfg: RecipeConfig, has_checkpoint: Callable[[Path], bool]) -> OutputPlan:
    """The table in the module docstring. ``has_checkpoint(output_dir)``: the backend's test for a
    complete checkpoint of a run in that directory."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} exists and is not a directory", hint="choose another output_dir=...")
    non_empty = _non_empty(out)
    explicit = resolve_path(cfg.resume) if cfg.resume not in ("auto", "never") else None
    if cfg.overwrite:
        refuse_dangerous(out)
        return OutputPlan(out, RESUME if explicit else FRESH, clear=non_empty, explicit_resume=explicit)
    if non_empty and not is_our_run(out):
        raise UserError(f"output_dir {out} is not empty and holds no qnext run",
                        hint="choose a new output_dir=..., or overwrite=true to replace its contents")
    if explicit is not None:
        return OutputPlan(out, RESUME, clear=False, explicit_resume=explicit)
    if not non_empty:
        return OutputPlan(out, FRESH, clear=False)
    if cfg.resume == "never":
        raise UserError(f"output_dir {out} already holds a run (resume=never)",
                        hint="use resume=auto to continue it, overwrite=true to start over, or a new output_dir")
    if has_checkpoint(out):
        return OutputPlan(out, RESUME, clear=False)
    return OutputPlan(out, FRESH, clear=True)  # our run, stopped before its first checkpoint: nothing to keep


def clear_dir(path: Path) -> list[str]:
    """Delete ``path``'s contents (not the directory); the names removed."""
    names = []
    for child in sorted(path.iterdir()):
        names.append(child.name)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return names


def start_run_dir(out: Path, clear: bool, backend: str, **info) -> list[str]:
    """Create ``out`` (its contents deleted first when ``clear``, the plan's decision) and write the run
    marker (kept when it exists: a resumed run stays the same run). Call on one rank. Returns what was
    cleared."""
    cleared = clear_dir(out) if clear and out.is_dir() else []
    out.mkdir(parents=True, exist_ok=True)
    if not is_our_run(out):
        marker = {"backend": backend, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        atomic_write_text(out / RUN_MARKER, json.dumps(marker, default=str) + "\n")
    return cleared


def find_tokenizer(cfg: RecipeConfig, candidates: Iterable[Optional[Path | str]]) -> Optional[Path]:
    """``model.tokenizer``, else the first candidate directory holding tokenizer files (the HF checkpoint,
    or the ``hf/`` directory a converted checkpoint carries), else None (the built-in Qwen3-Next one)."""
    if cfg.model.tokenizer:
        return resolve_path(cfg.model.tokenizer)
    for c in candidates:
        if c is not None and any((Path(c) / f).is_file() for f in TOKENIZER_FILES):
            return Path(c)
    return None
