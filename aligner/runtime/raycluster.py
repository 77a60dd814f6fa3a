"""Connect a job to Ray: an existing cluster (``ray job submit``, ``RAY_ADDRESS``) or a local one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             progress_bars: bool = True) -> None:
    """``ray.init`` once: join ``address``/``RAY_ADDRESS`` if given, else start a local Ray.

    Inside ``ray job submit`` the driver already has ``RAY_ADDRESS`` and joins the cluster.
    A local Ray puts this repository on the workers' PYTHONPATH so jobs run from a checkout.
    """
    import ray

    if ray.is_initialized():
        return
    for k, v in _LOCAL_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RAY_DATA_DISABLE_PROGRESS_BARS",
                                           "ALIGNER_LOG_LEVEL", "RAY_TRAIN_V2_ENABLED")
                if k in os.environ}
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars} if env_vars else None)
    else:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **env_vars},
                              "worker_process_setup_hook": "aligner.runtime.raycluster.quiet_worker_logs"})
        log.info("started a local Ray: %s", ray.cluster_resources())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = (
        progress_bars and os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") != "1")


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
