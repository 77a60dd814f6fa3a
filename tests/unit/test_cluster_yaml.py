"""cluster.yaml is a Ray autoscaler config that `ray up` accepts, and it installs the lock.

`ray up` runs, before it talks to the cloud (``ray.autoscaler._private.commands.
_bootstrap_config``): ``prepare_config`` (merge the provider's defaults.yaml, merge the setup
commands per node kind, fill per-type min/max workers), the provider's resource auto-fill
(EC2 DescribeInstanceTypes: credentials, and only a warning if it fails), ``validate_config``
(Ray's JSON schema, head type among the node types, sum of min_workers <= max_workers), then
the provider's ``bootstrap_config`` (IAM role, key pair, subnets, security group: boto3 and
live credentials). The first and third run here, offline, on the real file; the cloud steps
cannot, so the resources they would fill in are written out in the file and checked below.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
#: an `||` branch (or a trailing command) that always succeeds hides the failure before it
SWALLOW = re.compile(r"\|\|\s*(true\b|:(?=[\s;)]|$)|exit\s+0\b|echo\b)"
                     r"|;\s*(true|:)\s*$|\bset\s+\+e\b")


def load() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def prepared() -> dict[str, Any]:
    """cluster.yaml after Ray's own prepare_config, validated by Ray's validate_config."""
    cfg = prepare_config(copy.deepcopy(load()))
    validate_config(cfg)
    return cfg


def all_commands(cfg: dict[str, Any]) -> list[str]:
    """Every shell command the cluster launcher runs, node-type overrides included."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k, [])]
    for node in cfg["available_node_types"].values():
        cmds += node.get("worker_setup_commands", []) + node.get("initialization_commands", [])
    return cmds


def test_ray_prepares_and_validates_it(prepared):
    raw = load()
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(types) == {"head", "cpu_worker",
                                                                   "gpu_worker"}
    # prepare_config merged AWS defaults but kept ours: our node types, not the defaults'
    assert prepared["provider"]["type"] == "aws" and prepared["auth"]["ssh_user"] == "ubuntu"
    assert prepared["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert prepared["worker_setup_commands"] == raw["setup_commands"]
    assert prepared["idle_timeout_minutes"] == raw["idle_timeout_minutes"] > 0
    for name, node in types.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= prepared["max_workers"], name
    # validate_config is not a rubber stamp: it rejects a broken copy of the same file
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "one"}
    with pytest.raises(Exception, match="one"):
        validate_config(broken)
    broken = copy.deepcopy(prepared)
    broken["head_node_type"] = "gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken)


def test_node_types_split_cpu_and_gpu_work(prepared):
    types = prepared["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0} and types["head"]["max_workers"] == 0
    cpu, gpu = types["cpu_worker"], types["gpu_worker"]
    assert cpu["resources"]["CPU"] > 0 and "GPU" not in cpu["resources"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] > 0
    assert cpu["min_workers"] == gpu["min_workers"] == 0  # idle cluster = the head alone
    assert cpu["node_config"]["InstanceType"].startswith("c")
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))


def test_setup_installs_the_lock_and_swallows_no_error(prepared):
    raw = load()
    # the repository (with the lock) is mounted where the install line reads it
    (dest, src), = [(d, s) for d, s in raw["file_mounts"].items() if s == "."]
    assert (REPO / src / "requirements.txt").is_file()
    installs = [c for c in raw["setup_commands"] if "pip install" in c and " -r " in c]
    assert installs == [f"cd {dest.replace('/home/ubuntu', '~')} && ~/venv/bin/pip install "
                        "-q -r requirements.txt"]
    for cmd in all_commands(prepared):
        assert not SWALLOW.search(cmd), f"this command hides a failure: {cmd}"
    # the GPU type's own list replaces the common one: the same commands, in the same order,
    # but for the lock line, which installs the GPU lock (docs/cluster.md, "The GPU stack")
    gpu = prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    common = prepared["worker_setup_commands"]
    gpu_lock = installs[0].replace("-r requirements.txt", "-r requirements-gpu.txt")
    assert (REPO / src / "requirements-gpu.txt").is_file()
    assert gpu[:len(common)] == [gpu_lock if c == installs[0] else c for c in common]
    assert sum("pip install" in c and " -r " in c for c in gpu) == 1  # one lock, not two
    # then checks: one faiss distribution (a GPU one), and torch, faiss and vLLM on the GPU
    extra = gpu[len(common):]
    assert not any(".[gpu]" in c for c in gpu)  # no extra: it could not replace the CPU pins
    assert any("cuda.is_available()" in c for c in extra)
    assert any("get_num_gpus()" in c for c in extra) and any("vllm" in c for c in extra)
    assert any("'faiss-cpu', 'faiss-gpu'" in c and "len(f) == 1" in c for c in extra)


