"""The Serve config and the application's arguments: Serve's own schema accepts the shipped
config, our schema rejects what Serve's would ignore, and the deployments it names are the ones
``build_app`` creates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.config import AppArgs

CONFIG = Path(__file__).resolve().parents[2] / "serving" / "config.yaml"


def _args(tmp_path: Path, **over: object) -> dict:
    for sub in ("base/ck", "aligned/ck", "ib", "ia", "corpus"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("ib", "ia"):
        (tmp_path / sub / "manifest.json").write_text("{}")
    args = {"corpus": str(tmp_path / "corpus"),
            "models": {"base": {"checkpoint": str(tmp_path / "base/ck"),
                                "indexes": {"flat": str(tmp_path / "ib")}},
                       "aligned": {"checkpoint": str(tmp_path / "aligned/ck"),
                                   "indexes": {"flat": str(tmp_path / "ia")}}}}
    args.update(over)
    return args


def test_the_shipped_config_passes_serves_schema_and_ours():
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(data)
    app = data["applications"][0]
    assert app["import_path"] == "serving.app:build_app"
    args = AppArgs(**app["args"])
    names = {d["name"] for d in app["deployments"]}
    assert names == {"ingress", "reranker", "rephraser", "judge",
                     *(f"retriever_{m}" for m in args.models)}
    for d in app["deployments"]:
        auto = d["autoscaling_config"]
        assert auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
        assert d["max_queued_requests"] > 0, "bounded queues: backpressure instead of collapse"
    ongoing = {d["name"]: d["max_ongoing_requests"] for d in app["deployments"]}
    assert ongoing["retriever_aligned"] >= 32 and ongoing["rephraser"] >= 16  # batches fill


def test_a_typo_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(ValidationError, match="limts"):
        AppArgs(**_args(tmp_path, limts={"max_k": 5}))
    with pytest.raises(ValidationError, match="max_kk"):
        AppArgs(**_args(tmp_path, limits={"max_kk": 5}))
    with pytest.raises(ValidationError, match="'gpt' is named but not in models"):
        AppArgs(**_args(tmp_path, compare=["base", "gpt"]))
    with pytest.raises(ValidationError, match="rate_per_s"):
        AppArgs(**_args(tmp_path, limits={"rate_per_s": -1}))


def test_build_app_checks_paths_and_the_key(tmp_path, monkeypatch):
    from serving.app import build_app

    monkeypatch.delenv("ALIGNER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="needs an API key"):
        build_app(_args(tmp_path))
    bad = _args(tmp_path, auth={"protect": "none"})
    bad["models"]["base"]["indexes"]["flat"] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="models.base.indexes.flat"):
        build_app(bad)
    monkeypatch.setenv("ALIGNER_API_KEY", "k")
    app = build_app(_args(tmp_path))
    assert app is not None


def test_relative_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _args(tmp_path)
    args["corpus"] = "corpus"
    args["models"]["base"]["indexes"] = {"flat": "ib"}
    cfg = AppArgs(**args).resolved()
    assert cfg.corpus == str(tmp_path / "corpus")
    assert cfg.models["base"].indexes["flat"] == str(tmp_path / "ib")
    assert cfg.database_url() == f"sqlite:///{tmp_path / 'out' / 'serving' / 'votes.db'}"
