"""The quickstart's stage runner, its flags, and the shipped base model's validity rule."""

import json

import pytest

from aligner.retrieval.shipped import (
    PROVENANCE,
    install_shipped_base,
    provenance,
    shipped_base_dir,
    shipped_base_fits,
)
from aligner.runtime.pipeline import Pipeline
from aligner.world import WorldSpec, world_fingerprint
from jobs.quickstart import FLAGS, TEACHERS, QuickstartConfig


class Job:
    """A fake job: counts its runs and writes a manifest (like every real job); the first run
    fails midway when asked to."""

    def __init__(self, out, fail_first: bool = False):
        self.out, self.runs, self.fail_first = out, 0, fail_first

    def __call__(self):
        self.runs += 1
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "partial.txt").write_text("work so far")
        if self.fail_first and self.runs == 1:
            raise RuntimeError("worker lost")
        (self.out / "manifest.json").write_text("{}")


def test_stages_skip_when_done_and_rerun_after_a_change(tmp_path):
    a, b = Job(tmp_path / "a"), Job(tmp_path / "b")

    def run(arg_a, fresh=False):
        pipe = Pipeline(tmp_path, fresh)
        pipe.stage("a", a.out, a, {"x": arg_a})
        pipe.stage("b", b.out, b, {"y": 1})
        return pipe

    run(1)
    assert (a.runs, b.runs) == (1, 1)
    pipe = run(1)
    assert (a.runs, b.runs) == (1, 1) and pipe.skipped == ["a", "b"]
    run(2)  # a's arguments changed: a runs, and b (which depends on it) runs again
    assert (a.runs, b.runs) == (2, 2)
    run(2, fresh=True)
    assert (a.runs, b.runs) == (3, 3)


def test_only_the_stages_that_read_a_redone_output_run_again(tmp_path):
    jobs = {n: Job(tmp_path / n) for n in "abcd"}

    def run(arg_c):
        pipe = Pipeline(tmp_path, False)
        pipe.stage("a", jobs["a"].out, jobs["a"], {"x": 1})
        pipe.stage("b", jobs["b"].out, jobs["b"], {"y": 1}, after=["a"])
        pipe.stage("c", jobs["c"].out, jobs["c"], {"z": arg_c}, after=["a"])
        pipe.stage("d", jobs["d"].out, jobs["d"], {"w": 1})  # default: after every earlier stage
        return pipe

    run(1)
    pipe = run(2)  # c changed: b does not read c and is skipped; d reads everything
    assert [jobs[n].runs for n in "abcd"] == [1, 1, 2, 2]
    assert pipe.skipped == ["a", "b"] and set(pipe.timings) == {"c", "d"}
    with pytest.raises(ValueError, match="not declared"):
        Pipeline(tmp_path, False).stage("e", tmp_path / "e", Job(tmp_path / "e"), {},
                                        after=["nope"])


def test_an_unfinished_stage_is_resumed_not_wiped(tmp_path):
    job = Job(tmp_path / "a", fail_first=True)
    with pytest.raises(SystemExit, match="stage a failed: RuntimeError: worker lost"):
        Pipeline(tmp_path, False).stage("a", job.out, job, {"x": 1})
    marker = json.loads((job.out / "quickstart_stage.json").read_text())
    assert marker["complete"] is False
    (job.out / "checkpoint.txt").write_text("resume from me")
    Pipeline(tmp_path, False).stage("a", job.out, job, {"x": 1})
    assert (job.out / "checkpoint.txt").is_file(), "same arguments: the job resumes its output"
    Pipeline(tmp_path, False).stage("a", job.out, job, {"x": 2})
    assert not (job.out / "checkpoint.txt").exists(), "other arguments: stale output removed"


def test_a_stage_identity_is_its_resolved_config(tmp_path):
    """A dataclass config is compared with every default resolved: changing a default redoes
    the stage even where the caller did not set it."""
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        out: str = "o"
        lr: float = 1e-3

    job = Job(tmp_path / "a")
    Pipeline(tmp_path, False).stage("a", job.out, job, Cfg())
    Pipeline(tmp_path, False).stage("a", job.out, job, Cfg())
    assert job.runs == 1
    Pipeline(tmp_path, False).stage("a", job.out, job, Cfg(lr=2e-3))
    assert job.runs == 2


