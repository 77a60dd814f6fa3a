"""Versioned prompt templates for the LLM rephrasers (``prompts/<style>.<version>.yaml``).

A template file holds the system text, a user template, few-shot examples and an optional
``answer_prefix``: the start of the assistant's answer (``"{query},"`` for ``detail``). Local
models are *prefilled* with it, so they only write the aesthetic tail and cannot lose the
query's content; chat APIs that cannot prefill get the same few-shot conversation without it.
The only placeholder is ``{query}`` (replaced literally, so braces in a query are safe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
STYLES = ("detail", "k_list", "kw_dict", "reorg", "repeat")
_FILE = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)\.(?P<version>v\d+)\.ya?ml$")


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned prompt: system text, few-shot examples, user template, answer prefix."""

    name: str
    version: str
    system: str
    user_template: str
    examples: tuple[tuple[str, str], ...]
    answer_prefix: str = ""
    description: str = ""

    @property
    def id(self) -> str:
        """``<name>.<version>``, e.g. ``detail.v2`` (recorded in the ``rephraser`` column)."""
        return f"{self.name}.{self.version}"

    def user(self, query: str) -> str:
        """The user turn for ``query``."""
        return self.user_template.replace("{query}", query)

    def prefix(self, query: str) -> str:
        """The assistant answer's fixed start for ``query`` ('' when the template has none)."""
        return self.answer_prefix.replace("{query}", query)

    def messages(self, query: str) -> list[dict[str, str]]:
        """OpenAI-style chat messages: system, few-shot user/assistant turns, the query."""
        msgs = [{"role": "system", "content": self.system}]
        for q, r in self.examples:
            msgs += [{"role": "user", "content": self.user(q)},
                     {"role": "assistant", "content": r}]
        msgs.append({"role": "user", "content": self.user(query)})
        return msgs


def _parse(data: dict[str, Any], source: str) -> PromptTemplate:
    missing = [k for k in ("name", "version", "system", "user_template", "examples")
               if k not in data]
    if missing:
        raise ValueError(f"prompt {source}: missing key(s) {missing}")
    if "{query}" not in str(data["user_template"]):
        raise ValueError(f"prompt {source}: user_template has no {{query}} placeholder")
    examples = []
    for i, ex in enumerate(data["examples"] or []):
        if not isinstance(ex, dict) or not ex.get("query") or not ex.get("rephrased"):
            raise ValueError(f"prompt {source}: example {i} needs 'query' and 'rephrased'")
        examples.append((str(ex["query"]), str(ex["rephrased"])))
    if not examples:
        raise ValueError(f"prompt {source}: needs at least one few-shot example")
    return PromptTemplate(name=str(data["name"]), version=str(data["version"]),
                          system=str(data["system"]).strip(),
                          user_template=str(data["user_template"]), examples=tuple(examples),
                          answer_prefix=str(data.get("answer_prefix") or ""),
                          description=str(data.get("description") or ""))


def available_prompts() -> dict[str, list[str]]:
    """Built-in templates: ``{name: [versions, oldest first]}``."""
    out: dict[str, list[str]] = {}
    for p in sorted(PROMPTS_DIR.glob("*.y*ml")):
        m = _FILE.match(p.name)
        if m:
            out.setdefault(m["name"], []).append(m["version"])
    for versions in out.values():
        versions.sort(key=lambda v: int(v[1:]))
    return out


def load_prompt(spec: str) -> PromptTemplate:
    """Load a template by style (``detail``: newest version), id (``detail.v2``) or file path.

    Raises:
        ValueError: an unknown style/version or a malformed file.
    """
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) and path.is_file():
        return _parse(yaml.safe_load(path.read_text()) or {}, str(path))
    name, _, version = spec.partition(".")
    known = available_prompts()
    if name not in known:
        raise ValueError(f"unknown prompt style {spec!r}: built-in {sorted(known)} "
                         "(or a path to a .yaml template)")
    version = version or known[name][-1]
    if version not in known[name]:
        raise ValueError(f"prompt {name!r} has versions {known[name]}, not {version!r}")
    file = PROMPTS_DIR / f"{name}.{version}.yaml"
    return _parse(yaml.safe_load(file.read_text()) or {}, file.name)
