"""Search through Serve over HTTP, measured with wrk beside Serve's floor, per speed lever.

    python bench/bench_serve.py --workdir out          # after python -m jobs.quickstart
    python bench/bench_serve.py --workdir /tmp/sw --seconds 10 --concurrency 1,8,32
    python bench/serve_world.py --out /tmp/sw && python bench/bench_serve.py --workdir /tmp/sw
    python bench/bench_serve.py --workdir /tmp/sw --variants before,after

``--workdir`` is a quickstart output directory (``base`` and ``aligned`` models, HNSW indexes)
or a directory built by ``bench/serve_world.py`` (its ``serve_world.json`` names the models).

Each *variant* (a lever, see ``VARIANTS``) runs in its own process on a new local Ray (Serve's
proxy on 127.0.0.1, never a cluster already running): it deploys ``serving.app:build_app``
over the models and indexes with the variant's settings and Serve's floor (an echo
deployment behind the same proxy: what any Serve request costs) in the same Serve instance,
then drives ``POST /v1/search`` (k 10, the default model) and the floor with **wrk**
(Debian's ``wrk``, ``bench/wrk_post.lua``) at each concurrency (connections) for
``--seconds``, after a warm-up. The rate limit is raised for the benchmark. Query logs:

* ``cycle``: the world's queries in turn (what the README's table uses; with the query cache
  on, every request after the first pass is a hit, so the ``after`` row is measured with the
  cache off and the cache has rows of its own);
* ``unique``: every request a text never sent before (the world's queries with a number
  appended): all cache misses;
* ``zipf``: a heavy-tailed log (Zipf, s 1.1, over 20,000 distinct texts): the cache's hit
  rate (read from the retriever replica) and the mixed latency.

The in-process reference (:class:`aligner.retrieval.service.SearchService`: encode + search
of one query, torch and faiss on one thread as in a retriever replica) is timed before the
variants and again after them; the quieter run is the reference. Writes
``bench/serve_results.json`` (``--out``) with every row and each variant's ratios to its own
floor (search p50 at 1 connection / floor p50; search req/s at the most connections / the
floor's). Ratios, not absolute times, carry over to another machine.
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



#: speed settings as they were before the levers (serving.config.SpeedArgs)
BEFORE = {"text_cache": 0, "batch_wait_ms": 5.0, "retriever_cpus": 0.25, "torch_threads": 1}
#: variant -> (environment of the Ray cluster, speed settings over the defaults, query logs)
VARIANTS: dict[str, tuple[dict[str, str], dict, tuple[str, ...]]] = {
    "before": ({}, BEFORE, ("cycle",)),
    "haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, BEFORE, ("cycle",)),
    "throughput-optimized": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, BEFORE, ("cycle",)),
    "no batch wait": ({}, {**BEFORE, "batch_wait_ms": 0.0}, ("cycle",)),
    # whole CPUs (retriever_cpus 1) for both retrievers cannot be scheduled beside the other
    # deployments on 2 cores; what a whole CPU buys a replica is threads:
    "2 torch threads": ({}, {**BEFORE, "batch_wait_ms": 0.0, "torch_threads": 2}, ("cycle",)),
    "one hop": ({}, {**BEFORE, "batch_wait_ms": 0.0, "local_text_search": True}, ("cycle",)),
    "after": ({}, {"text_cache": 0}, ("cycle",)),  # the defaults, every query encoded
    "after + query cache": ({}, {}, ("unique", "zipf", "cycle")),  # the defaults
    "after + haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {"text_cache": 0}, ("cycle",)),
}


def query_logs(queries: list[str], n: int = 20_000, distinct: int = 20_000,
               seed: int = 0) -> dict[str, list[str]]:
    """The request texts of each log (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts = [f"{queries[i % len(queries)]} {i // len(queries)}" for i in range(distinct)]
    order = rng.permutation(distinct)
    ranks = np.arange(1, distinct + 1, dtype=np.float64)
    p = ranks ** -1.1
    zipf = rng.choice(distinct, size=n, p=p / p.sum())
    unique = [f"{queries[i % len(queries)]} {distinct + i}" for i in range(n)]
    return {"cycle": list(queries), "unique": unique,
            "zipf": [texts[order[j]] for j in zipf]}


def lru_hit_rate(log: list[str], capacity: int) -> float:
    """The hit rate of an LRU of ``capacity`` texts over ``log`` (from empty)."""
    from collections import OrderedDict

    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for t in log:
        if t in cache:
            hits += 1
            cache.move_to_end(t)
        else:
            cache[t] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / max(1, len(log))


def wrk(port: int, path: str, bodies: Path, conns: int, seconds: float) -> dict:
    """One wrk run (``bench/wrk_post.lua``): its JSON line."""
    import shutil
    import subprocess

    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (Debian's package)")
    cmd = [exe, f"-t{min(2, conns)}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(REPO / "bench" / "wrk_post.lua"), f"http://127.0.0.1:{port}{path}",
           "--", str(bodies)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def write_bodies(path: Path, texts: list[str], extra: dict) -> Path:
    path.write_text("".join(json.dumps({"text": t, "k": 10, **extra}) + "\n" for t in texts))
    return path


def run_variant(name: str, work: Path, conc: list[int], seconds: float, tmp: Path) -> dict:
    """Deploy with variant ``name`` on a new local Ray and measure it (see the docstring)."""
    env_over, speed, logs = VARIANTS[name]
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "ALIGNER_API_KEY": "bench", **env_over}
    os.environ.update(env)
    import ray
    from ray import serve

    from aligner.data.queries import read_queries
    from serving.app import build_app

    world = served_models(work)
    queries = read_queries(world["queries"])["query"].to_pylist()
    texts = query_logs(queries)
    Echo = _echo_deployment()  # noqa: N806 - a deployment class
    ray.init(address="local", include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO), **env}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    args = {"corpus": world["corpus"], "data_dir": str(tmp / "serving"),
            "models": {n: {"checkpoint": m["checkpoint"], "indexes": {"hnsw": m["index"]}}
                       for n, m in world["models"].items()},
            "default_model": world["default"], "compare": world["compare"],
            "judge": {"model": world["default"]}, "log_requests": False,
            "limits": {"rate_per_s": 1e6, "rate_burst": 1_000_000}, "speed": speed}
    serve.run(build_app(args), name="aligner", route_prefix="/")
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    floor_bodies = write_bodies(tmp / "floor.jsonl", queries, {})
    bodies = {log: write_bodies(tmp / f"{log}.jsonl", texts[log], {}) for log in logs}
    warm = write_bodies(tmp / "warm.jsonl", [f"{q} warm-up" for q in queries], {})
    wrk(port, "/v1/search", warm, 8, 3.0)  # warm every replica (texts no log sends)
    wrk(port, "/echo", floor_bodies, 8, 2.0)
    rows = []
    for c in conc:
        rows.append({"variant": name, "setting": "serve floor", "log": "cycle",
                     "concurrency": c, **wrk(port, "/echo", floor_bodies, c, seconds)})
        print(json.dumps(rows[-1]), flush=True)
    retr = serve.get_deployment_handle(f"retriever_{world['default']}", "aligner")
    ingress = serve.get_deployment_handle("ingress", "aligner")

    def cache_stats() -> dict:
        """Hits and misses of the searched model's query caches (retriever + ingress); none
        where the driver cannot call a handle (Serve's throughput-optimised mode)."""
        try:
            out = dict(retr.describe.remote().result()["query_cache"])
            local = ingress.query_cache_stats.remote().result().get(world["default"])
        except RuntimeError:
            return {"hits": 0, "misses": 0, "capacity": 0}
        if local:
            out = {k: out[k] + local[k] for k in ("hits", "misses", "capacity")}
        return out

    for log in logs:
        for c in conc:
            if log == "unique":  # texts no earlier run sent: every request a miss
                bodies[log] = write_bodies(tmp / f"unique{c}.jsonl",
                                           [f"{t} c{c}" for t in texts[log]], {})
            before = cache_stats()
            r = wrk(port, "/v1/search", bodies[log], c, seconds)
            after = cache_stats()
            n = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
            rows.append({"variant": name, "setting": "search", "log": log, "concurrency": c,
                         **r, "cache_hit_rate": round((after["hits"] - before["hits"]) / n, 4)
                         if n and after["capacity"] else None})
            print(json.dumps(rows[-1]), flush=True)
    serve.shutdown()
    ray.shutdown()
    return {"variant": name, "env": env_over, "speed": speed, "rows": rows}


def ratios(v: dict) -> dict:
    """Search vs the same run's floor: p50 at the fewest connections, throughput at the
    most, p99 at 8 connections (the cycling log)."""
    rows = [r for r in v["rows"] if r["log"] == "cycle"]
    conc = sorted({r["concurrency"] for r in rows})
    get = {(r["setting"], r["concurrency"]): r for r in rows}
    lo, hi = conc[0], conc[-1]
    out = {f"p50_ms_c{lo}": get[("search", lo)]["p50_ms"],
           f"floor_p50_ms_c{lo}": get[("serve floor", lo)]["p50_ms"],
           "floor_p50_ratio": round(get[("search", lo)]["p50_ms"]
                                    / get[("serve floor", lo)]["p50_ms"], 2),
           f"per_s_c{hi}": get[("search", hi)]["per_s"],
           f"floor_per_s_c{hi}": get[("serve floor", hi)]["per_s"],
           "floor_throughput_ratio": round(get[("search", hi)]["per_s"]
                                           / get[("serve floor", hi)]["per_s"], 2)}
    if ("search", 8) in get:
        out["p99_ms_c8"] = get[("search", 8)]["p99_ms"]
    return out


def reference(world: dict, seconds: float) -> dict:
    """The in-process reference (encode + search of one query on one thread)."""
    from aligner.data.queries import read_queries
    from aligner.retrieval.models import ModelSpec
    from aligner.retrieval.service import SearchService

    queries = read_queries(world["queries"])["query"].to_pylist()
    ref_model = world["models"][world["default"]]
    svc = SearchService.open(ModelSpec(checkpoint=ref_model["checkpoint"]),
                             {"hnsw": ref_model["index"]})
    for q in queries[:20]:
        svc.search(svc.encode_texts([q])[0], 10)
    return in_process(svc, queries, seconds)


def main(argv: list[str] | None = None) -> int:
    import subprocess
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="out",
                   help="a quickstart output directory or a bench/serve_world.py directory")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "bench" / "serve_results.json"))
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # a variant, in a child
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    world = served_models(work)
    conc = [int(c) for c in a.concurrency.split(",")]
    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            v = run_variant(a.one, work, conc, a.seconds, Path(tmp))
        Path(a.out).write_text(json.dumps(v))
        return 0
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    in_runs = [reference(world, a.seconds)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = Path(tmp) / "variant.json"
            print(f"== {name}", flush=True)
            done = subprocess.run([sys.executable, __file__, "--workdir", str(work),
                                   "--seconds", str(a.seconds), "--concurrency", a.concurrency,
                                   "--one", name, "--out", str(out)])
            if done.returncode or not out.is_file():
                print(f"== {name}: failed (exit {done.returncode}); see above", flush=True)
                results.append({"variant": name, "failed": done.returncode, "rows": []})
                continue
            v = json.loads(out.read_text())
            out.unlink()
            v["ratios"] = ratios(v)
            results.append(v)
    in_runs.append(reference(world, a.seconds))
    inproc = min(in_runs, key=lambda r: r["p50_ms"])
    from aligner.data.queries import read_queries

    logs = query_logs(read_queries(world["queries"])["query"].to_pylist())
    sim = {str(c): round(lru_hit_rate(logs["zipf"], c), 4) for c in (256, 1024, 4096, 16384)}
    result = {"machine": {"cpus": os.cpu_count()}, "client": "wrk", "seconds": a.seconds,
              "served": {"workdir": str(work), "models": sorted(world["models"]),
                         "searched": world["default"]},
              "in_process": inproc, "in_process_runs": in_runs, "variants": results,
              "zipf_lru_hit_rate_by_capacity": sim}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"\nin-process encode + search: p50 {inproc['p50_ms']} ms, p99 {inproc['p99_ms']} ms")
    print(f"\n{'variant':<22} {'setting':<12} {'log':<7} {'C':>3} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/s':>8} {'errors':>6} {'hits':>6}")
    for v in results:
        for r in v["rows"]:
            hit = "" if r.get("cache_hit_rate") is None else f"{r['cache_hit_rate']:.2f}"
            print(f"{v['variant']:<22} {r['setting']:<12} {r['log']:<7} {r['concurrency']:>3} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['per_s']:>8.1f} "
                  f"{r['errors']:>6} {hit:>6}")
    print()
    for v in results:
        print(f"{v['variant']:<22} {json.dumps(v.get('ratios', 'failed'))}")
    print(f"\nLRU hit rate on the zipf log by capacity: {sim}; results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
