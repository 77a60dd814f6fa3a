"""The KubeRay manifests in k8s/: current, shaped as the KubeRay v1 CRDs require, runnable.

Required fields follow the KubeRay v1 API types (``ray-operator/apis/ray/v1``): a
``RayClusterSpec`` needs ``headGroupSpec`` (``rayStartParams``: a map of strings, ``template``:
a pod template); each ``WorkerGroupSpec`` needs ``groupName``, ``minReplicas``,
``maxReplicas``, ``rayStartParams`` and ``template``; a ``RayJob`` needs an ``entrypoint``
(unless ``submissionMode: InteractiveMode``) and a ``rayClusterSpec`` (or a
``clusterSelector``); a ``RayService`` a ``serveConfigV2`` string and a ``rayClusterConfig``.
The Kubernetes pod rules used: every container has a name and an image, every volume mount
names a volume of its pod, resource quantities are strings. No API server runs here, so the
CRDs' OpenAPI schemas themselves are not applied (``kubectl apply --dry-run=server`` does that
against a cluster with KubeRay installed).

The Serve part is checked with Ray Serve's own ``ServeDeploySchema`` and against
``serving/config.yaml`` (equal but for ``k8s.render.SERVE_OVERRIDES``); each RayJob's
entrypoint is parsed by its job's own config loader.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _render_module():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _render_module()
MANIFESTS = sorted(K8S.glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_every_manifest_is_current_and_generated():
    assert {p.name for p in MANIFESTS} == set(render.manifests())
    assert render.main(["--check"]) == 0, "run python k8s/render.py"
    kinds = sorted(load(p)["kind"] for p in MANIFESTS)
    assert kinds.count("RayService") == 1 and kinds.count("RayJob") >= 1


def lock_pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        if m:
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_the_image_installs_one_lock_and_the_gpu_image_the_gpu_lock():
    """k8s/Dockerfile: LOCK picks requirements.txt (default) or requirements-gpu.txt (the GPU
    image the GPU groups run, as cluster.yaml's gpu_worker); never a pyproject extra."""
    text = (K8S / "Dockerfile").read_text()
    assert "ARG LOCK=requirements.txt" in text.splitlines()
    assert 'pip install --no-cache-dir -r "${LOCK}"' in text
    assert "pip install --no-cache-dir --no-deps ." in text and ".[" not in text
    # the documented build of each image the manifests name (comment lines joined)
    header = text.replace("\\\n#", " ")
    builds = {m[1]: m[0] for m in re.finditer(r"docker build .*-t (\S+) \.", header)}
    assert set(builds) == {render.IMAGE, render.GPU_IMAGE}, builds
    assert "LOCK" not in builds[render.IMAGE]
    gpu = builds[render.GPU_IMAGE]
    assert "--build-arg LOCK=requirements-gpu.txt" in gpu and "-py311-gpu" in gpu
    # the base image's Ray is the Ray of both locks (one Ray version across the cluster)
    ray = re.search(r"^ARG BASE=rayproject/ray:(\d+\.\d+\.\d+)-py311$", text, re.M)[1]
    assert lock_pins("requirements.txt")["ray"] == lock_pins("requirements-gpu.txt")["ray"] == ray
    # the build fails unless exactly one faiss distribution is installed
    assert "('faiss-cpu', 'faiss-gpu')" in text and "assert len(f) == 1" in text


# ----------------------------------------------------------------------------- CRD shape


def check_pod_template(t: dict[str, Any], where: str, gpus: bool) -> None:
    spec = t["spec"]
    volumes = {v["name"] for v in spec.get("volumes", [])}
    assert spec["containers"], f"{where}: no containers"
    for c in spec["containers"]:
        assert c["name"] and c["image"], f"{where}: a container needs a name and an image"
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: mount of unknown volume {m['name']}"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for k, v in res.get(part, {}).items():
                assert isinstance(v, str), f"{where}: {part}.{k} must be a quantity string"
        has_gpu = "nvidia.com/gpu" in res.get("limits", {})
        assert has_gpu == gpus, f"{where}: GPU limit {has_gpu}, expected {gpus}"


def check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The fields KubeRay's RayClusterSpec requires, and what its controller validates."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), f"{where}: rayVersion"
    # Ray token auth on every cluster (KubeRay >= 1.5.1 AuthOptions; needs Ray >= 2.52)
    assert spec["authOptions"]["mode"] == "token", f"{where}: the cluster runs without auth"
    assert set(spec["authOptions"]) <= {"mode", "secretName", "enableK8sTokenAuth"}, where
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0), \
        f"{where}: token auth needs Ray >= 2.52"
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        f"{where}: rayStartParams values must be strings"
    check_pod_template(head["template"], f"{where}.head", gpus=False)
    names = []
    for g in spec.get("workerGroupSpecs", []):
        w = f"{where}.{g['groupName']}"
        assert DNS_LABEL.match(g["groupName"]), w
        names.append(g["groupName"])
        lo, hi = g["minReplicas"], g["maxReplicas"]
        assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi, w
        assert lo <= g.get("replicas", lo) <= hi, f"{w}: replicas outside [min, max]"
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), w
        check_pod_template(g["template"], w, gpus=g["groupName"] == "gpu")
    assert len(names) == len(set(names)), f"{where}: duplicate group names"
    opts = spec.get("autoscalerOptions", {})
    assert opts.get("upscalingMode", "Default") in ("Default", "Aggressive", "Conservative")
    if any(g["minReplicas"] != g["maxReplicas"] for g in spec.get("workerGroupSpecs", [])):
        assert spec["enableInTreeAutoscaling"] is True, f"{where}: groups that scale need it"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_has_the_fields_kuberay_v1_requires(path):
    m = load(path)
    assert m["apiVersion"] == "ray.io/v1"
    assert m["kind"] in ("RayJob", "RayService")
    assert DNS_LABEL.match(m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63
    spec = m["spec"]
    if m["kind"] == "RayJob":
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
        assert spec["entrypoint"].strip()
        assert "clusterSelector" not in spec
        check_cluster_spec(spec["rayClusterSpec"], path.name)
        if spec.get("shutdownAfterJobFinishes"):
            assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    else:
        assert isinstance(spec["serveConfigV2"], str)
        check_cluster_spec(spec["rayClusterConfig"], path.name)
        assert "rayClusterSpec" not in spec  # RayService calls it rayClusterConfig


def test_the_shape_check_rejects_what_kuberay_rejects():
    spec = load(K8S / "rayjob-embed.yaml")["spec"]["rayClusterSpec"]
    for breaks in (lambda s: s["workerGroupSpecs"][0].pop("maxReplicas"),
                   lambda s: s["headGroupSpec"].pop("rayStartParams"),
                   lambda s: s.pop("authOptions"),
                   lambda s: s.update({"authOptions": {"mode": "disabled"}}),
                   lambda s: s.update({"rayVersion": "2.51.0"}),
                   lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                   lambda s: s["workerGroupSpecs"][0].update({"minReplicas": 13}),
                   lambda s: s["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
                   ["resources"]["limits"].pop("nvidia.com/gpu")):
        broken = yaml.safe_load(yaml.safe_dump(spec))
        breaks(broken)
        with pytest.raises((AssertionError, KeyError)):
            check_cluster_spec(broken, "broken")


# ----------------------------------------------------------------------------- RayJobs


def parse_entrypoint(entrypoint: str):
    """Parse a ``python -m jobs.<name> [--config FILE] key=value ...`` entrypoint with the
    job's own config loader; paths under the image's repository map to this checkout."""
    from aligner.runtime.config import load_config
    from jobs.__main__ import JOBS

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."), entrypoint
    job = argv[2].removeprefix("jobs.")
    rest = [a.replace(render.APP_DIR, str(REPO)) for a in argv[3:]]
    if "--config" in rest:
        assert Path(rest[rest.index("--config") + 1]).is_file()
    mod = importlib.import_module(f"jobs.{job}")
    return job, load_config(getattr(mod, JOBS[job]), rest, getattr(mod, "DEFAULT_YAML", None))


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob")],
                         ids=lambda p: p.name)
def test_rayjob_entrypoints_parse_as_their_jobs_configs(path):
    spec = load(path)["spec"]
    job, cfg = parse_entrypoint(spec["entrypoint"])
    outputs = [v for k, v in vars(cfg).items()
               if k in ("output", "workdir") and isinstance(v, str)]
    assert outputs and all(o.startswith(render.SHARED) for o in outputs), \
        f"{path.name}: outputs must go to the shared volume, got {outputs}"
    groups = {g["groupName"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    if getattr(cfg, "use_gpu", False) or job == "embed":
        assert "gpu" in groups, f"{path.name}: {job} needs the GPU group"
    if getattr(cfg, "parallel", False):
        cpus = next(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                    for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "cpu")
        assert cfg.cpus_per_task <= cpus, f"{path.name}: a shard task cannot fit a pod"


def test_an_entrypoint_with_a_misspelt_field_fails_to_parse():
    from aligner.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="shard"):
        parse_entrypoint("python -m jobs.build_index embeddings=/x output=/mnt/shared/i shard=3")


# ----------------------------------------------------------------------------- RayService


def serve_v2() -> dict[str, Any]:
    return yaml.safe_load(load(K8S / "rayservice.yaml")["spec"]["serveConfigV2"])


def diff_paths(a: Any, b: Any, path: tuple = ()) -> set[tuple]:
    """Key paths where two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[tuple] = set()
        for k in set(a) | set(b):
            out |= diff_paths(a.get(k), b.get(k), path + (k,)) if k in a and k in b else {
                path + (k,)}
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(*(diff_paths(x, y, path + (i,)) for i, (x, y) in
                             enumerate(zip(a, b, strict=True)))) if a else set()
    return set() if a == b else {path}


def test_serve_config_v2_is_serving_config_yaml_but_for_the_listed_overrides():
    v2 = serve_v2()
    original = load(REPO / "serving" / "config.yaml")
    assert v2 == render.serve_config()
    assert diff_paths(v2, original) == {path for path, _, _ in render.SERVE_OVERRIDES}
    assert v2["http_options"]["host"] == "0.0.0.0"
    assert diff_paths({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == {("a", 1, "b")}


def test_the_rayservice_keeps_votes_in_postgresql_named_by_a_secret(monkeypatch):
    """On the cluster the votes go to PostgreSQL (its URL from a Secret, in every Ray
    container), not to SQLite on the shared volume; serving/config.yaml keeps SQLite."""
    from serving.config import AppArgs
    from serving.votes import votes_url

    args = serve_v2()["applications"][0]["args"]
    name = args["votes"]["database_url_env"]
    assert name == render.VOTES_DB_URL_ENV and not args["votes"].get("database_url")
    cluster = load(K8S / "rayservice.yaml")["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": render.VOTES_DB_SECRET, "key": "url"}  # required
    monkeypatch.setenv(name, "postgresql://votes:pw@postgres.db.svc:5432/votes")
    url = AppArgs(**args).database_url()
    assert votes_url(url).drivername == "postgresql+psycopg"
    monkeypatch.delenv(name)
    with pytest.raises(ValueError, match=name):  # a pod without the Secret does not start
        AppArgs(**args).database_url()
    laptop = load(REPO / "serving" / "config.yaml")["applications"][0]["args"]
    assert not laptop["votes"].get("database_url") and not laptop["votes"].get(
        "database_url_env")
    assert AppArgs(**laptop).database_url().startswith("sqlite:///")


def test_serve_config_v2_passes_serves_own_schema_and_the_apps_args():
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from serving.config import AppArgs

    v2 = serve_v2()
    schema = ServeDeploySchema.model_validate(v2)
    assert [a.name for a in schema.applications] == ["aligner"]
    app = v2["applications"][0]
    for d in app["deployments"]:  # Serve ignores unknown deployment keys: catch typos here
        assert set(d) <= set(DeploymentSchema.model_fields), set(d) - set(
            DeploymentSchema.model_fields)
    AppArgs(**app["args"])
    assert app["args"]["auth"]["api_key_env"] == render.API_KEY_ENV[0]["name"]
    port = v2["http_options"]["port"]
    head = load(K8S / "rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {port, 8265} <= ports


# ----------------------------------------------------------------------------- the loop


def test_the_loop_rayjob_keeps_its_simulated_votes_apart_from_the_peoples():
    """``jobs.loop`` serves on its own cluster; its simulated votes go to a PostgreSQL database
    of their own (a Secret every Ray container reads), never to the RayService's."""
    from jobs.loop import ServeSettings

    spec = load(K8S / "rayjob-loop.yaml")["spec"]
    _, cfg = parse_entrypoint(spec["entrypoint"])
    assert cfg.serve.votes_database_url_env == render.LOOP_VOTES_DB_URL_ENV
    assert render.LOOP_VOTES_DB_URL_ENV != render.VOTES_DB_URL_ENV
    assert render.LOOP_VOTES_DB_SECRET != render.VOTES_DB_SECRET
    assert cfg.world.startswith(render.SHARED) and cfg.serve.port == ServeSettings().port
    c = spec["rayClusterSpec"]
    for group in (c["headGroupSpec"], *c["workerGroupSpecs"]):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"]
               for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[render.LOOP_VOTES_DB_URL_ENV] == {"name": render.LOOP_VOTES_DB_SECRET,
                                                     "key": "url"}
        assert env[cfg.serve.api_key_env]["name"] == render.API_KEY_SECRET
    cpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in c["workerGroupSpecs"])
    assert cpus - cfg.serve.reserved_cpus() >= cfg.retrain.num_workers, \
        "a Ray Train worker must fit beside the served application"
