"""``ray job submit`` for real: the README's one-machine cluster lines, run as written.

A module fixture reads the README block (``<!-- test_job_submit: ... -->``) and runs its set-up
lines: the venv's ``bin`` first on ``PATH`` (what ``. .venv/bin/activate`` does), token auth
(``RAY_AUTH_MODE=token``, ``ray get-auth-token --generate`` with ``HOME`` in a temporary
directory, so the machine's own ``~/.ray/auth_token`` is never read or written), and
``ray start --head`` on 127.0.0.1 with what only a test adds: its own free ports (the session's
Ray and other people's Rays run on this machine too), a temporary ``--temp-dir``, 2 CPUs, a
small object store and ``--block``. It stops the head by killing the process group it started
(never ``ray stop``, which stops every Ray on the machine).

The tests then submit the README's pipeline (make_world -> embed -> build_index -> search)
through the real CLI, a parallel index build through ``JobSubmissionClient``, and a failing
job; and check outputs, job logs, exit codes, the uploaded working directory and that the Jobs
API refuses requests without the token. This is a separate head process, not the session Ray
of ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.net import free_port

REPO = Path(__file__).resolve().parents[2]
MARK = "<!-- test_job_submit: the lines below -->"
README_PORT = "8265"
#: environment a test head gets on top of the README's lines: quiet, loopback, quick to stop
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
#: inherited settings that would point the CLI or the head elsewhere
DROPPED_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
               "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR")
JOB_TIMEOUT_S = 240


def readme_lines() -> list[str]:
    """The README's cluster lines: continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    assert MARK in text, f"README.md lost its {MARK!r} block"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    block = re.sub(r"\\\n\s*", " ", block)
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _on_test_ports(line: str, dashboard: int) -> str:
    out = line.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{dashboard}").replace(
        f"--dashboard-port {README_PORT}", f"--dashboard-port {dashboard}")
    assert README_PORT not in out, out
    return out


