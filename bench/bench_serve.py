"""Search through Serve over HTTP vs the same search in-process: latency and throughput.

    python bench/bench_serve.py --workdir out          # after python -m jobs.quickstart
    python bench/bench_serve.py --workdir out --seconds 20 --concurrency 1,8,32
    python bench/serve_world.py --out /tmp/sw && python bench/bench_serve.py --workdir /tmp/sw

``--workdir`` is a quickstart output directory (``base`` and ``aligned`` models, HNSW indexes)
or a directory built by ``bench/serve_world.py`` (its ``serve_world.json`` names the models).

Deploys ``serving.app:build_app`` on a local Ray (Serve's proxy on 127.0.0.1) over the
quickstart's models and indexes, then sends ``POST /v1/search`` requests (the world's queries,
in turn) from C client threads, each with its own keep-alive connection, for ``--seconds``
per setting: plain search, + rerank, + rephrase (template back end), and Serve's floor (an
echo deployment behind the same proxy: the cost of any Serve request). Prints p50 / p99
latency, throughput and errors per setting, and the in-process reference (the library's
:class:`aligner.retrieval.service.SearchService`: encode + search of one query, torch and
faiss on one thread as in a retriever replica (Ray sets ``OMP_NUM_THREADS=1`` for its 0.25
CPU; on a loaded machine two OpenMP threads wait on each other and run many times slower),
timed before Ray starts and again after it stops; the quieter run, by p50, is the reference
on a shared machine, and both are kept), with the overhead ratio p50(HTTP, C=1) / p50(in-process) and the search's ratios to the
floor. Writes ``bench/serve_results.json`` (``--out``). Ray is a new local one (never a
cluster already running on the machine).
Ratios, not absolute times, are what carries over to another machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load(port: int, queries: list[str], conc: int, seconds: float, extra: dict,
         path: str = "/v1/search") -> dict:
    """C threads, each on its own keep-alive connection, for ``seconds``."""
    lat: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(w: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = w
        mine: list[float] = []
        while time.perf_counter() < stop:
            body = json.dumps({"text": queries[i % len(queries)], "k": 10, **extra})
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(1000 * (time.perf_counter() - t0))
            if not ok:
                with lock:
                    errors[0] += 1
            i += conc
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conc)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": conc, "requests": len(lat), "errors": errors[0],
            "p50_ms": round(pct(lat, 0.5), 2), "p99_ms": round(pct(lat, 0.99), 2),
            "per_s": round(len(lat) / wall, 1)}


def in_process(svc, queries: list[str], seconds: float) -> dict:  # noqa: ANN001 - a SearchService
    """Encode + search of one query at a time, torch and faiss on one thread, for
    ``seconds``."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    ref: list[float] = []
    stop = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        svc.search(svc.encode_texts([queries[i % len(queries)]])[0], 10)
        ref.append(1000 * (time.perf_counter() - t0))
        i += 1
    return {"requests": len(ref), "p50_ms": round(pct(ref, 0.5), 2),
            "p99_ms": round(pct(ref, 0.99), 2), "per_s": round(len(ref) / seconds, 1)}


def _echo_deployment():
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=128)
    class Echo:
        """Reads the JSON body and answers a fixed JSON: what any Serve request costs."""

        async def __call__(self, request):  # noqa: ANN001 - a starlette Request
            body = await request.json()
            return {"ok": True, "text": body.get("text")}

    return Echo