def test_flags_and_config_checks():
    assert FLAGS["--fast"] == "fast=true" and FLAGS["--from-scratch"] == "from_scratch=true"
    assert QuickstartConfig(fast=True).rephraser == "template"
    assert QuickstartConfig().rephraser == "local"
    with pytest.raises(ValueError, match="teacher"):
        QuickstartConfig(teacher="oracle")
    with pytest.raises(ValueError, match="n_images"):
        QuickstartConfig(n_images=50)
    with pytest.raises(ValueError, match="gallery_relevant"):
        QuickstartConfig(gallery_relevant=-1)
    assert {"rephrase", "scorer", "both", "both+degraded"} <= set(TEACHERS)
    assert all(len(t["aesthetic"]) == len(t["aesthetic_weights"]) for t in TEACHERS.values())


def _fake_asset(root, spec: WorldSpec):
    (root / "checkpoint").mkdir(parents=True)
    (root / "checkpoint" / "open_clip_model.safetensors").write_bytes(b"weights")
    (root / "metrics.json").write_text('{"r@10": 0.9}')
    (root / PROVENANCE).write_text(json.dumps({"world_fingerprint": world_fingerprint(spec),
                                               "weights_sha256": "abc"}))
    return root


def test_the_shipped_base_is_used_only_on_its_own_world(tmp_path):
    spec = WorldSpec(n_images=300, seed=3)
    root = _fake_asset(tmp_path / "asset", spec)
    assert shipped_base_fits(world_fingerprint(spec), root) == (True, "trained on this very world")
    ok, why = shipped_base_fits(world_fingerprint(WorldSpec(n_images=300, seed=4)), root)
    assert not ok and "seed" in why
    ok, why = shipped_base_fits(world_fingerprint(WorldSpec(n_images=400, seed=3)), root)
    assert not ok and "n_images" in why
    fp = world_fingerprint(spec)
    ok, why = shipped_base_fits({**fp, "sha256": "0" * 64}, root)
    assert not ok and "captions" in why
    assert shipped_base_fits(fp, tmp_path / "nothing") == (False,
                                                          "the repository ships no base model")
    ckpt = install_shipped_base(tmp_path / "base", root)
    assert (ckpt / "open_clip_model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "base" / "metrics.json").is_file()
    assert (tmp_path / "base" / PROVENANCE).is_file()


def test_world_fingerprint_is_pure_in_seed_and_spec():
    a = world_fingerprint(WorldSpec(n_images=100, seed=1), n_probe=8)
    assert a == world_fingerprint(WorldSpec(n_images=100, seed=1), n_probe=8)
    assert a["sha256"] != world_fingerprint(WorldSpec(n_images=100, seed=2), n_probe=8)["sha256"]


def test_the_repository_ships_a_base_for_the_default_world():
    """The shipped base exists, fits the quickstart's default world, is small and loads."""
    from aligner.retrieval.models import load_checkpoint

    d = shipped_base_dir()
    assert d is not None, "aligner/assets/builtin_base is missing"
    cfg = QuickstartConfig()
    fp = world_fingerprint(WorldSpec(n_images=cfg.n_images, seed=cfg.seed,
                                     n_queries=cfg.n_queries,
                                     gallery_relevant=cfg.gallery_relevant))
    assert cfg.gallery_relevant == 20  # dense galleries: rendered after, never trained on
    assert shipped_base_fits(fp) == (True, "trained on this very world")
    weights = d / "checkpoint" / "open_clip_model.safetensors"
    assert weights.stat().st_size < 12e6
    prov = provenance()
    assert prov["reproduce"] and prov["weights_sha256"]
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["caption_recall_test"]["r@10"]["mean"] > 0.3
    r = load_checkpoint(d / "checkpoint", device="cpu")
    assert r.is_builtin and r.embed_dim == 256
