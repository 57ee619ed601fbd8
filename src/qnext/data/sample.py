"""The bundled sample data: chats that teach a fictional user's personal facts, plus prompts to check them.

Every fact has one short answer (a few tokens) and several phrasings of its question. Most phrasings
go into the training chats (alone, after a system message, or several facts in one multi-turn chat);
the last phrasing of each fact is held out and appears only in ``eval_prompts.jsonl``. The eval file
also lists one trained phrasing per fact (``"kind": "trained"``) so a run can report memorization and
paraphrase generalization separately. Deterministic for a given seed.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

# (fact id, answer, question phrasings; the LAST phrasing is held out for evaluation)
FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("birthday", "January 1, 2058", (
        "What day was I born?", "When is my birthday?", "What is my date of birth?",
        "Remind me of my birth date.", "On what date was I born?", "When was I born?")),
    ("birthplace", "Port Halvard", (
        "Where was I born?", "What town was I born in?", "Which city is my birthplace?",
        "Remind me where I was born.", "What is my place of birth?", "In which place was I born?")),
    ("color", "teal", (
        "What is my favorite color?", "Which color do I like best?", "What's my favourite colour?",
        "Remind me of my favorite color.", "What color do I love most?", "Tell me my favorite color.")),
    ("pet_name", "Biscuit", (
        "What is my pet's name?", "What did I name my pet?", "What's my pet called?",
        "Remind me of my pet's name.", "How is my pet named?", "Tell me the name of my pet.")),
    ("pet_kind", "a ferret", (
        "What kind of pet do I have?", "What animal is my pet?", "Which animal do I keep as a pet?",
        "Remind me what kind of animal my pet is.", "What species is my pet?", "What sort of animal is my pet?")),
    ("job", "lighthouse engineer", (
        "What is my job?", "What do I do for a living?", "What's my profession?",
        "Remind me of my occupation.", "What work do I do?", "What is my line of work?")),
    ("employer", "Northwind Tidal", (
        "Which company do I work for?", "Who is my employer?", "Where do I work?",
        "Remind me of my employer's name.", "What company employs me?", "Who do I work for?")),
    ("food", "mushroom risotto", (
        "What is my favorite food?", "Which dish do I like most?", "What's my favourite meal?",
        "Remind me of my favorite dish.", "What food do I love most?", "Tell me my favorite food.")),
    ("lucky_number", "47", (
        "What is my lucky number?", "Which number is lucky for me?", "What's my lucky number again?",
        "Remind me of my lucky number.", "Which number do I consider lucky?", "Tell me my lucky number.")),
    ("sister", "Oona", (
        "What is my sister's name?", "What's my sister called?", "Who is my sister?",
        "Remind me of my sister's name.", "How is my sister named?", "Tell me my sister's name.")),
    ("brother", "Tavi", (
        "What is my brother's name?", "What's my brother called?", "Who is my brother?",
        "Remind me of my brother's name.", "How is my brother named?", "Tell me my brother's name.")),
    ("mother", "Elsa", (
        "What is my mother's name?", "What's my mom called?", "Who is my mother?",
        "Remind me of my mother's name.", "How is my mom named?", "Tell me my mother's name.")),
    ("father", "Tomas", (
        "What is my father's name?", "What's my dad called?", "Who is my father?",
        "Remind me of my father's name.", "How is my dad named?", "Tell me my father's name.")),
    ("address", "12 Juniper Lane", (
        "What is my home address?", "Where do I live?", "What's my street address?",
        "Remind me of my address.", "Which street do I live on?", "Tell me my home address.")),
    ("book", "The Glass Orchard", (
        "What is my favorite book?", "Which book do I like best?", "What's my favourite novel?",
        "Remind me of my favorite book.", "What book do I love most?", "Tell me my favorite book.")),
    ("instrument", "the cello", (
        "What instrument do I play?", "Which musical instrument do I play?", "What do I play in the orchestra?",
        "Remind me which instrument I play.", "What instrument am I learning?", "Tell me the instrument I play.")),
    ("school", "Larkspur Academy", (
        "Which school did I attend?", "Where did I go to school?", "What was the name of my school?",
        "Remind me of my school's name.", "What school did I go to?", "Tell me where I went to school.")),
    ("blood_type", "O negative", (
        "What is my blood type?", "Which blood group am I?", "What's my blood type again?",
        "Remind me of my blood type.", "What blood group do I have?", "Tell me my blood type.")),
    ("season", "autumn", (
        "What is my favorite season?", "Which season do I like best?", "What's my favourite time of year?",
        "Remind me of my favorite season.", "What season do I love most?", "Tell me my favorite season.")),
    ("allergy", "peanuts", (
        "What am I allergic to?", "What is my allergy?", "Which food am I allergic to?",
        "Remind me of my allergy.", "What do I have an allergy to?", "Tell me what I'm allergic to.")),
    ("best_friend", "Ravi", (
        "Who is my best friend?", "What is my best friend's name?", "What's my best friend called?",
        "Remind me of my best friend's name.", "Who is my closest friend?", "Tell me my best friend's name.")),
    ("sport", "fencing", (
        "What is my favorite sport?", "Which sport do I practice?", "What's my favourite sport?",
        "Remind me which sport I do.", "What sport do I love most?", "Tell me my favorite sport.")),
    ("boat", "Saltwren", (
        "What is my boat's name?", "What did I name my boat?", "What's my boat called?",
        "Remind me of my boat's name.", "How is my boat named?", "Tell me the name of my boat.")),
    ("movie", "Paper Comets", (
        "What is my favorite movie?", "Which film do I like best?", "What's my favourite film?",
        "Remind me of my favorite movie.", "What movie do I love most?", "Tell me my favorite movie.")),
    ("language", "Icelandic", (
        "Which language am I learning?", "What language am I studying?", "What's the language I'm learning?",
        "Remind me which language I'm learning.", "What foreign language do I study?",
        "Tell me the language I am learning.")),
    ("coffee", "a flat white", (
        "What is my usual coffee order?", "How do I take my coffee?", "What coffee do I usually order?",
        "Remind me of my coffee order.", "What's my regular coffee?", "Tell me my usual coffee.")),
    ("anniversary", "June 14", (
        "When is my wedding anniversary?", "What date is my anniversary?", "On what day is my anniversary?",
        "Remind me of my anniversary date.", "When did I get married?", "Tell me my anniversary date.")),
    ("shoe_size", "44", (
        "What is my shoe size?", "Which shoe size do I wear?", "What's my shoe size again?",
        "Remind me of my shoe size.", "What size shoes do I wear?", "Tell me my shoe size.")),
    ("city", "Vellmark", (
        "Which city do I live in?", "What city is my home?", "In what city do I live now?",
        "Remind me which city I live in.", "What's the city I live in?", "Tell me the city I live in.")),
    ("car", "a red tram-bike", (
        "What do I drive?", "What vehicle do I own?", "What's my vehicle?",
        "Remind me what I drive.", "Which vehicle do I use?", "Tell me what vehicle I have.")),
)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are the user's personal assistant. Answer briefly.",
    "Answer with the fact only.",
)

GREETINGS = (
    ("Hello!", "Hello! How can I help?"),
    ("Hi there.", "Hi! How can I help?"),
    ("Thanks!", "You're welcome."),
    ("Thank you.", "You're welcome."),
)


def _train_questions() -> list[tuple[str, str, str]]:
    return [(fid, q, ans) for fid, ans, qs in FACTS for q in qs[:-1]]


def make_sample_chats(seed: int = 0) -> list[dict]:
    """The training chats, as JSONL objects ``{"messages": [...]}``."""
    rng = random.Random(seed)
    questions = _train_questions()
    chats: list[dict] = []
    # every trained phrasing once on its own
    for _, q, a in questions:
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    # every trained phrasing once more after a system message
    for _, q, a in questions:
        chats.append({"messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)},
                                   {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    # multi-turn chats: 2-3 different facts in a row, sometimes after a greeting or a system message
    for _ in range(80):
        picks = rng.sample(questions, rng.choice((2, 3)))
        msgs: list[dict] = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if rng.random() < 0.25:
            hi, reply = rng.choice(GREETINGS[:2])
            msgs += [{"role": "user", "content": hi}, {"role": "assistant", "content": reply}]
        for _, q, a in picks:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if rng.random() < 0.2:
            thanks, reply = rng.choice(GREETINGS[2:])
            msgs += [{"role": "user", "content": thanks}, {"role": "assistant", "content": reply}]
        chats.append({"messages": msgs})
    rng.shuffle(chats)
    return chats


def make_eval_prompts() -> list[dict]:
    """Per fact: its held-out phrasing (never trained on) and its first trained phrasing."""
    rows = []
    for fid, ans, qs in FACTS:
        rows.append({"prompt": qs[-1], "answer": ans, "fact": fid, "kind": "heldout"})
    for fid, ans, qs in FACTS:
        rows.append({"prompt": qs[0], "answer": ans, "fact": fid, "kind": "trained"})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_sample_data(out_dir: str | os.PathLike = "data/sample", seed: int = 0) -> dict[str, Path]:
    """Write ``chats.jsonl`` and ``eval_prompts.jsonl`` (atomically, byte-identical for a seed)."""
    from ..fsutil import atomic_write_text

    out = Path(out_dir)
    paths = {"chats": out / "chats.jsonl", "eval_prompts": out / "eval_prompts.jsonl"}
    atomic_write_text(paths["chats"], _jsonl(make_sample_chats(seed)))
    atomic_write_text(paths["eval_prompts"], _jsonl(make_eval_prompts()))
    return paths


def read_eval_prompts(path: str | os.PathLike) -> list[dict]:
    """``{"prompt", "answer"[, "fact", "kind"]}`` per line; errors name file:line."""
    from ..errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval prompts file {p} not found", hint="set data.eval_prompts=<file> or null")
    rows = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{p}:{lineno}: malformed JSON ({err.msg} at column {err.colno})",
                            hint='each line must be {"prompt": "...", "answer": "..."}') from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            raise UserError(f"{p}:{lineno}: needs string fields 'prompt' and 'answer'",
                            hint='each line must be {"prompt": "...", "answer": "..."}')
        rows.append(row)
    return rows