def served_models(work: Path) -> dict:
    """What to serve from ``work``: corpus, queries file, models (name -> checkpoint, index),
    the default (the in-process reference) and the pair compared.

    Raises:
        FileNotFoundError: ``work`` is neither a quickstart output nor a serve world.
    """
    spec_file = work / "serve_world.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text())
        names = list(spec["models"])
        return {"corpus": spec["corpus"], "queries": spec["queries"], "models": spec["models"],
                "default": spec["default"], "compare": names[:2]}
    models = {"base": {"checkpoint": str(work / "base" / "checkpoint"),
                       "index": str(work / "index")},
              "aligned": {"checkpoint": str(work / "aligned" / "checkpoint"),
                          "index": str(work / "index_aligned")}}
    missing = [m["index"] for m in models.values() if not Path(m["index"]).is_dir()]
    if missing:
        raise FileNotFoundError(f"{work} is neither a quickstart output (missing {missing}) nor "
                                "a serve world (no serve_world.json): run python -m "
                                "jobs.quickstart or bench/serve_world.py first")
    return {"corpus": str(work / "world" / "corpus"),
            "queries": str(work / "world" / "queries" / "queries.parquet"), "models": models,
            "default": "aligned", "compare": ["base", "aligned"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out",
                   help="a quickstart output directory or a bench/serve_world.py directory")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--out", default=str(REPO / "bench" / "serve_results.json"))
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    world = served_models(work)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "ALIGNER_API_KEY": "bench"}
    os.environ.update(env)
    import ray
    from ray import serve

    from aligner.data.queries import read_queries
    from aligner.retrieval.models import ModelSpec
    from aligner.retrieval.service import SearchService
    from serving.app import build_app

    Echo = _echo_deployment()  # noqa: N806 - a deployment class

    queries = read_queries(world["queries"])["query"].to_pylist()
    # the in-process reference: encode + search, one query at a time
    ref_model = world["models"][world["default"]]
    svc = SearchService.open(ModelSpec(checkpoint=ref_model["checkpoint"]),
                             {"hnsw": ref_model["index"]})
    for q in queries[:20]:
        svc.search(svc.encode_texts([q])[0], 10)
    in_runs = [in_process(svc, queries, a.seconds)]  # again after the HTTP runs (below)

    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **env}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    args = {"corpus": world["corpus"], "data_dir": str(work / "serving"),
            "models": {name: {"checkpoint": m["checkpoint"], "indexes": {"hnsw": m["index"]}}
                       for name, m in world["models"].items()},
            "default_model": world["default"], "compare": world["compare"],
            "judge": {"model": world["default"]},
            "log_requests": False,
            "limits": {"rate_per_s": 1e6, "rate_burst": 1_000_000}}
    serve.run(build_app(args), name="aligner", route_prefix="/")
    # The floor: Serve's own HTTP path to a replica that only parses the body and answers
    # (no FastAPI, no model), through the same proxy, measured in the same run.
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    load(port, queries, 8, 3.0, {})  # warm every replica
    load(port, queries, 8, 2.0, {}, path="/echo")
    rows = []
    for conc in [int(c) for c in a.concurrency.split(",")]:
        r = {"setting": "serve floor", **load(port, queries, conc, a.seconds, {}, path="/echo")}
        rows.append(r)
        print(json.dumps(r), flush=True)
    for name, extra in (("search", {}), ("+ rerank", {"rerank": True}),
                        ("+ rephrase", {"rephrase": True})):
        for conc in [int(c) for c in a.concurrency.split(",")]:
            if name != "search" and conc not in (1, 32):
                continue
            r = {"setting": name, **load(port, queries, conc, a.seconds, extra)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    serve.shutdown()
    ray.shutdown()
    in_runs.append(in_process(svc, queries, a.seconds))
    # the machine is shared: the quieter of the two runs (before and after) is the reference
    inproc = min(in_runs, key=lambda r: r["p50_ms"])
    c1 = next(r for r in rows if r["setting"] == "search" and r["concurrency"] == 1)
    f1 = next(r for r in rows if r["setting"] == "serve floor" and r["concurrency"] == 1)
    top = max(int(c) for c in a.concurrency.split(","))
    ftop = next(r for r in rows if r["setting"] == "serve floor" and r["concurrency"] == top)
    stop_ = next(r for r in rows if r["setting"] == "search" and r["concurrency"] == top)
    result = {"machine": {"cpus": os.cpu_count()}, "seconds_per_setting": a.seconds,
              "served": {"workdir": str(work), "models": sorted(world["models"]),
                         "reference": world["default"]},
              "in_process": inproc, "in_process_runs": in_runs, "http": rows,
              "overhead_p50_ratio": round(c1["p50_ms"] / inproc["p50_ms"], 2),
              "floor_p50_ratio": round(c1["p50_ms"] / f1["p50_ms"], 2),
              "floor_throughput_ratio": round(stop_["per_s"] / ftop["per_s"], 2)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'setting':<12} {'C':>3} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}")
    print(f"{'in-process':<12} {1:>3} {inproc['p50_ms']:>8} {inproc['p99_ms']:>8} "
          f"{inproc['per_s']:>8} {0:>6}")
    for r in rows:
        print(f"{r['setting']:<12} {r['concurrency']:>3} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['per_s']:>8} {r['errors']:>6}")
    print(f"\nHTTP overhead (p50, C=1 vs in-process): {result['overhead_p50_ratio']}x; "
          f"search vs Serve's floor: p50 {result['floor_p50_ratio']}x at C=1, throughput "
          f"{result['floor_throughput_ratio']}x at C={top}; results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