def lock_pins(name: str) -> dict[str, str]:
    """{canonical name: version} of a lock; every requirement line must be an exact pin."""
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
            assert m, f"{name}: not an exact pin: {line}"
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return pins


def test_the_locks_hold_one_faiss_each_and_the_gpu_lock_ray_llm():
    """The static half of .ci/resolve (which resolves both locks against the index)."""
    import tomllib

    cpu, gpu = lock_pins("requirements.txt"), lock_pins("requirements-gpu.txt")
    faiss = {name: sorted(p for p in pins if p == "faiss-cpu" or p.startswith("faiss-gpu"))
             for name, pins in (("cpu", cpu), ("gpu", gpu))}
    assert faiss["cpu"] == ["faiss-cpu"], faiss  # each installs the `faiss` module: one only
    assert len(faiss["gpu"]) == 1 and faiss["gpu"][0].startswith("faiss-gpu"), faiss
    # one Ray on every node of a cluster; the GPU lock is resolved for ray[llm] (ray.data.llm)
    assert gpu["ray"] == cpu["ray"] and "vllm" in gpu and "vllm" not in cpu
    tops = re.findall(r"^#in: (.+)$", (REPO / "requirements-gpu.txt").read_text(), re.M)
    assert f"ray[data,train,serve,llm]=={gpu['ray']}" in tops
    for top in tops:  # every top-level requirement with an exact pin is the lock's version
        m = re.fullmatch(r"([\w.-]+)(?:\[[\w,]+\])?==(\S+)", top)
        if m:
            assert gpu[re.sub(r"[-_.]+", "-", m[1]).lower()] == m[2], top
    # pyproject has no extra that installs the GPU stack on top of the CPU pins
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {})
    assert not [r for reqs in extras.values() for r in reqs if r.startswith(("vllm", "faiss"))]


def test_the_swallow_check_catches_the_patterns_it_names():
    for bad in ('nvidia-smi && pip install ".[gpu]" || true', "make || :",
                "pip install x; true", "pip install x || exit 0", "set +e; pip install x",
                "pip install x || echo failed"):
        assert SWALLOW.search(bad), bad
    for ok in ("test -x ~/venv/bin/python || python3.11 -m venv ~/venv",
               "cd ~/aligner && ~/venv/bin/pip install -q -r requirements.txt"):
        assert not SWALLOW.search(ok), ok


def test_ports_of_the_job_api_and_serve():
    raw = load()
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-port=8265" in head and "--dashboard-host=0.0.0.0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    rules = raw["provider"]["security_group"]["IpPermissions"]
    assert sorted((r["FromPort"], r["ToPort"]) for r in rules) == [(8000, 8000), (8265, 8265)]
    for rule in rules:  # never open to the internet: the job API runs any code it is sent
        assert all(not r["CidrIp"].startswith("0.0.0.0") for r in rule["IpRanges"])
    serve = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    assert serve["http_options"]["port"] == 8000


def test_every_node_starts_ray_with_token_auth(prepared):
    raw = load()
    # the token of the machine that runs `ray up` goes to every node (file mounts reach all)
    assert raw["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all(c.startswith("export RAY_AUTH_MODE=token;") for c in starts), key
        # a node without the token stops before `ray start` (which would run without auth)
        check = prepared[key].index(starts[0]) - 1
        assert prepared[key][check].startswith("test -s ~/.ray/auth_token ||") \
            and "exit 1" in prepared[key][check], key
    # interactive shells on a node (`ray attach`, `ray exec ... ray status`) send the token
    gpu = prepared["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    for cmds in (prepared["setup_commands"], gpu):
        assert any("echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc" in c for c in cmds)
