"""``make mutants`` keeps following the code: every listed mutation's text occurs exactly once in its
file, so it still applies, and every test it names exists (a renamed test would make it an error)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import mutants  # noqa: E402


@pytest.mark.parametrize("mutation", mutants.MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_once_and_names_existing_tests(mutation, tmp_path):
    target = tmp_path / mutation.path
    target.parent.mkdir(parents=True)
    target.write_text((REPO / mutation.path).read_text())
    mutants.apply(mutation, tmp_path)
    assert target.read_text() != (REPO / mutation.path).read_text()
    for node in mutation.tests:
        path, name = node.split("::")
        defined = {f.name for f in ast.walk(ast.parse((REPO / path).read_text())) if isinstance(f, ast.FunctionDef)}
        assert name in defined, node


def test_a_mutation_whose_text_is_gone_is_an_error(tmp_path):
    m = mutants.MUTATIONS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("nothing to mutate here\n")
    with pytest.raises(LookupError, match="occurs 0 times"):
        mutants.apply(m, tmp_path)
