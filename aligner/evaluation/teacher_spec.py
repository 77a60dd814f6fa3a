"""Which preference teacher trained the aligned model: what the ``teacher_rerank`` baseline
applies at query time.

The evaluation follows the outputs' manifests: the aligned checkpoint's ``align`` manifest
(in the checkpoint's directory or its parent, the job's output) names the preferences it
trained on (``inputs.preferences`` / ``config.preferences``), and the preferences' own
``build_preferences`` manifest says how they were scored. From that manifest, in order:

1. ``teacher_spec`` (what the builder should record; :func:`teacher_record` writes it):
   ``{"aesthetic": [...], "aesthetic_weights": [...], "bad_template": str,
   "bad_rephraser": str, "queries": str}``;
2. the builder's ``config`` (``aesthetic``, ``aesthetic_weights``, ``bad_template``,
   ``bad_rephraser``) and ``inputs.queries``;
3. the ``teacher`` string (``"scorer*1+contrast*1"``), with
   :data:`aligner.preferences.teacher.DEFAULT_BAD_TEMPLATE` for the bad rephrase.

``baseline.teacher_preferences`` names the preferences directory explicitly; without any
manifest, ``baseline.teacher_aesthetic`` (+ weights, bad template / rephraser) gives the
teacher; with neither the baseline is skipped (:func:`resolve_teacher`). The source is
recorded with the system (``TeacherSpec.source``) and shown in the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.preferences import teacher as T

log = logging.getLogger(__name__)


@dataclass
class TeacherSpec:
    """A teacher as the builder scored pools with it.

    Attributes:
        aesthetic: component names (``scorer``, ``rephrase``, ``contrast``).
        weights: one weight per component.
        bad_template: the bad rephrase's ``{q}`` template (``bad_rephraser`` "").
        bad_rephraser: ``""`` (the template) or ``template:<style>``.
        source: where the teacher was read (shown in metrics and the report).
        queries: the builder's queries table (its rephrasings), if recorded.
        notes: what could not be reproduced at query time, and other caveats.
        reward_model: the reward checkpoint of a ``reward`` component ("" if none).
    """

    aesthetic: list[str]
    weights: list[float]
    bad_template: str = T.DEFAULT_BAD_TEMPLATE
    bad_rephraser: str = ""
    source: str = ""
    queries: str = ""
    notes: list[str] = field(default_factory=list)
    reward_model: str = ""

    def __post_init__(self) -> None:
        unknown = [a for a in self.aesthetic if a not in T.TEACHER_COMPONENTS]
        if unknown or not self.aesthetic:
            raise ValueError(f"teacher components {self.aesthetic}: one or more of "
                             f"{list(T.TEACHER_COMPONENTS)}")
        if len(self.weights) != len(self.aesthetic):
            raise ValueError(f"{len(self.aesthetic)} teacher components but "
                             f"{len(self.weights)} weights")
        self.weights = [float(w) for w in self.weights]
        if "reward" in self.aesthetic and not self.reward_model:
            raise ValueError("the teacher's 'reward' component needs its reward_model")
        if "{q}" not in self.bad_template:
            self.notes.append(f"bad template {self.bad_template!r} has no {{q}}: using "
                              "teacher.DEFAULT_BAD_TEMPLATE")
            self.bad_template = T.DEFAULT_BAD_TEMPLATE
        if self.bad_rephraser and not self.bad_rephraser.startswith("template:"):
            self.notes.append(f"bad rephraser {self.bad_rephraser!r} cannot run at query time: "
                              f"using the bad template {self.bad_template!r}")
            self.bad_rephraser = ""

    @property
    def name(self) -> str:
        """``"scorer*1+contrast*1"``, as the builder names it."""
        return T.teacher_name(self.aesthetic, self.weights)

    @property
    def needs_rephrase(self) -> bool:
        return bool({"rephrase", "contrast"} & set(self.aesthetic))

    def bad_rephrase(self) -> T.RephraseBatch:
        """The bad rephraser, as ``aligner.preferences.build.bad_rephraser`` makes it."""
        if self.bad_rephraser.startswith("template:"):
            from aligner.rephrase.template import TemplateRephraser

            return TemplateRephraser(style=self.bad_rephraser.partition(":")[2],
                                     polarity="bad").rephrase_batch
        return T.template_rephraser(self.bad_template)

    def describe(self) -> dict[str, Any]:
        bad = self.bad_rephraser or self.bad_template
        if bad == getattr(T, "ORACLE_AWARE_BAD_TEMPLATE", None):
            bad += " (the oracle-aware ablation)"
        return {"teacher": self.name, "components": self.aesthetic, "weights": self.weights,
                "bad_rephrase": bad, "source": self.source,
                **({"reward_model": self.reward_model} if self.reward_model else {}),
                **({"notes": self.notes} if self.notes else {})}


def teacher_record(aesthetic: Sequence[str], weights: Sequence[float], bad_template: str,
                   bad_rephraser: str = "", queries: str = "",
                   reward_model: str = "") -> dict[str, Any]:
    """The ``teacher_spec`` entry a preferences manifest should hold so that the evaluation
    can apply the same teacher at query time (read first by :func:`teacher_from_manifest`)."""
    return {"name": T.teacher_name(aesthetic, weights), "aesthetic": list(aesthetic),
            "aesthetic_weights": [float(w) for w in weights], "bad_template": bad_template,
            "bad_rephraser": bad_rephraser, "queries": queries, "reward_model": reward_model}


def parse_teacher_name(name: str) -> tuple[list[str], list[float]]:
    """``"scorer*1+contrast*1"`` -> (``["scorer", "contrast"]``, ``[1.0, 1.0]``).

    Raises:
        ValueError: not a teacher string.
    """
    names, weights = [], []
    for part in str(name).split("+"):
        n, sep, w = part.partition("*")
        try:
            weights.append(float(w) if sep else 1.0)
        except ValueError as e:
            raise ValueError(f"teacher {name!r}: {part!r} is not name*weight") from e
        names.append(n.strip())
    return names, weights


def teacher_from_manifest(manifest: Mapping[str, Any], where: str = "") -> TeacherSpec:
    """The teacher recorded in a ``build_preferences`` manifest (see the module doc).

    Raises:
        ValueError: the manifest records no teacher.
    """
    cfg = manifest.get("config") or {}
    inputs = manifest.get("inputs") or {}
    rec = manifest.get("teacher_spec") or {}
    notes: list[str] = []
    reward_model = rec.get("reward_model") or cfg.get("reward_model") or ""
    if rec.get("aesthetic"):
        names, weights = list(rec["aesthetic"]), list(rec.get("aesthetic_weights")
                                                     or [1.0] * len(rec["aesthetic"]))
        bad, bad_r = rec.get("bad_template"), rec.get("bad_rephraser") or ""
        queries = rec.get("queries") or inputs.get("queries") or ""
    elif cfg.get("aesthetic"):
        names, weights = list(cfg["aesthetic"]), list(cfg.get("aesthetic_weights")
                                                     or [1.0] * len(cfg["aesthetic"]))
        bad, bad_r = cfg.get("bad_template"), cfg.get("bad_rephraser") or ""
        queries = inputs.get("queries") or cfg.get("queries") or ""
    elif manifest.get("teacher"):
        names, weights = parse_teacher_name(manifest["teacher"])
        bad, bad_r, queries = None, "", inputs.get("queries") or ""
    else:
        raise ValueError(f"{where or 'the manifest'} records no teacher (teacher_spec, "
                         "config.aesthetic or teacher)")
    if not bad:
        bad = T.DEFAULT_BAD_TEMPLATE
        if "contrast" in names and not bad_r:
            notes.append("the preferences manifest records no bad template: using "
                         "teacher.DEFAULT_BAD_TEMPLATE (the builder's default now, maybe not "
                         "then)")
    if cfg.get("degraded") or manifest.get("degraded_pairs"):
        notes.append("the teacher's degraded-copy pairs have no query-time counterpart: "
                     "teacher_rerank applies the grid teacher only")
    if (manifest.get("grid") or {}).get("retrieve_with", cfg.get("retrieve_with")) == "rephrased":
        notes.append("the builder's pools were retrieved with the rephrased query; "
                     "teacher_rerank re-ranks the base's top N for the query itself")
    return TeacherSpec(names, weights, bad, bad_r, where, str(queries or ""), notes,
                       str(reward_model))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def teacher_from_preferences(path: str | Path) -> TeacherSpec:
    """The teacher of a preferences output (its directory, or its ``preferences.parquet``).

    Raises:
        FileNotFoundError: no ``manifest.json`` there.
        ValueError: the manifest records no teacher.
    """
    p = Path(path)
    d = p.parent if p.is_file() else p
    m = _read_json(d / "manifest.json")
    if m is None:
        raise FileNotFoundError(f"no readable manifest.json in {d} (a build_preferences "
                                "output records its teacher there)")
    return teacher_from_manifest(m, f"preferences manifest {d / 'manifest.json'}")


def preferences_of(checkpoint: str | Path) -> str | None:
    """The preferences a checkpoint was aligned on, from the ``align`` manifest in the
    checkpoint's directory or its parent (None: no such record)."""
    ck = Path(checkpoint)
    for d in (ck, ck.parent):
        m = _read_json(d / "manifest.json")
        if not m:
            continue
        pref = (m.get("inputs") or {}).get("preferences") or \
            (m.get("config") or {}).get("preferences")
        if pref:
            return str(pref)
    return None


