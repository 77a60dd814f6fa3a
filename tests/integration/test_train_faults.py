"""A Ray Train worker that dies mid-run: Ray Train's failure handling (``max_failures``)
restarts the worker group, the restarted loop resumes from the last reported checkpoint (not
from step 0), and the run finishes with the right number of steps. With ``max_failures=0`` the
same death fails the run, so the restart above is the failure config's doing.

The death is real: rank 1 ends its process with ``os._exit`` (``aligner.training.faults``,
driven by ``ALIGNER_TEST_KILL_WORKER`` on the driver) while rank 0 waits on it in a DDP step.
"""

from __future__ import annotations

import json

import pytest

from aligner.training.faults import KILL_WORKER_ENV, WorkerFault
from aligner.world import WorldSpec, generate_world

STEPS, CKPT_EVERY, LOG_EVERY = 12, 4, 2
#: rank 1 dies before step 11 (0-based), i.e. after 11 steps: checkpoint 8 is the last one.
#: Not before step 9 or 10: Ray Train registers a checkpoint when it polls the report, and
#: rank 0 reaches step 10's gradient all-reduce only after its report of step 10 was taken,
#: which is after its report of step 8 (the one with the checkpoint) was taken.
KILL_RANK, KILL_STEP, LAST_CKPT = 1, 11, 8


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault-world")
    generate_world(WorldSpec(n_images=200, n_queries=20, n_paraphrases=5, val_fraction=0.1,
                             test_fraction=0.1), d, workers=1, progress=False)
    return d


def _args(world, out, *extra: str) -> list[str]:
    return [f"world={world}", f"output={out}", "num_workers=2", "evaluate=false",
            "train.batch_size=32", "train.warmup=2", f"train.steps={STEPS}",
            f"train.checkpoint_every={CKPT_EVERY}", f"train.log_every={LOG_EVERY}",
            "train.eval_every=0", *extra]


def test_the_fault_spec_parses_and_fires_once(tmp_path):
    marker = tmp_path / "fired"
    fault = WorkerFault.from_env({KILL_WORKER_ENV: f"1:11:{marker}"})
    assert fault == WorkerFault(1, 11, str(marker))
    assert WorkerFault.from_env({}) is None
    assert not fault.due(0, 11) and not fault.due(1, 10) and not marker.exists()
    assert fault.due(1, 11) and marker.exists()
    assert not fault.due(1, 11)  # spent: the restarted worker runs on
    for bad in ("1:x:/tmp/m", "1:2", f"-1:2:{marker}", "1:2:relative/marker"):
        with pytest.raises(ValueError, match=KILL_WORKER_ENV):
            WorkerFault.parse(bad)


@pytest.mark.timeout(300)
def test_a_killed_worker_restarts_from_the_last_checkpoint_and_finishes(
        ray_session, tiny_world, tmp_path, monkeypatch):
    from jobs.pretrain import main

    out, marker = tmp_path / "base", tmp_path / "killed"
    monkeypatch.setenv(KILL_WORKER_ENV, f"{KILL_RANK}:{KILL_STEP}:{marker}")
    assert main(_args(tiny_world, out, "max_failures=1")) == 0

    # the fault fired: rank 1 really died mid-run (once)
    assert marker.read_text().startswith(f"rank {KILL_RANK} killed before step {KILL_STEP}")
    hist = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # every interval once, to the end: steps 2..8 from the first attempt (restored from the
    # checkpoint), 10 and 12 from the restarted one
    assert [h["step"] for h in hist] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), hist
    resumed = [(h["step"], h["resumed_from"]) for h in hist if "resumed_from" in h]
    assert resumed == [(LAST_CKPT + LOG_EVERY, LAST_CKPT)], hist  # from step 8, not from 0
    meta = json.loads((out / "checkpoint" / "aligner.json").read_text())
    assert meta["step"] == STEPS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["last"]["step"] == STEPS


@pytest.mark.timeout(300)
def test_without_restarts_the_same_death_fails_the_run(ray_session, tiny_world, tmp_path,
                                                        monkeypatch):
    from jobs.pretrain import main

    out, marker = tmp_path / "base", tmp_path / "killed"
    monkeypatch.setenv(KILL_WORKER_ENV, f"{KILL_RANK}:{KILL_STEP}:{marker}")
    from ray.train import WorkerGroupError

    with pytest.raises(WorkerGroupError) as err:
        main(_args(tiny_world, out, "max_failures=0"))
    assert marker.is_file()
    # Ray Train names the dead worker: rank 1 failed its health check (the process was gone)
    assert f"[Rank {KILL_RANK} Error Snippet]" in str(err.value), str(err.value)[-3000:]
    assert "health check failed" in str(err.value), str(err.value)[-3000:]
    assert not (out / "checkpoint").exists()
