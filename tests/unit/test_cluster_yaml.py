"""cluster.yaml is a valid Ray autoscaler config (checked against Ray's own schema)."""

import json
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads((resources.files("ray") / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert any("requirements.txt" in c for c in cfg["setup_commands"])
