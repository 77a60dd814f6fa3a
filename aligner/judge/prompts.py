"""Versioned prompt files for the LMM judge and annotator (``prompts/<name>.<version>.yaml``).

A prompt file says what the model is shown and asked:

* ``style``: ``ranker`` (which of two rows is better: the answer is a choice letter),
  ``scorer`` (a 1-5 score of one of two rows) or ``rating`` (a 1-5 rating of one image:
  annotation);
* ``system``, ``intro`` (opens the user turn; ``{query}`` is the query), ``row_label`` (shown
  before each row's images; ``{label}`` is its label) and ``labels`` (``[A, B]``);
* ``questions``: aspect -> the question asked last (``{row}`` is the label of the row being
  scored, scorer style); one request per aspect, so each answer is a single choice token
  whose log-probability the back end can give;
* ``choices``: answer token -> meaning (``{A: a, B: b, C: similar}``; ``{"1": 1 ... "5": 5}``);
* ``answer_instruction`` / ``rationale_instruction``: how to answer without / with a short
  rationale after the choice (``<choice>: <reason>``).

Placeholders are replaced literally, so braces in a query are safe. The prompt's id
(``ranker.v1``) goes into every judgment and rating it produced.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STYLES = ("ranker", "scorer", "rating")
_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)\.(?P<version>v\d+)\.ya?ml$")
#: an image part of a message: ``{"type": "image", "image": <encoded PNG/JPEG bytes>}``
IMAGE_PART = "image"


@dataclass(frozen=True)
class JudgePrompt:
    """One versioned judge / annotator prompt (see the module docstring)."""

    name: str
    version: str
    style: str
    system: str
    intro: str
    row_label: str
    labels: tuple[str, ...]
    questions: dict[str, str]
    choices: dict[str, Any]
    answer_instruction: str
    rationale_instruction: str
    description: str = ""

    @property
    def id(self) -> str:
        """``<name>.<version>``, e.g. ``ranker.v1``."""
        return f"{self.name}.{self.version}"

    @property
    def aspects(self) -> tuple[str, ...]:
        """The aspects asked about, in the file's order."""
        return tuple(self.questions)

    def messages(self, query: str, rows: Sequence[Sequence[bytes]], aspect: str,
                 row: str = "", rationale: bool = False) -> list[dict[str, Any]]:
        """Chat messages asking about ``aspect``: the system turn, then one user turn with the
        intro, each row's label and images, and the question.

        Args:
            query: the search query.
            rows: per row (in label order), its encoded images (one composed grid image or
                several).
            aspect: a key of ``questions``.
            row: the label of the row being scored (scorer style).
            rationale: ask for a short reason after the choice.

        Raises:
            KeyError: an unknown aspect.
            ValueError: more rows than labels.
        """
        if aspect not in self.questions:
            raise KeyError(f"prompt {self.id} has no question for aspect {aspect!r} "
                           f"(has {list(self.questions)})")
        if len(rows) > len(self.labels):
            raise ValueError(f"prompt {self.id} labels {len(self.labels)} rows, got {len(rows)}")
        parts: list[dict[str, Any]] = [{"type": "text",
                                        "text": self.intro.replace("{query}", query)}]
        for label, images in zip(self.labels, rows, strict=False):
            if self.row_label:
                parts.append({"type": "text", "text": self.row_label.replace("{label}", label)})
            parts += [{"type": IMAGE_PART, "image": im} for im in images]
        question = self.questions[aspect].replace("{row}", row).replace("{query}", query)
        how = self.rationale_instruction if rationale else self.answer_instruction
        parts.append({"type": "text", "text": f"{question}\n{how}"})
        return [{"role": "system", "content": self.system}, {"role": "user", "content": parts}]


def _parse(data: dict[str, Any], source: str) -> JudgePrompt:
    keys = ("name", "version", "style", "system", "intro", "labels", "questions", "choices",
            "answer_instruction", "rationale_instruction")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"judge prompt {source}: missing key(s) {missing}")
    style = str(data["style"])
    if style not in STYLES:
        raise ValueError(f"judge prompt {source}: style {style!r} is not one of {list(STYLES)}")
    questions = data["questions"]
    choices = data["choices"]
    labels = [str(x) for x in data["labels"] or []]
    if not isinstance(questions, dict) or not questions:
        raise ValueError(f"judge prompt {source}: questions must be a non-empty mapping")
    if not isinstance(choices, dict) or len(choices) < 2:
        raise ValueError(f"judge prompt {source}: choices must map at least two answers")
    choices = {str(k): v for k, v in choices.items()}
    if style == "ranker":
        if sorted(map(str, choices.values())) != ["a", "b", "similar"] or len(labels) != 2:
            raise ValueError(f"judge prompt {source}: a ranker needs two labels and choices "
                             "meaning a, b and similar")
        if "overall" not in questions:
            raise ValueError(f"judge prompt {source}: a ranker needs an 'overall' question")
    else:
        if not all(isinstance(v, (int, float)) for v in choices.values()):
            raise ValueError(f"judge prompt {source}: {style} choices must map to numbers")
        if style == "scorer" and (len(labels) != 2 or any(
                "{row}" not in str(q) for q in questions.values())):
            raise ValueError(f"judge prompt {source}: a scorer needs two labels and a {{row}} "
                             "placeholder in every question")
        if style == "rating" and len(labels) != 1:
            raise ValueError(f"judge prompt {source}: a rating prompt shows one image (one label)")
    if len({k.strip().lower() for k in choices}) != len(choices):
        raise ValueError(f"judge prompt {source}: choices differ only in case or spaces")
    return JudgePrompt(
        name=str(data["name"]), version=str(data["version"]), style=style,
        system=str(data["system"]).strip(), intro=str(data["intro"]).strip(),
        row_label=str(data.get("row_label") or ""), labels=tuple(labels),
        questions={str(k): " ".join(str(v).split()) for k, v in questions.items()},
        choices=choices, answer_instruction=str(data["answer_instruction"]).strip(),
        rationale_instruction=str(data["rationale_instruction"]).strip(),
        description=str(data.get("description") or ""))


def available_judge_prompts() -> dict[str, list[str]]:
    """Built-in prompts: ``{name: [versions, oldest first]}``."""
    out: dict[str, list[str]] = {}
    for p in sorted(PROMPTS_DIR.glob("*.y*ml")):
        m = _FILE.match(p.name)
        if m:
            out.setdefault(m["name"], []).append(m["version"])
    for versions in out.values():
        versions.sort(key=lambda v: int(v[1:]))
    return out


def load_judge_prompt(spec: str) -> JudgePrompt:
    """Load a prompt by name (``ranker``: newest version), id (``ranker.v1``) or file path.

    Raises:
        FileNotFoundError: a ``.yaml`` path that does not exist.
        ValueError: an unknown name or version, or a malformed file.
    """
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise FileNotFoundError(f"judge prompt file {spec} does not exist")
        return _parse(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))
    name, _, version = spec.partition(".")
    known = available_judge_prompts()
    if name not in known:
        raise ValueError(f"unknown judge prompt {spec!r}: built-in {sorted(known)} (or a path "
                         "to a .yaml file)")
    version = version or known[name][-1]
    if version not in known[name]:
        raise ValueError(f"judge prompt {name!r} has versions {known[name]}, not {version!r}")
    file = PROMPTS_DIR / f"{name}.{version}.yaml"
    return _parse(yaml.safe_load(file.read_text(encoding="utf-8")) or {}, file.name)
