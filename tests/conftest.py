"""Test tiers: unit (default, no Ray), integration (one local Ray per session), gpu, slow.

The Ray fixture (see docs/architecture.md, "Tests"): one ``ray.init`` for the whole session,
2 CPUs, a small object store, quiet logs, loopback only, and the repository on the workers'
PYTHONPATH. Every test has a timeout (pyproject: ``timeout``), because actor pools that cannot
be scheduled hang instead of failing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
}


from tests.helpers.net import free_port  # noqa: E402

METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def one_faiss_thread():
    """faiss on one OpenMP thread for a module (``pytestmark = pytest.mark.usefixtures(...)``):
    timings and results of the index tests do not depend on the machine's cores."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (started on first use); its Prometheus
    metrics are on 127.0.0.1:METRICS_PORT (``metrics_port``)."""
    os.environ.update(RAY_ENV)
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 << 20,
        logging_level="WARNING",
        log_to_driver=False,
        _temp_dir=tmp,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **RAY_ENV}},
        _metrics_export_port=METRICS_PORT,
    )
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:  # noqa: BLE001 - progress bars are cosmetic
        pass
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve was never started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_port(ray_session) -> int:
    """The port of the session Ray's Prometheus metrics endpoint."""
    return METRICS_PORT


def pytest_collection_modifyitems(config, items):
    """Integration tests use the shared Ray; gpu tests skip without CUDA."""
    gpu = None
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("gpu"):
            if gpu is None:
                try:
                    import torch

                    gpu = torch.cuda.is_available()
                except ImportError:
                    gpu = False
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
