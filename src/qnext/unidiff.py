"""Unified diffs, parsed and applied in Python (no ``patch`` binary): what ``qnext.patches`` applies to
pinned wheels. A hunk must match its context exactly, forwards or (``reverse=True``) backwards."""
from __future__ import annotations

import re
from dataclasses import dataclass


class PatchError(Exception):
    """A diff does not fit the file it is applied to."""


@dataclass(frozen=True)
class Hunk:
    old_start: int  # 1-based, as in "@@ -old_start,old_len +new_start,new_len @@"
    old_len: int
    new_start: int
    new_len: int
    lines: tuple[tuple[str, str], ...]  # (' ' | '-' | '+', text including its newline, if any)


@dataclass(frozen=True)
class FileDiff:
    path: str  # relative to the package's site directory, 'a/' and 'b/' prefixes removed
    hunks: tuple[Hunk, ...]


_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_prefix(name: str) -> str:
    name = name.split("\t", 1)[0].strip()
    return name[2:] if name[:2] in ("a/", "b/") else name


def parse_unified_diff(text: str) -> list[FileDiff]:
    """Parse a (possibly multi-file) unified diff."""
    lines = text.splitlines(keepends=True)
    files: list[FileDiff] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"line {i + 2}: '+++' header expected after '---'")
        path = _strip_prefix(lines[i + 1][4:])
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            m = _HUNK_RE.match(lines[i])
            if not m:
                raise PatchError(f"line {i + 1}: malformed hunk header {lines[i]!r}")
            old_start, new_start = int(m.group(1)), int(m.group(3))
            old_len = int(m.group(2)) if m.group(2) is not None else 1
            new_len = int(m.group(4)) if m.group(4) is not None else 1
            i += 1
            body: list[tuple[str, str]] = []
            n_old = n_new = 0
            while i < len(lines) and (n_old < old_len or n_new < new_len or lines[i].startswith("\\")):
                line = lines[i]
                if line.startswith("\\"):  # "\ No newline at end of file": previous line has none
                    tag, txt = body[-1]
                    body[-1] = (tag, txt.rstrip("\n"))
                    i += 1
                    continue
                tag, txt = (line[0], line[1:]) if line.strip("\n") else (" ", "\n")
                if tag not in " -+":
                    raise PatchError(f"line {i + 1}: unexpected diff line {line!r}")
                n_old += tag in " -"
                n_new += tag in " +"
                body.append((tag, txt))
                i += 1
            if n_old != old_len or n_new != new_len:
                raise PatchError(f"{path}: hunk at -{old_start} has {n_old}/{n_new} lines, header says {old_len}/{new_len}")
            hunks.append(Hunk(old_start, old_len, new_start, new_len, tuple(body)))
        files.append(FileDiff(path, tuple(hunks)))
    if not files:
        raise PatchError("no file headers ('--- a/...', '+++ b/...') found")
    return files


def apply_file_diff(text: str, diff: FileDiff, *, reverse: bool = False) -> str:
    """Apply (or reverse) one file's hunks. Every context and removed line must match exactly."""
    src = text.splitlines(keepends=True)
    out: list[str] = []
    pos = 0  # next unread line of src
    for n, hunk in enumerate(diff.hunks, 1):
        drop, add = ("+", "-") if reverse else ("-", "+")
        old = [t for tag, t in hunk.lines if tag in (" ", drop)]
        new = [t for tag, t in hunk.lines if tag in (" ", add)]
        start = (hunk.new_start if reverse else hunk.old_start) - 1
        if not old:  # pure insertion: header gives the line *after which* to insert
            start += 1
        start = max(start, 0)
        if src[start:start + len(old)] != old:
            got = "".join(src[start:start + 3]).rstrip()
            want = "".join(old[:3]).rstrip()
            raise PatchError(f"{diff.path}: hunk {n} does not match at line {start + 1}\n"
                             f"  expected: {want!r}\n  found:    {got!r}")
        if start < pos:
            raise PatchError(f"{diff.path}: hunk {n} overlaps the previous one")
        out.extend(src[pos:start])
        out.extend(new)
        pos = start + len(old)
    out.extend(src[pos:])
    return "".join(out)
