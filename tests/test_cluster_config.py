import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_the_ray_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert any("pip install" in cmd and "-e ." in cmd for cmd in config["setup_commands"])
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials run on GPU workers
