"""Layering of the evaluation: the library never imports ``jobs``, and no lower stage of the
library imports ``aligner.evaluation``."""

import ast
from pathlib import Path

ALIGNER = Path(__file__).resolve().parents[2] / "aligner"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return out


def test_library_never_imports_jobs():
    bad = [(str(p.relative_to(ALIGNER)), m) for p in ALIGNER.rglob("*.py")
           for m in _imports(p) if m == "jobs" or m.startswith("jobs.")]
    assert not bad


def test_nothing_below_evaluation_imports_it():
    bad = [(str(p.relative_to(ALIGNER)), m) for p in ALIGNER.rglob("*.py")
           if "evaluation" not in p.relative_to(ALIGNER).parts[:1]
           for m in _imports(p) if m.startswith("aligner.evaluation")]
    assert not bad
