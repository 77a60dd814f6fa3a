"""Run a sequence of job stages, skipping the finished ones (what the quickstart stands on).

A stage is a function that writes one output directory (and its ``manifest.json``) from a
config. :class:`Pipeline` skips a stage when its output is complete for the same config and
none of the stages it depends on (``after``; by default every earlier stage) ran in this call.
An output of another config (or one made from inputs that were just redone) is deleted first;
an unfinished output of the same config is kept, so the job resumes it (training from its
checkpoints, the rephraser from its part files, the embedder from its shards).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aligner.data.io import atomic_write_text, json_safe

log = logging.getLogger(__name__)
STAGE_FILE = "quickstart_stage.json"


def identity(config: Any) -> Any:
    """A stage's config as plain JSON data (dataclasses expanded), for comparison."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(json_safe(config)))


class Pipeline:
    """Runs stages in order and skips the finished ones (see the module docstring).

    Attributes:
        timings: seconds per stage that ran; ``skipped``: stages found complete.
    """

    def __init__(self, work: Path, fresh: bool) -> None:
        self.work, self.fresh = work, fresh
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.seen: list[str] = []  # stages declared so far, in order
        self.ran: set[str] = set()  # stages that ran in this call

    def stage(self, name: str, out: Path, fn: Callable[[], Any], config: Any,
              key: Any = None, after: list[str] | None = None) -> None:
        """Run ``fn()``, which writes ``out`` from ``config``, unless it is already done.

        The stage's identity is its resolved ``config`` (every default included, so a changed
        default redoes the stage) and ``key``. ``after`` names the stages whose outputs it
        reads. An exception in ``fn`` leaves the stage marked unfinished and ends the run with
        ``SystemExit`` naming the stage.
        """
        deps = list(self.seen) if after is None else after
        unknown = [d for d in deps if d not in self.seen]
        if unknown:
            raise ValueError(f"stage {name} depends on {unknown}, which are not declared before it")
        self.seen.append(name)
        want = {"config": identity(config), "key": identity(key)}
        marker = out / STAGE_FILE
        prev = json.loads(marker.read_text()) if marker.is_file() else None
        same = prev is not None and {k: prev.get(k) for k in want} == want
        redo = self.fresh or any(d in self.ran for d in deps)
        if not redo and same and prev.get("complete") and (out / "manifest.json").is_file():
            log.info("[%s] %s is complete: skipped", name, out)
            self.skipped.append(name)
            return
        if out.exists() and (redo or not same):
            shutil.rmtree(out)
        elif out.exists():
            log.info("[%s] resuming the unfinished output in %s", name, out)
        self.ran.add(name)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({**want, "complete": False}, indent=2))
        t = time.time()
        log.info("[%s] starting", name)
        try:
            fn()
        except Exception as e:
            log.exception("[%s] failed", name)
            raise SystemExit(f"stage {name} failed: {type(e).__name__}: {e}") from e
        atomic_write_text(marker, json.dumps({**want, "complete": True}, indent=2))
        self.timings[name] = round(time.time() - t, 1)
        log.info("[%s] done in %.0f s", name, self.timings[name])
