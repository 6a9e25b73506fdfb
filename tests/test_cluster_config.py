import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def load_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_the_ray_launcher_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load_cluster()
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # trials run on GPU workers


def test_cluster_yaml_passes_rays_own_prepare_and_validate():
    """What `ray up` itself does with the file: defaults filled in, setup commands merged, schema checked."""
    prepared = prepare_config(load_cluster())
    validate_config(prepared)
    # every node installs exactly the lock's versions (make install) under CPython 3.11
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " && ".join(prepared[key])
        assert "make install" in commands and "uv python install 3.11" in commands, key
    assert "pip install -q -e ." not in json.dumps(prepared)  # no unpinned install left


def test_every_node_runs_with_token_auth_and_a_private_dashboard():
    config = load_cluster()
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    for commands in (head, worker):
        assert "RAY_AUTH_MODE=token" in commands and "~/.spntune/mlflow.env" in commands
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # the MLflow server starts before Ray, so jobs inherit its URI
    assert head.index("scripts/mlflow-server.sh start") < head.index("ray start --head")
    assert "MLFLOW_TRACKING_URI=" in head
    # secrets come from the user's home directory, never from the repository
    mounts = config["file_mounts"]
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["~/.spntune/mlflow.env"] == "~/.spntune/mlflow.env"
    assert all(src == "." or src.startswith("~/") for src in mounts.values())
    assert {".git", ".venv"} <= set(config["rsync_exclude"])


def test_cluster_yaml_holds_no_secret_host_or_account():
    text = (ROOT / "cluster.yaml").read_text()
    # no value given to a secret (a path to one in the home directory, or a <placeholder>, is fine)
    assert not re.search(r"(?i)(password|secret|token|key)\s*[:=]\s*(?!~/|<)\S", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    assert not re.search(r"\b(?!127\.)\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", text)  # no address but loopback
    assert not re.search(r"(?i)\b[a-z0-9-]+\.(com|net|org|io|internal)\b", text)  # no host names
    assert not re.search(r"(?i)fs-[0-9a-f]{4,}|arn:aws|@[a-z0-9-]+\.", text)  # no resource ids or accounts
    assert load_cluster()["auth"] == {"ssh_user": "ubuntu"}  # the image's default user, no key of anyone's
