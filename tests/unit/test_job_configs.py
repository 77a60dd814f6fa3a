"""Every job's settings have one home: its config dataclass. The YAML beside a job holds only
what differs from the dataclass (today: nothing), every key in it is a field, and bad input
names the field."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from pathlib import Path

import pytest
import yaml

from aligner.runtime.config import ConfigError, build_config, help_text, to_dict
from jobs.__main__ import DOC, JOBS, configs_doc

REPO = Path(__file__).resolve().parents[2]


def _config(job: str) -> tuple[type, Path]:
    mod = importlib.import_module(f"jobs.{job}")
    return getattr(mod, JOBS[job]), Path(mod.DEFAULT_YAML)


def _defaults(cls: type) -> dict:
    """Field defaults as plain data, without running ``__post_init__`` (a config may require
    a field, such as the starting checkpoint of a fine-tune)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            v = f.default_factory()  # type: ignore[misc]
        else:
            continue
        out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_every_job_has_a_config_and_a_yaml():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py") if not p.stem.startswith("__")}
    assert jobs == set(JOBS)
    assert {p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml")} == set(JOBS)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_yaml_holds_only_what_differs_from_the_dataclass(job):
    cls, path = _config(job)
    text = path.read_text()
    assert text.startswith(f"# python -m jobs.{job} "), "the YAML opens with its command"
    data = yaml.safe_load(text) or {}
    cfg = build_config(cls, path, [])  # every key is a field, every value has its type
    defaults = dict(_leaves(_defaults(cls)))
    same = [k for k, v in _leaves(data) if k in defaults and defaults[k] == v]
    assert not same, f"{path.name} repeats dataclass defaults {same}: delete them"
    assert to_dict(cfg) == to_dict(build_config(cls, None, [f"{k}={v!r}" for k, v in
                                                           _leaves(data)] if data else []))


def _first_int_field(cls: type, prefix: str = "") -> str | None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is int:
            return prefix + f.name
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found = _first_int_field(hints[f.name], f"{prefix}{f.name}.")
            if found:
                return found
    return None


@pytest.mark.parametrize("job", sorted(JOBS))
def test_bad_input_names_the_field_and_help_lists_every_field(job):
    cls, _ = _config(job)
    key = _first_int_field(cls)
    assert key is not None
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(cls, None, [f"{key}=not-a-number"])
    with pytest.raises(ConfigError, match="nonexistent_field"):
        build_config(cls, None, ["nonexistent_field=1"])
    text = help_text(cls)
    for leaf, _ in _leaves(_defaults(cls)):
        assert leaf.split(".")[0] in text


def test_the_configs_reference_is_current():
    """docs/configs.md is generated from the dataclasses: regenerate it with
    ``python -m jobs --configs-doc`` after changing a field."""
    assert DOC.read_text() == configs_doc()
