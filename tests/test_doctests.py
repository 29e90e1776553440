"""The `>>>` examples in lmforge's docstrings run, so they stay true.

Every module under src/lmforge whose source holds a `>>>` example is imported and its examples
run with `doctest` (as `pytest --doctest-modules` would, but inside the README's test command).
Examples that need files or a trained model are written as plain "Example:" blocks instead.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted((SRC / "lmforge").rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(SRC).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_there_are_examples_to_run():
    # the pure helpers (BPE merging, byte maps, schedules, ...) carry worked examples
    assert len(MODULES) >= 3, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} holds '>>>' but doctest found no example in it"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (run doctest -v on it)"
