"""Fault injection for tests: a Ray Train worker that dies once, mid-run.

Ray Train's failure handling (``RunConfig(failure_config=FailureConfig(max_failures=N))``,
the job configs' ``max_failures``) restarts a worker group whose worker died, and the restarted
loop resumes from the last reported checkpoint. To test that with a real death, set on the
*driver* (the process that calls ``TorchTrainer.fit``)::

    ALIGNER_TEST_KILL_WORKER="<rank>:<step>:<marker file>"

The worker of world rank ``rank`` then ends its process with ``os._exit`` just before it
runs optimizer step ``step`` (0-based: after ``step`` steps are done), as a crash would,
unless ``marker file`` exists; it creates the file first, so the fault fires once per marker
(the restarted worker group runs on). The marker must be on a filesystem the driver's and the
worker's machine share (one machine in the tests). Nothing reads the variable on the workers:
:func:`~aligner.training.loop.fit_torch_trainer` reads it once and ships the parsed
:class:`WorkerFault` with the loop's inputs, so it works whatever environment Ray gives its
workers. Unset (always, outside tests): no fault.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KILL_WORKER_ENV = "ALIGNER_TEST_KILL_WORKER"
#: the exit status of a worker killed by the fault (what a crashed native library might give)
EXIT_CODE = 17


@dataclass(frozen=True)
class WorkerFault:
    """One injected worker death.

    Attributes:
        rank: world rank of the worker that dies.
        step: it dies before optimizer step ``step`` (0-based).
        marker: created when it dies; while it exists the fault is spent.
    """

    rank: int
    step: int
    marker: str

    @classmethod
    def parse(cls, spec: str) -> WorkerFault:
        """``"<rank>:<step>:<marker file>"`` (the marker path may itself contain ``:``).

        Raises:
            ValueError: a spec of another shape, a negative rank or step, a relative marker.
        """
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[0].strip().isdigit() or not parts[1].strip().isdigit():
            raise ValueError(f"{KILL_WORKER_ENV} must be '<rank>:<step>:<marker file>' with "
                             f"non-negative integers, got {spec!r}")
        if not Path(parts[2]).is_absolute():
            raise ValueError(f"{KILL_WORKER_ENV}: the marker must be an absolute path (workers "
                             f"have their own working directory), got {parts[2]!r}")
        return cls(int(parts[0]), int(parts[1]), parts[2])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerFault | None:
        """The fault ``ALIGNER_TEST_KILL_WORKER`` asks for (None when unset or empty)."""
        spec = (os.environ if environ is None else environ).get(KILL_WORKER_ENV, "").strip()
        return cls.parse(spec) if spec else None

    def due(self, rank: int, step: int) -> bool:
        """Whether worker ``rank`` must die before step ``step``: claims the marker (atomically,
        so one worker fires it once) and returns True, or returns False."""
        if rank != self.rank or step != self.step:
            return False
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"rank {rank} killed before step {step} (pid {os.getpid()})\n")
        return True

    def maybe_kill(self, rank: int, step: int) -> None:
        """End this process at once (``os._exit``, no clean-up) when :meth:`due`."""
        if self.due(rank, step):
            log.warning("%s: rank %d exits before step %d (injected fault)", KILL_WORKER_ENV,
                        rank, step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_CODE)