def resolve_teacher(settings: Any, aligned_checkpoint: str | Path | None = None
                    ) -> tuple[TeacherSpec | None, list[str]]:
    """The teacher ``teacher_rerank`` applies, and notes on how it was found.

    Order: ``settings.teacher_preferences`` (a preferences dir; must be readable); else the
    aligned checkpoint's align manifest -> its preferences manifest; else
    ``settings.teacher_aesthetic`` (+ ``teacher_aesthetic_weights``, ``teacher_bad_template``,
    ``teacher_bad_rephraser``); else None (the baseline is skipped).

    Args:
        settings: :class:`aligner.evaluation.config.BaselineSettings`.
        aligned_checkpoint: the aligned model's checkpoint dir (None: none evaluated).

    Raises:
        FileNotFoundError, ValueError: an explicit ``teacher_preferences`` that does not
            record a teacher.
    """
    notes: list[str] = []
    spec = None
    if settings.teacher_preferences:
        spec = teacher_from_preferences(settings.teacher_preferences)
        spec.source += " (baseline.teacher_preferences)"
    elif aligned_checkpoint:
        pref = preferences_of(aligned_checkpoint)
        if pref is None:
            notes.append(f"teacher_rerank: no align manifest beside {aligned_checkpoint} names "
                         "the preferences it trained on")
        else:
            try:
                spec = teacher_from_preferences(pref)
                spec.source += " (the aligned model's, from its align manifest)"
            except (FileNotFoundError, ValueError) as e:
                notes.append(f"teacher_rerank: the aligned model's preferences {pref}: {e}")
    if spec is None and settings.teacher_aesthetic:
        weights = settings.teacher_aesthetic_weights or [1.0] * len(settings.teacher_aesthetic)
        spec = TeacherSpec(list(settings.teacher_aesthetic), list(weights),
                           settings.teacher_bad_template or T.DEFAULT_BAD_TEMPLATE,
                           settings.teacher_bad_rephraser,
                           "config baseline.teacher_aesthetic (no preferences manifest found)")
    elif spec is not None and settings.teacher_aesthetic:
        given = T.teacher_name(settings.teacher_aesthetic, settings.teacher_aesthetic_weights
                               or [1.0] * len(settings.teacher_aesthetic))
        if given != spec.name:
            notes.append(f"teacher_rerank: baseline.teacher_aesthetic ({given}) ignored: "
                         f"{spec.source} records {spec.name}")
    if spec is None:
        notes.append("teacher_rerank skipped: the training teacher is unknown (no preferences "
                     "manifest; set baseline.teacher_preferences=DIR or "
                     "baseline.teacher_aesthetic=[...])")
    for n in notes:
        log.warning("%s", n)
    return spec, notes