@dataclass
class Head:
    """A running head started from the README's lines."""

    url: str
    gcs: str
    env: dict[str, str]
    temp_dir: Path
    out: Path
    token: str
    submits: list[str]
    log: Path

    def run(self, line: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A README-style shell line (``$OUT`` expands), from the checkout."""
        return subprocess.run(["bash", "-c", line], cwd=REPO, env=self.env, text=True,
                              capture_output=True, timeout=timeout)


def _wait_ready(url: str, token: str, proc: subprocess.Popen, log: Path,
                timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the Jobs API at {url} did not answer in {timeout_s}s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """Kill the head: its process group (``start_new_session``), then any survivor by pid."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The README's set-up lines on test ports; stopped by pid afterwards."""
    bin_dir = Path(sys.executable).parent
    if shutil.which("ray", path=str(bin_dir)) is None:
        pytest.skip(f"no `ray` CLI next to {sys.executable} (install ray[default])")
    dashboard = free_port()
    gcs = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjs-", dir="/tmp"))  # short: socket paths
    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("cluster-out")
    log = temp_dir / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(QUIET_ENV, HOME=str(home))
    token, proc, submits = "", None, []
    try:
        for line in readme_lines():
            if line == ". .venv/bin/activate":
                env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
                env["VIRTUAL_ENV"] = str(bin_dir.parent)
            elif line.startswith("export OUT="):
                assert line.startswith("export OUT=$PWD/out/"), line  # absolute, under the checkout
                env["OUT"] = str(out)
            elif line.startswith("export "):
                key, value = line.removeprefix("export ").split("=", 1)
                env[key] = value
            elif line.startswith("ray get-auth-token"):
                r = subprocess.run(shlex.split(line), env=env, capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, r.stderr
                token = r.stdout.strip()
                assert token and (home / ".ray" / "auth_token").read_text().strip() == token
            elif line.startswith("ray start"):
                args = shlex.split(_on_test_ports(line, dashboard)) + [
                    "--port", str(gcs), "--ray-client-server-port", str(free_port()),
                    "--dashboard-agent-listen-port", str(free_port()),
                    "--dashboard-agent-grpc-port", str(free_port()),
                    "--metrics-export-port", str(free_port()),
                    "--runtime-env-agent-port", str(free_port()),
                    "--node-manager-port", str(free_port()),
                    "--object-manager-port", str(free_port()),
                    "--temp-dir", str(temp_dir), "--num-cpus", "2",
                    "--object-store-memory", str(200 << 20), "--block"]
                with open(log, "w") as f:
                    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=f,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                _wait_ready(f"http://127.0.0.1:{dashboard}", token, proc, log)
            elif line.startswith("ray job submit"):
                submits.append(_on_test_ports(line, dashboard))
            else:
                raise AssertionError(f"README cluster line this test does not know: {line!r}")
        assert env.get("RAY_AUTH_MODE") == "token" and token and proc is not None and submits
        yield Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, temp_dir, out,
                   token, submits, log)
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_id(output: str) -> str:
    m = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output)
    assert m, output[-3000:]
    return m.group(1)


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_readme_pipeline_runs_through_ray_job_submit(head):
    names = [re.search(r"-m (jobs\.\w+)", s).group(1) for s in head.submits]
    assert names == ["jobs.make_world", "jobs.embed", "jobs.build_index", "jobs.search"], names
    ids = {}
    for name, line in zip(names, head.submits, strict=True):
        t0 = time.time()
        r = head.run(line)
        assert r.returncode == 0, f"{name} ({time.time() - t0:.0f}s):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        ids[name] = _job_id(r.stdout + r.stderr)
        assert f"Job '{ids[name]}' succeeded" in r.stdout + r.stderr

    # outputs: where $OUT pointed, not inside the job's copy of the working dir
    world = _manifest(head.out / "world")["summary"]
    # the README's 400 natural images plus the dense val/test galleries rendered beside them
    assert world["natural_images"] == 400 and world["gallery_images"] > 0, world
    emb = _manifest(head.out / "embeddings")
    assert emb["rows_out"] == world["images"] and emb["rows_failed"] == 0, emb
    index = _manifest(head.out / "index")
    assert index["ntotal"] == world["images"] and not index["parallel"], index
    assert (head.out / "search" / "search.png").is_file()

    # the logs, read back through the Jobs API: the embed driver joined this cluster
    # (RAY_ADDRESS from the job supervisor), it did not start a Ray of its own
    logs = head.run(f"ray job logs {ids['jobs.embed']} --address {head.url}", timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert f"joining Ray cluster at {head.gcs}" in logs.stdout, logs.stdout[-3000:]
    assert "started a local Ray" not in logs.stdout
    search = head.run(f"ray job logs {ids['jobs.search']} --address {head.url}", timeout=120)
    assert "query: two red circles on grass" in search.stdout, search.stdout[-3000:]
    assert len(re.findall(r"^\s+[1-5]\s+\S+", search.stdout, flags=re.M)) >= 5, search.stdout

    # what --working-dir . uploaded: the checkout without .venv and .git (Ray's default excludes)
    pkgs = [p for p in ((head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
                 ).glob("_ray_pkg_*")) if p.is_dir()]
    assert pkgs, list(head.temp_dir.rglob("working_dir_files"))
    for pkg in pkgs:
        assert (pkg / "jobs" / "embed.py").is_file()
        assert not (pkg / ".venv").exists() and not (pkg / ".git").exists(), pkg
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 30e6, (pkg, size)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_failing_job_exits_non_zero_with_its_error_visible(head):
    search = head.submits[-1]
    assert "index=$OUT/index " in search
    r = head.run(search.replace("index=$OUT/index ", "index=$OUT/no_such_index "))
    output = r.stdout + r.stderr
    assert r.returncode != 0, output[-3000:]
    job_id = _job_id(output)
    assert f"Job '{job_id}' failed" in output, output[-3000:]
    assert "FileNotFoundError" in output and "no_such_index" in output, output[-3000:]
    status = head.run(f"ray job status {job_id} --address {head.url}", timeout=120)
    said = status.stdout + status.stderr
    # the job's own exit status (2: a job's bad input) and its error line, kept by the Jobs API
    assert f"Job '{job_id}' failed" in said and "failed with exit code 2" in said, said
    assert "ERROR aligner.job: FileNotFoundError: index directory" in said, said


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_job_submission_client_runs_a_parallel_index_build_on_the_cluster(head):
    """The SDK, with the token as an ``Authorization`` header, and a runtime env that sets
    ``env_vars`` of its own (Ray refuses a driver ``ray.init`` that sets the same ones)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    emb = head.out / "embeddings"
    if not (emb / "manifest.json").is_file():
        pytest.skip("needs the README pipeline's embeddings (test above)")
    client = JobSubmissionClient(head.url, headers={"Authorization": f"Bearer {head.token}"})
    out = head.out / "index_parallel"
    job_id = client.submit_job(
        entrypoint=f"python -m jobs.build_index embeddings={emb} output={out} factory=Flat "
                   "shards=2 parallel=true cpus_per_task=0.5 progress=false",
        runtime_env={"working_dir": str(REPO),
                     "env_vars": {"HF_HUB_OFFLINE": "1", "ALIGNER_LOG_LEVEL": "INFO"}})
    deadline = time.time() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"joining Ray cluster at {head.gcs}" in logs, logs[-3000:]
    manifest = _manifest(out)  # two shards, each added by a Ray task on this cluster
    assert manifest["parallel"] and len(manifest["shards"]) == 2, manifest
    assert manifest["ntotal"] == _manifest(head.out / "world")["summary"]["images"], manifest


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_the_jobs_api_refuses_requests_without_the_token(head):
    def status(headers: dict[str, str]) -> int:
        req = urllib.request.Request(f"{head.url}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status({}) == 401
    assert status({"Authorization": "Bearer not-the-token"}) == 403
    assert status({"Authorization": f"Bearer {head.token}"}) == 200
    # a client without RAY_AUTH_MODE=token sends no token, and says why it was refused
    env = {**head.env, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run(["ray", "job", "list", "--address", head.url], env=env, text=True,
                       capture_output=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "Authentication required" in r.stdout + r.stderr, r.stderr
    # the token the head uses is the one `ray get-auth-token` prints
    r = subprocess.run(["ray", "get-auth-token"], env=head.env, text=True, capture_output=True,
                       timeout=120)
    assert r.stdout.strip() == head.token
