"""Typed training configs: the shipped base's recipe, the job YAMLs, the loop-level checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from aligner.retrieval.models import ModelSpec
from aligner.runtime.config import ConfigError, build_config
from aligner.training.config import (
    AlignConfig,
    AlignLoopConfig,
    PretrainConfig,
    PretrainLoopConfig,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "aligner" / "assets" / "builtin_base" / "pretrain.yaml"

#: The shipped base's recipe as it was written before the configs were nested (flat keys).
SHIPPED_RECIPE = {
    "model": {"name": "builtin", "pretrained": None, "checkpoint": None, "image_size": 64,
              "embed_dim": 256},
    "steps": 3000, "batch_size": 256, "lr": 0.001, "min_lr_ratio": 0.02, "warmup": 20,
    "weight_decay": 0.1, "betas": [0.9, 0.98], "grad_clip": 1.0, "flip": True,
    "text_unlocked_layers": 0, "text_lr_scale": 0.1, "text_proj_lr_scale": 0.1, "seed": 0,
    "num_workers": 1, "use_gpu": False, "threads_per_worker": 0, "eval_every": 250,
    "checkpoint_every": 500, "log_every": 50, "max_failures": 1, "evaluate": True,
    "eval_gallery": "test", "max_train_images": 0,
}


def test_the_shipped_recipe_loads_with_its_values():
    cfg = build_config(PretrainConfig, SHIPPED, [])
    loop_keys = {f.name for f in dataclasses.fields(PretrainLoopConfig)}
    for key, value in SHIPPED_RECIPE.items():
        if key == "model":
            assert dataclasses.asdict(cfg.model) == value
        elif key in loop_keys:
            assert getattr(cfg.train, key) == value, key
        else:
            assert getattr(cfg, key) == value, key
    assert SHIPPED.read_text().startswith(
        "# python -m jobs.pretrain --config aligner/assets/builtin_base/pretrain.yaml")


def test_job_yamls_resolve_to_the_defaults():
    pre = build_config(PretrainConfig, REPO / "jobs" / "configs" / "pretrain.yaml", [])
    assert pre == PretrainConfig()
    align = build_config(AlignConfig, REPO / "jobs" / "configs" / "align.yaml", [])
    assert align.train == AlignLoopConfig()
    assert align.model.checkpoint == "out/base/checkpoint"


def test_loop_settings_are_under_train():
    cfg = build_config(AlignConfig, None, ["model.checkpoint=/x", "train.steps=7",
                                           "train.lr=3e-4", "train.towers=both"])
    assert (cfg.train.steps, cfg.train.lr, cfg.train.towers) == (7, 3e-4, "both")
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config(AlignConfig, None, ["model.checkpoint=/x", "steps=7"])
    # the real defaults, one home each
    assert AlignLoopConfig().selection == "wise" and AlignLoopConfig().text_lr_scale == 0.1
    assert PretrainLoopConfig().text_proj_lr_scale == 0.1


@pytest.mark.parametrize(("cls", "kwargs", "field"), [
    (AlignLoopConfig, {"towers": "image"}, "towers"),
    (AlignLoopConfig, {"selection": "best"}, "selection"),
    (AlignLoopConfig, {"label_smoothing": 0.5}, "label_smoothing"),
    (AlignLoopConfig, {"wise_alphas": [0.0]}, "wise_alphas"),
    (AlignLoopConfig, {"eval_every": 0}, "eval_every"),
    (AlignLoopConfig, {"grad_accum": 0}, "grad_accum"),
    (AlignLoopConfig, {"log_every": 0}, "log_every"),
    (AlignLoopConfig, {"pref_weight": 0.0, "contrastive_weight": 0.0}, "pref_weight"),
    (PretrainLoopConfig, {"steps": 0}, "steps"),
    (PretrainLoopConfig, {"batch_size": 1}, "batch_size"),
    (PretrainLoopConfig, {"betas": [0.9]}, "betas"),
    (PretrainLoopConfig, {"min_lr_ratio": 2.0}, "min_lr_ratio"),
])
def test_checks_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_job_level_checks():
    with pytest.raises(ValueError, match="num_workers"):
        PretrainConfig(train=PretrainLoopConfig(batch_size=65), num_workers=2)
    with pytest.raises(ValueError, match="export_to"):
        PretrainConfig(export_to="/tmp/x", evaluate=False)
    with pytest.raises(ValueError, match="model.checkpoint"):
        AlignConfig()
    assert AlignConfig(model=ModelSpec(checkpoint="/x")).model.checkpoint == "/x"
