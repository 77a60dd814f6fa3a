"""Rolling the Serve application out and upgrading it in place, for the closed feedback loop
(``jobs.loop``):

* :class:`ServeSettings` - how the application is served (host, port, replicas, surge, CPUs,
  timeouts); its args start from the product's Serve config (:func:`app_args`);
* :func:`deployment_options` and :func:`with_options` - per-deployment options and stable
  deployment versions, so that an upgrade restarts only what changed
  (:func:`code_fingerprint`: the code a replica runs is part of every version);
* :func:`start_serve`, :func:`deploy`, :func:`ensure_serving` - Serve's proxy, ``serve.run``,
  and a deployment only where the wanted model is not served yet (:func:`serving_now`);
  :func:`delete_app`; the raters' API key (:func:`api_key`);
* :func:`upgrade` - the running application redeployed with a new checkpoint and index while
  a client searches without pause, counting the searches that failed.

The rounds' client side (votes, the search probe) is :mod:`aligner.feedback.rounds`; what the
rounds stand on is :mod:`aligner.feedback.prepare`.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aligner.feedback.prepare import Prep, Served

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
MODELS = ("base", "aligned")  # the served models: compare = [base, aligned]
INDEX_NAME = "main"


@dataclass
class ServeSettings:
    """How the loop serves the application (args from ``template``, the product's config)."""

    host: str = field(default="127.0.0.1", metadata={
        "help": "Serve's HTTP host (0.0.0.0: every interface); only used when this job starts "
                "Serve, a running Serve keeps its own"})
    port: int = field(default=8000, metadata={"help": "Serve's HTTP port"})
    app_name: str = field(default="aligner", metadata={"help": "the Serve application's name"})
    api_key_env: str = field(default="ALIGNER_API_KEY", metadata={
        "help": "environment variable holding the API key the raters vote with; unset: a key "
                "is drawn and kept in <workdir>/serving/api_key"})
    template: str = field(default="serving/config.yaml", metadata={
        "help": "Serve config whose first application's args are the starting point "
                "(rephraser, re-ranker, judge, limits); relative: to the repository"})
    replicas: int = field(default=1, metadata={
        "help": "replicas of the ingress and of the aligned model's retriever"})
    max_surge_percent: int = field(default=100, metadata={
        "help": "extra replicas a deployment may start while it is upgraded, as a percentage "
                "of its replicas (Serve's max_surge_percent): with 100 every new replica is "
                "started and ready before an old one stops, so nothing stops answering; 0: "
                "Serve's default, an old replica stops first (one replica: a gap)"})
    ingress_cpus: float = field(default=0.0, metadata={
        "help": "Ray CPUs each ingress replica reserves (0: none, so that the training and "
                "embedding beside the application are never starved on a small machine: their "
                "Ray Data and Ray Train resources are sized from the cluster's CPUs)"})
    retriever_cpus: float = field(default=0.0, metadata={
        "help": "Ray CPUs each retriever replica reserves"})
    other_cpus: float = field(default=0.0, metadata={
        "help": "Ray CPUs each re-ranker, rephraser and judge replica reserves"})
    request_timeout_s: float = field(default=60.0, metadata={
        "help": "limits.request_timeout_s: a search waits this long for a retriever (one being "
                "replaced included) before a 504"})
    votes_database_url_env: str = field(default="", metadata={
        "help": "votes.database_url_env (PostgreSQL on a cluster); '' = SQLite in "
                "<workdir>/serving"})
    deploy_timeout_s: float = field(default=900.0, metadata={
        "help": "how long a deployment or upgrade may take until the new model answers"})
    probe_period_s: float = field(default=0.05, metadata={
        "help": "pause between the upgrade probe's searches"})

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port {self.port} is not a port")
        if self.replicas < 1:
            raise ValueError("serve.replicas must be >= 1")
        if not 0 <= self.max_surge_percent <= 100:
            raise ValueError("serve.max_surge_percent must be in 0..100")
        if min(self.ingress_cpus, self.retriever_cpus, self.other_cpus) < 0:
            raise ValueError("serve.*_cpus must be >= 0")
        if self.request_timeout_s <= 0 or self.deploy_timeout_s <= 0 or self.probe_period_s < 0:
            raise ValueError("serve timeouts must be > 0 and probe_period_s >= 0")

    def reserved_cpus(self) -> float:
        """Ray CPUs the application holds (two retrievers, the aligned one replicated)."""
        return (self.replicas * (self.ingress_cpus + self.retriever_cpus)
                + self.retriever_cpus + 3 * self.other_cpus)


def resolve_template(path: str) -> Path:
    """``serve.template``'s file: as given when it exists (or is absolute), else relative to
    the repository."""
    p = Path(path)
    return p if p.is_absolute() or p.is_file() else REPO / p


def api_key(s: ServeSettings, work: Path) -> str:
    """The key the raters vote with: ``$<serve.api_key_env>``, else one drawn once and kept in
    ``<workdir>/serving/api_key`` (mode 600)."""
    key = os.environ.get(s.api_key_env, "").strip()
    if key:
        return key
    path = work / "serving" / "api_key"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log.info("no $%s: drew an API key, kept in %s", s.api_key_env, path)
    return key


def app_args(s: ServeSettings, prep: Prep, served: Served, key: str) -> dict[str, Any]:
    """The application's args (``serving.config.AppArgs``): the template's, with the world's
    corpus, the base and ``served`` as ``aligned``, the votes under the workdir, the key, and
    limits a panel of raters stays within."""
    tpl = yaml.safe_load(resolve_template(s.template).read_text())
    args = dict((tpl.get("applications") or [{}])[0].get("args") or {})
    args.update({
        "corpus": str(prep.world / "corpus"),
        "models": {"base": {"checkpoint": str(prep.base), "indexes": {INDEX_NAME: str(prep.index)}},
                   "aligned": {"checkpoint": str(served.checkpoint),
                               "indexes": {INDEX_NAME: str(served.index)}}},
        "default_model": "aligned", "compare": list(MODELS),
        "data_dir": str(prep.work / "serving"),
        "judge": {**(args.get("judge") or {}), "model": "base"},
        "auth": {"api_key": key, "api_key_env": s.api_key_env, "protect": "writes"},
    })
    if s.votes_database_url_env:
        args["votes"] = {"database_url_env": s.votes_database_url_env}
    limits = dict(args.get("limits") or {})
    limits.update(rate_per_s=10_000.0, rate_burst=10_000, rate_replicas=1,
                  request_timeout_s=s.request_timeout_s)
    args["limits"] = limits
    return args


def deployment_options(s: ServeSettings) -> dict[str, dict[str, Any]]:
    """Per deployment: replicas, CPUs and the upgrade's surge (what a Serve config's
    ``deployments:`` sets)."""
    def cpus(n: float) -> dict[str, Any]:
        return {"ray_actor_options": {"num_cpus": n}, "max_surge_percent": s.max_surge_percent}

    return {"ingress": {"num_replicas": s.replicas, **cpus(s.ingress_cpus)},
            "retriever_aligned": {"num_replicas": s.replicas, **cpus(s.retriever_cpus)},
            "retriever_base": cpus(s.retriever_cpus), "reranker": cpus(s.other_cpus),
            "rephraser": cpus(s.other_cpus), "judge": cpus(s.other_cpus)}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the code a replica runs (``serving/`` and ``aligner/`` sources, Ray's
    version), taken once per run: part of every deployment's version, so a run on new code
    restarts every replica."""
    import hashlib

    import ray

    h = hashlib.sha256(ray.__version__.encode())
    for folder in ("serving", "aligner"):
        for f in sorted((REPO / folder).rglob("*.py")):
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def with_options(app: Any, options: dict[str, dict[str, Any]], code: str = "") -> Any:
    """The application graph with ``options`` applied to the deployments they name (every
    bound deployment, nested ones included; one shared deployment stays one).

    Each deployment also gets a version made of its arguments (a deployment it is bound to
    counts by name: a handle to it does not change when it does), its options and ``code``.
    Serve gives an application deployed from Python a random version per ``serve.run``, which
    restarts every replica; with these, an upgrade restarts only the deployments whose
    arguments changed (the aligned model's retriever and the ingress), and the base's
    retriever, the re-ranker, the rephraser and the judge keep running.
    """
    import hashlib
    import json

    from ray.serve import Application

    memo: dict[int, Any] = {}

    def plain(x: Any) -> Any:
        if isinstance(x, Application):
            return {"deployment": x._bound_deployment.name}  # noqa: SLF001
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    def walk(x: Any) -> Any:
        if isinstance(x, Application):
            if id(x) not in memo:
                d = x._bound_deployment  # noqa: SLF001 - the graph is only reachable here
                args = tuple(walk(a) for a in d.init_args)
                kwargs = {k: walk(v) for k, v in d.init_kwargs.items()}
                opts = options.get(d.name, {})
                new = d.options(**opts).bind(*args, **kwargs)
                ident = json.dumps([d.name, plain(d.init_args), plain(d.init_kwargs), opts, code],
                                   sort_keys=True, default=lambda o: f"{type(o).__name__}:{o!r}")
                new._bound_deployment._version = hashlib.sha256(  # noqa: SLF001
                    ident.encode()).hexdigest()[:16]
                memo[id(x)] = new
            return memo[id(x)]
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    return walk(app)


def start_serve(s: ServeSettings) -> str:
    """Start Serve's HTTP proxy (a running Serve keeps its own options); the URL to call."""
    from ray import serve
    from ray.serve.config import HTTPOptions

    serve.start(http_options=HTTPOptions(host=s.host, port=s.port),
                logging_config={"enable_access_log": False, "log_level": "WARNING"})
    host = "127.0.0.1" if s.host in ("0.0.0.0", "", "::") else s.host
    return f"http://{host}:{s.port}"


def delete_app(s: ServeSettings) -> None:
    """``serve.delete`` the application, if one is deployed."""
    from ray import serve

    try:
        serve.delete(s.app_name)
    except Exception as e:  # noqa: BLE001 - nothing deployed
        log.info("no application to delete (%s)", e)


def deploy(args: dict[str, Any], s: ServeSettings) -> float:
    """``serve.run`` the application (a new one, or the running one upgraded in place: Serve
    replaces every deployment's replicas, a new one ready before an old one stops when
    ``serve.max_surge_percent`` > 0); returns the seconds."""
    from ray import serve

    from serving.app import build_app

    t = time.time()
    serve.run(with_options(build_app(args), deployment_options(s), code_fingerprint()),
              name=s.app_name, route_prefix="/")
    return time.time() - t


def serving_now(client: Any) -> dict[str, str]:
    """The checkpoint each model is served with now (``GET /v1/indexes``; {} when nothing
    answers)."""
    a = client.call("GET", "/v1/indexes", timeout_s=30)
    if not a.ok or not isinstance(a.body, dict):
        return {}
    return {n: str((m.get("model") or {}).get("checkpoint") or "")
            for n, m in (a.body.get("models") or {}).items()}


def serves(client: Any, prep: Prep, served: Served) -> bool:
    now = serving_now(client)
    want = {"base": prep.base, "aligned": served.checkpoint}
    return all(n in now and Path(now[n]).resolve() == Path(p).resolve() for n, p in want.items())


def ensure_serving(s: ServeSettings, prep: Prep, client: Any, served: Served,
                   key: str) -> dict[str, Any]:
    """Deploy the application with ``served`` unless it already serves it."""
    from aligner.feedback.rounds import wait_for

    if serves(client, prep, served):
        return {"deployed": False, "aligned": str(served.checkpoint)}
    log.info("deploying the application: aligned = %s", served.checkpoint)
    run_s = deploy(app_args(s, prep, served, key), s)
    waited = wait_for(lambda: serves(client, prep, served), s.deploy_timeout_s, 0.5,
                      "the deployed application answering")
    return {"deployed": True, "aligned": str(served.checkpoint),
            "seconds": round(run_s + waited, 1)}


def upgrade(s: ServeSettings, prep: Prep, client: Any, new: Served, key: str, texts: list[str],
            out: Path, *, k: int) -> dict[str, Any]:
    """Redeploy the running application in place with ``new`` while a client searches without
    pause; the searches overlapping the upgrade (from ``serve.run`` until the new model
    answers ``/v1/indexes`` three times running) and how many failed. Written to ``out``;
    the probe asks for ``k`` results."""
    from aligner.feedback.rounds import SearchProbe, wait_for
    from aligner.runtime.manifest import write_manifest

    started = time.time()
    probe = SearchProbe(client, texts, k=k, period_s=s.probe_period_s)
    probe.start()
    try:
        wait_for(lambda: probe.answered() >= 3, 120, 0.1, "three searches before the upgrade")
        t0 = time.time()
        run_s = deploy(app_args(s, prep, new, key), s)
        streak = [0]

        def answers_new() -> bool:
            streak[0] = streak[0] + 1 if serves(client, prep, new) else 0
            return streak[0] >= 3

        wait_for(answers_new, s.deploy_timeout_s, 0.2, "the upgraded model answering")
        t1 = time.time()
        time.sleep(1.0)  # a tail: searches sent right after the switch count too
    finally:
        probe.stop()
    during = probe.window(t0, t1)
    result = {**during, "seconds_serve_run": round(run_s, 1),
              "seconds_until_new_version": round(t1 - t0, 1),
              "probe": {"requests": len(probe.requests),
                        "failed": sum(st != 200 for _, _, st, _ in probe.requests),
                        "before_upgrade": probe.window(0, t0)["requests"]},
              "checkpoint": str(new.checkpoint), "index": str(new.index)}
    write_manifest(out, "loop_upgrade", {"replicas": s.replicas}, started, **result)
    log.info("upgrade: %d of %d searches during the upgrade failed; the new model answered "
             "after %.1f s", during["failed"], during["requests"], t1 - t0)
    return result
