"""Config dataclasses: YAML defaults, key=value overrides, type checks, clear errors."""

from dataclasses import dataclass, field

import pytest

from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import ConfigError, build_config, help_text, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-3
    towers: list[str] = field(default_factory=lambda: ["visual"])


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    model: ModelSpec = field(default_factory=ModelSpec)
    opt: str | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


def test_overrides_nested_and_typed(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 5\ninner:\n  lr: 0.1\n")
    cfg = build_config(Cfg, y, ["inner.lr=3e-4", "flag=true", "inner.towers=[visual,text]",
                                "model.name=ViT-B-32", "model.pretrained=laion2b_s34b_b79k"])
    assert cfg.steps == 5 and cfg.flag is True
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.towers == ["visual", "text"]
    assert cfg.model.name == "ViT-B-32" and cfg.model.pretrained == "laion2b_s34b_b79k"
    assert cfg.opt is None


def test_comma_list_and_int_from_float_string():
    cfg = build_config(Cfg, None, ["inner.towers=visual,text", "steps=20"])
    assert cfg.inner.towers == ["visual", "text"] and cfg.steps == 20


@pytest.mark.parametrize("bad", ["stepz=3", "steps=abc", "steps=1.5", "flag=maybe",
                                 "inner.nope=1", "noequals"])
def test_bad_overrides_fail_loudly(bad):
    with pytest.raises(ConfigError):
        build_config(Cfg, None, [bad])


def test_post_init_checks_become_config_errors():
    with pytest.raises(ConfigError, match="steps must be"):
        build_config(Cfg, None, ["steps=-1"])


def test_missing_yaml_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(Cfg, tmp_path / "nope.yaml", [])


def test_help_lists_nested_fields():
    text = help_text(Cfg)
    assert "inner.lr" in text and "model.checkpoint" in text


def test_parse_overrides_yaml_scalars():
    assert parse_overrides(["a.b=1", "c=null", "d="]) == {"a": {"b": 1}, "c": None, "d": ""}


@dataclass
class _Inner:
    a: int = 1
    b: int = 2


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=lambda: _Inner(a=10, b=20))


def test_a_nested_override_keeps_the_fields_default_not_the_classes():
    cfg = build_config(_Outer, None, ["inner.b=5"])
    assert (cfg.inner.a, cfg.inner.b) == (10, 5)
    assert build_config(_Outer, None, []).inner == _Inner(10, 20)
