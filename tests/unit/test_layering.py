"""The library's folders read like the pipeline and imports only run downwards: a stage uses
the stages below it, never one above (lazy imports inside functions included), and the
library never imports ``jobs`` or ``serving``."""

import ast
from pathlib import Path

ALIGNER = Path(__file__).resolve().parents[2] / "aligner"
#: stage folder -> floor; a module may import its own floor and the floors below
FLOORS = {"runtime": 1, "data": 1, "world": 1, "aesthetics": 2, "retrieval": 2, "rephrase": 3,
          "reward": 3, "preferences": 3, "training": 4, "judge": 4, "evaluation": 5,
          "feedback": 6}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return out


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "aligner" else None


def test_every_module_sits_in_a_stage_folder():
    loose = [p.name for p in ALIGNER.glob("*.py") if p.name != "__init__.py"]
    assert not loose
    folders = {p.name for p in ALIGNER.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FLOORS)


def test_library_never_imports_jobs_or_serving():
    bad = [(str(p.relative_to(ALIGNER)), m) for p in ALIGNER.rglob("*.py") for m in _imports(p)
           if m.split(".")[0] in ("jobs", "serving")]
    assert not bad


def test_imports_only_run_downwards():
    bad = []
    for p in ALIGNER.rglob("*.py"):
        rel = p.relative_to(ALIGNER).parts
        if len(rel) < 2:
            continue
        here = FLOORS[rel[0]]
        for m in _imports(p):
            there = _stage(m)
            if there in FLOORS and FLOORS[there] > here:
                bad.append(f"{'/'.join(rel)} imports {m}")
    assert not bad, "\n".join(bad)
