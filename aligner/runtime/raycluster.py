"""Connect a job to Ray (an existing cluster or a local one) and size its actor pools."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
#: driver settings that the workers of a job need too (set in the driver's environment)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "RAY_DATA_DISABLE_PROGRESS_BARS", "ALIGNER_LOG_LEVEL",
                 "RAY_TRAIN_V2_ENABLED")
#: set by Ray's job supervisor in a submitted job's driver: the job's config and runtime env
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def init_ray(address: str | None = None, num_cpus: int | None = None,
             progress_bars: bool = True, connect_timeout_s: float = 5.0) -> None:
    """``ray.init`` once: join ``address``/``RAY_ADDRESS`` if given, else start a local Ray.

    Inside ``ray job submit`` the driver already has ``RAY_ADDRESS`` (the job supervisor sets it
    to the cluster's GCS address) and joins the cluster; the runtime env it passes is merged
    with the submitted job's (:func:`worker_env_vars`).
    Without an address a new local Ray is started, always (``address="local"``): never a
    running head found on this machine, nor the address a stopped head left behind (plain
    ``ray.init()`` follows both, and retries a dead one for minutes). A given ``host:port``
    that does not accept a connection within ``connect_timeout_s`` is a clear error. A local
    Ray puts this repository on the workers' PYTHONPATH so jobs run from a checkout.

    Raises:
        ConnectionError: an address that nothing listens on.
    """
    import ray

    if ray.is_initialized():
        return
    for k, v in _LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = worker_env_vars(os.environ)
    if address and address != "local":
        check_reachable(address, connect_timeout_s)
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars} if env_vars else None)
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **env_vars},
                              "worker_process_setup_hook": "aligner.runtime.raycluster.quiet_worker_logs"})
        log.info("started a local Ray (no address given; a running cluster is joined only "
                 "with ray_address= or RAY_ADDRESS): %s", ray.cluster_resources())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = (
        progress_bars and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1")


def worker_env_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver settings (:data:`FORWARDED_ENV`) a job's workers get through ``ray.init``.

    In a submitted job (``ray job submit``) Ray merges the driver's ``ray.init`` runtime env
    with the job's, and refuses to start when both set the same environment variable (even to
    the same value). A variable the job's runtime env sets (``--runtime-env-json
    '{"env_vars": ...}'``) is already in the driver's environment and reaches every worker of
    the job, so it is left out here.
    """
    job_env: Mapping[str, str] = {}
    if environ.get(JOB_CONFIG_ENV):
        runtime_env = json.loads(environ[JOB_CONFIG_ENV]).get("runtime_env") or {}
        job_env = runtime_env.get("env_vars") or {}
    return {k: environ[k] for k in FORWARDED_ENV if k in environ and k not in job_env}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``[ray://|http://]host:port`` address (``auto`` and
    addresses without a port are left to Ray).

    Raises:
        ConnectionError: no TCP connection within ``timeout_s``.
    """
    import socket

    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({type(e).__name__}: {e}); "
                              "start one (ray start --head), fix ray_address / RAY_ADDRESS, or "
                              "leave both unset to run on a new local Ray") from None


def quiet_worker_logs() -> None:
    """Worker set-up hook of the local Ray: silence what only a dashboard-less Ray says.

    The local Ray runs without the dashboard (its memory matters on a laptop), so the State API
    is absent and Ray Train's placement-group cleaner warns that it cannot query the controller
    every few seconds for the whole run. Placement groups are still removed when the
    controller exits normally; on a cluster (with its dashboard) nothing is silenced.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)


def cluster_has_gpus() -> bool:
    """Whether the connected cluster has at least one GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """An actor pool: how many actors, what each asks Ray for, and its torch threads."""

    size: int
    num_cpus: float
    num_gpus: float = 0.0
    threads: int = 1
    device: str = "cpu"


def plan_model_actors(resources: dict[str, float], num_actors: int = 0) -> ActorPlan:
    """Size an image-model actor pool that shares the CPUs with decode tasks (``jobs.embed``).

    - GPUs: one actor per GPU (``num_gpus=1``, 1 CPU each), at most the number of GPUs.
    - CPU only: the model shares the CPUs with the decode tasks, which must never be starved
      (an actor pool that takes every CPU hangs a small cluster's pipeline). One actor per 4
      CPUs; each asks Ray for ``0.5 * threads`` logical CPUs (capped so at least one whole CPU
      always stays free for a decode task) but runs ``threads = CPUs // size`` torch threads:
      the model may use every core while the decode tasks wait on I/O, and the OS shares the
      cores when both are busy. On 2 CPUs: one actor, 2 threads, 0.5 CPU (measured on 10k
      images: 1,479 rows/s after start-up vs 668 with 1 thread; ``bench/bench_embed.py``).

    Args:
        resources: ``ray.cluster_resources()``.
        num_actors: a fixed pool size; 0 = from the resources.
    """
    gpus = int(resources.get("GPU", 0) or 0)
    cpus = max(1.0, float(resources.get("CPU", 1) or 1))
    if gpus >= 1:
        size = min(num_actors or gpus, gpus)
        if num_actors > gpus:
            log.warning("num_actors=%d > %d GPUs: using %d GPU actors", num_actors, gpus, gpus)
        per_cpu = 1.0 if cpus - size >= 1 else max(0.1, (cpus - 1) / size)
        return ActorPlan(size, per_cpu, 1.0, max(1, int(per_cpu)), "cuda")
    size = num_actors or max(1, int(cpus // 4))
    threads = max(1, int(cpus // size))
    per_cpu = min(0.5 * threads, max(0.1, (cpus - 1) / size))
    return ActorPlan(size, round(per_cpu, 3), 0.0, threads, "cpu")


def plan_cpu_actors(cluster_cpus: float, num_actors: int = 0, threads: int = 0,
                    num_cpus: float = 0.0) -> ActorPlan:
    """Size a CPU actor pool of a model that decodes step by step (the local LLM rephraser):
    many single-threaded actors, and a CPU left for the read task.

    Measured on 2 shared cores (SmolLM2-135M, 600 queries): 1 actor x 2 torch threads decoded
    4-10x slower than 1 x 1 when other work took a core (OpenMP threads wait on each other);
    2 actors x 1 thread were 1.8x faster than 1 x 1 (6.4 vs 3.7 queries/s). So threads default
    to 1 per actor (2 above 4 CPUs), actors to ``cpus / threads``. An actor holding a full CPU
    beside the read task can hang a 2-CPU pipeline, so each reserves at most
    ``(cpus - 1) / actors`` CPUs (at least 0.25) for Ray's accounting.
    """
    cpus = max(1.0, float(cluster_cpus))
    n = num_actors or max(1, int(cpus // (threads or (1 if cpus <= 4 else 2))))
    t = threads or int(min(4, max(1, cpus // n)))
    c = num_cpus or round(max(0.25, min(float(t), (cpus - 1) / n)), 2)
    return ActorPlan(size=n, num_cpus=c, threads=t)
