"""A bounded soak with faults: search load at 32 connections, votes, a killed retriever
replica and an in-place redeploy with a new checkpoint.

    python bench/serve_world.py --out /tmp/sw && python bench/soak_serve.py --workdir /tmp/sw
    python bench/soak_serve.py --workdir /tmp/sw --seconds 60 --kill-at 15 --redeploy-at 35

On a new local Ray (Serve's proxy on 127.0.0.1), the application is deployed over the serve
world's two models with the checked-in speed settings and the rate limit raised. For
``--seconds``:

* **load**: wrk at ``--connections`` (32) on ``POST /v1/search`` (the world's queries);
* **probes**: one client sends a text search and an embedding search (which always goes
  through the retriever deployment, whatever ``speed.local_text_search`` says) in turn every
  ``--probe-ms``; each answer's time and status is kept;
* **votes**: one client asks ``/v1/compare`` and votes on it with an ``Idempotency-Key``,
  retrying a failed vote with the same key until it is acknowledged;
* at ``--kill-at`` s one replica of the default model's retriever is killed (``ray.kill``,
  no restart: Serve's controller must notice and replace it);
* at ``--redeploy-at`` s the application is redeployed in place with the two models'
  checkpoints and indexes swapped (a new checkpoint under the same names).

Reports wrk's totals, each probe path's error rate and the recovery time after each fault
(from the fault to the first success after the last failure), and checks the votes: every
acknowledged vote is in the database exactly once, and nothing else is. Writes
``bench/soak_results.json`` (``--out``) and exits 1 if a vote was lost or duplicated.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_serve import free_port, served_models, write_bodies, wrk  # noqa: E402

API_KEY = "soak-key"


def _post(conn: http.client.HTTPConnection, path: str, body: dict,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn.request("POST", path, json.dumps(body),
                  {"content-type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, None


class Probe(threading.Thread):
    """A text search and an embedding search in turn, every ``period`` s: (t, path, status)."""

    def __init__(self, port: int, queries: list[str], dim: int, period: float,
                 stop: threading.Event, t0: float) -> None:
        super().__init__(daemon=True)
        self.port, self.queries, self.dim, self.period = port, queries, dim, period
        self.stop, self.t0 = stop, t0
        self.log: list[tuple[float, str, int]] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        i = 0
        while not self.stop.is_set():
            kind = "text" if i % 2 == 0 else "embedding"
            body = ({"text": self.queries[i % len(self.queries)], "k": 10} if kind == "text"
                    else {"embedding": [1.0] + [0.0] * (self.dim - 1), "k": 10})
            t = time.perf_counter() - self.t0
            try:
                status, _ = _post(conn, "/v1/search", body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.log.append((round(t, 3), kind, status))
            i += 1
            time.sleep(self.period)


class Voter(threading.Thread):
    """Compare, then vote with an Idempotency-Key, retrying the vote until acknowledged."""

    def __init__(self, port: int, queries: list[str], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.queries, self.stop = port, queries, stop
        self.acked: list[tuple[str, str]] = []   # (idempotency key, vote id)
        self.compare_failures = 0
        self.vote_retries = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        auth = {"authorization": f"Bearer {API_KEY}"}
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                status, cmp = _post(conn, "/v1/compare", {"text": self.queries[i % len(
                    self.queries)], "k": 4})
            except (OSError, http.client.HTTPException):
                status, cmp = 0, None
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            if status != 200:
                self.compare_failures += 1
                time.sleep(0.2)
                continue
            key = uuid.uuid4().hex
            body = {"comparison_id": cmp["comparison_id"],
                    "preferred": ("left", "right")[i % 2], "confidence": 3}
            deadline = time.monotonic() + 120  # a vote is retried until acknowledged
            while time.monotonic() < deadline:
                try:
                    status, v = _post(conn, "/v1/votes", body, {**auth, "Idempotency-Key": key})
                except (OSError, http.client.HTTPException):
                    status, v = 0, None
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                if status == 200:
                    self.acked.append((key, str(v.get("vote_id", v.get("id", "")))))
                    break
                self.vote_retries += 1
                time.sleep(0.2)
            time.sleep(0.05)


def recovery(log: list[tuple[float, str, int]], kind: str, at: float, until: float
             ) -> dict[str, Any]:
    """Failures of ``kind`` probes in [at, until) and the time from ``at`` to the first
    success after the last failure (0 when nothing failed)."""
    rows = [(t, s) for t, k, s in log if k == kind and at <= t < until]
    failed = [t for t, s in rows if s != 200]
    rec = 0.0
    if failed:
        after = [t for t, s in rows if s == 200 and t > failed[-1]]
        rec = round((after[0] if after else until) - at, 2)
    return {"probes": len(rows), "failed": len(failed), "recovery_s": rec,
            "statuses": sorted({s for _, s in rows if s != 200})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a bench/serve_world.py directory")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--kill-at", type=float, default=15.0)
    p.add_argument("--redeploy-at", type=float, default=35.0)
    p.add_argument("--probe-ms", type=float, default=50.0)
    p.add_argument("--out", default=str(REPO / "bench" / "soak_results.json"))
    a = p.parse_args(argv)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "ALIGNER_API_KEY": API_KEY}
    os.environ.update(env)
    import ray
    from ray import serve

    from aligner.data.queries import read_queries
    from serving.app import build_app
    from serving.votes import VoteStore

    work = Path(a.workdir).resolve()
    world = served_models(work)
    queries = read_queries(world["queries"])["query"].to_pylist()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    names = list(world["models"])
    default = world["default"]

    def app_args(swap: bool) -> dict[str, Any]:
        ms = {n: world["models"][n] for n in names}
        if swap:
            ms = {names[0]: ms[names[1]], names[1]: ms[names[0]]}
        return {"corpus": world["corpus"], "data_dir": str(tmp / "serving"),
                "models": {n: {"checkpoint": m["checkpoint"], "indexes": {"hnsw": m["index"]}}
                           for n, m in ms.items()},
                "default_model": default, "compare": world["compare"],
                "judge": {"model": default}, "log_requests": False,
                "limits": {"rate_per_s": 1e6, "rate_burst": 1_000_000}}

    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **env}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    serve.run(build_app(app_args(False)), name="aligner", route_prefix="/")
    retr = serve.get_deployment_handle(f"retriever_{default}", "aligner")
    dim = retr.describe.remote().result()["dim"]
    bodies = write_bodies(tmp / "cycle.jsonl", queries, {})
    wrk(port, "/v1/search", bodies, 8, 3.0)  # warm up

    stop = threading.Event()
    t0 = time.perf_counter()
    probe = Probe(port, queries, dim, a.probe_ms / 1000, stop, t0)
    voter = Voter(port, queries, stop)
    load: dict[str, Any] = {}
    loader = threading.Thread(target=lambda: load.update(
        wrk(port, "/v1/search", bodies, a.connections, a.seconds)), daemon=True)
    for t in (probe, voter, loader):
        t.start()
    events: dict[str, float] = {}

    time.sleep(max(0.0, a.kill_at - (time.perf_counter() - t0)))
    replicas = [x["name"] for x in ray.util.list_named_actors(all_namespaces=True)
                if x["namespace"] == "serve" and f"#retriever_{default}#" in x["name"]]
    if not replicas:
        raise SystemExit(f"no live replica of retriever_{default} to kill")
    victim = ray.get_actor(replicas[0], namespace="serve")
    events["kill"] = round(time.perf_counter() - t0, 2)
    ray.kill(victim, no_restart=True)
    print(f"[{events['kill']:6.1f} s] killed {replicas[0]}", flush=True)

    time.sleep(max(0.0, a.redeploy_at - (time.perf_counter() - t0)))
    events["redeploy"] = round(time.perf_counter() - t0, 2)
    print(f"[{events['redeploy']:6.1f} s] redeploying with swapped checkpoints", flush=True)
    serve.run(build_app(app_args(True)), name="aligner", route_prefix="/")
    events["redeployed"] = round(time.perf_counter() - t0, 2)
    print(f"[{events['redeployed']:6.1f} s] redeploy finished", flush=True)

    loader.join(timeout=a.seconds + 90)
    stop.set()
    probe.join(timeout=20)
    voter.join(timeout=180)
    end = round(time.perf_counter() - t0, 2)

    store = VoteStore(f"sqlite:///{tmp / 'serving' / 'votes.db'}")
    stored = store.votes(10_000, 0)  # the store's largest page; a soak records far fewer
    keys = [v.get("idempotency_key") for v in stored]
    acked_keys = [k for k, _ in voter.acked]
    serve.shutdown()
    ray.shutdown()

    lost = sorted(set(acked_keys) - set(keys))
    extra = sorted(set(keys) - set(acked_keys))
    dup = len(keys) - len(set(keys))
    phases = {"before": (0.0, events["kill"]), "kill": (events["kill"], events["redeploy"]),
              "redeploy": (events["redeploy"], end)}
    result = {
        "seconds": a.seconds, "connections": a.connections, "events_s": events,
        "wrk": load,
        "error_rate": round(load.get("errors", 0) / max(1, load.get("requests", 1)), 5),
        "probes": {kind: {ph: recovery(probe.log, kind, lo, hi)
                          for ph, (lo, hi) in phases.items()}
                   for kind in ("text", "embedding")},
        "votes": {"acknowledged": len(acked_keys), "stored": len(keys), "lost": len(lost),
                  "duplicated": dup, "not_acknowledged_but_stored": len(extra),
                  "vote_retries": voter.vote_retries,
                  "compare_failures": voter.compare_failures},
        "probe_log": probe.log}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "probe_log"}, indent=1))
    ok = not lost and not dup
    print(f"\nvotes: {len(acked_keys)} acknowledged, {len(keys)} stored, {len(lost)} lost, "
          f"{dup} duplicated; wrk {load.get('requests')} requests, {load.get('errors')} "
          f"errors; results: {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
