"""Connecting to Ray predictably: a dead address is a clear error within seconds (never minutes
of retries), and no address means a new local Ray, never a head found on the machine."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aligner.runtime.raycluster import check_reachable

REPO = Path(__file__).resolve().parents[2]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_check_reachable_fails_fast_on_a_dead_address():
    port = _dead_port()
    t0 = time.perf_counter()
    for addr in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"http://127.0.0.1:{port}/"):
        with pytest.raises(ConnectionError, match="no Ray cluster answers"):
            check_reachable(addr, timeout_s=2.0)
    assert time.perf_counter() - t0 < 10


def test_check_reachable_passes_a_listening_port_and_leaves_auto_to_ray():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        check_reachable(f"127.0.0.1:{s.getsockname()[1]}")
    check_reachable("auto")  # Ray resolves it
    check_reachable("local")


def test_init_ray_with_a_dead_address_is_a_clear_error_within_seconds():
    port = _dead_port()
    code = ("from aligner.runtime.raycluster import init_ray\n"
            f"init_ray('127.0.0.1:{port}')\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in r.stderr
    assert time.perf_counter() - t0 < 60  # the import of ray included; no minutes of retries


def test_worker_env_vars_leave_out_what_a_submitted_job_already_sets():
    """Ray refuses to merge a job's runtime env with the driver's ``ray.init`` one when both set
    the same variable, so a job's own ``env_vars`` are not passed again."""
    import json

    from aligner.runtime.raycluster import worker_env_vars

    env = {"HF_HUB_OFFLINE": "1", "ALIGNER_LOG_LEVEL": "DEBUG", "PATH": "/bin"}
    assert worker_env_vars(env) == {"HF_HUB_OFFLINE": "1", "ALIGNER_LOG_LEVEL": "DEBUG"}
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip",
                           "env_vars": {"HF_HUB_OFFLINE": "1"}}, "metadata": {}}
    submitted = {**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    assert worker_env_vars(submitted) == {"ALIGNER_LOG_LEVEL": "DEBUG"}
    no_env_vars = {**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": None})}
    assert worker_env_vars(no_env_vars) == worker_env_vars(env)
