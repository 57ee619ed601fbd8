"""Read chat JSONL: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line.

Every problem is a :class:`UserError` naming ``file:line`` and what to change; the first bad line
stops the read (nothing is trained on a half-understood file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

ROLES = ("system", "user", "assistant")
_FORMAT_HINT = 'each line must be {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'


def _fail(where: str, what: str, hint: str = _FORMAT_HINT) -> UserError:
    return UserError(f"{where}: {what}", hint=hint)


def parse_chat(obj, where: str) -> list[dict]:
    """Check one decoded line and return its messages as plain ``{"role", "content"}`` dicts."""
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object with a 'messages' list, got {type(obj).__name__}")
    if "messages" not in obj:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise _fail(where, f"missing 'messages' (keys: {keys})")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _fail(where, f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise _fail(where, "'messages' is empty")
    out = []
    for k, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            raise _fail(where, f"message {k} must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise _fail(where, f"message {k} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = msg.get("content")
        if not isinstance(content, str):
            got = "missing" if "content" not in msg else type(content).__name__
            raise _fail(where, f"message {k} ({role}) needs a string 'content', got {got}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _fail(where, "no assistant turn (nothing to learn from: loss is computed on assistant replies only)",
                    hint="add an assistant reply to this chat or remove the line")
    return out


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """All chats of a JSONL file, validated. Blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file {p} not found", hint="set data.path=<chat .jsonl file> (see README: data format)")
    chats: list[list[dict]] = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _fail(where, f"not UTF-8 text (byte {err.start})", hint="save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(where, f"malformed JSON ({err.msg} at column {err.colno})") from None
            chats.append(parse_chat(obj, where))
    if not chats:
        raise UserError(f"data file {p} has no chats", hint="one JSON object per line: " + _FORMAT_HINT)
    return chats
