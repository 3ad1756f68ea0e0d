"""The cluster launcher file passes Ray's own validation; a simulated cluster comes up on loopback.

The simulated-cluster test starts and stops its own small cluster and never connects this
process to it (`ray.init`), so it cannot disturb a shared cluster other tests are using.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from cluster.simulated import SimulatedCluster
from cluster.vram_classes import HEAD_RESOURCE, default_classes

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "ray-cluster.yaml"


def prepared_config() -> dict:
    """The launcher file as `ray up` sees it: defaults filled in, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)  # ray-schema.json plus Ray's own cross-field checks
    return config


def test_cluster_yaml_passes_ray_validation():
    config = prepared_config()
    assert config["provider"]["type"] != "local"  # the on-prem provider has a single node type


def test_cluster_yaml_validation_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(yaml.safe_load(CLUSTER_YAML.read_text()))
    bad["available_node_types"]["gpu-24gb"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_cluster_yaml_has_a_cpu_head_and_a_node_type_per_class():
    config = prepared_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get(HEAD_RESOURCE) == 1
    assert head["resources"].get("GPU", 0) == 0
    assert not any(k.startswith("vram_") for k in head["resources"])

    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    for cls in default_classes():
        carrying = [name for name, t in workers.items() if t["resources"].get(cls.resource, 0) > 0]
        assert carrying, f"no node type advertises {cls.resource}"
        for name in carrying:
            res = workers[name]["resources"]
            # one class per node type, one unit of it per GPU
            assert [k for k in res if k.startswith("vram_")] == [cls.resource], name
            assert res["GPU"] == res[cls.resource] >= 1, name
            assert workers[name]["min_workers"] == 0
            assert workers[name]["max_workers"] >= 1
    assert not any(HEAD_RESOURCE in t["resources"] for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_simulated_cluster_runs_on_loopback_with_class_nodes():
    import ray
    from ray.experimental import internal_kv

    kv_before = internal_kv.global_gcs_client  # a shared cluster's, if this process is connected
    t0 = time.monotonic()
    sim = SimulatedCluster("12gb:2", head_cpus=2, node_cpus=1)  # a second class joins below
    try:
        sim.start()
        nodes = sim.nodes()
        assert len(nodes) == 3
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert sim.address.startswith("127.0.0.1:")

        by_class = sim.nodes_by_class()
        assert {name: len(ids) for name, ids in by_class.items()} == {"12gb": 2}
        heads = [n for n in nodes if n["Resources"].get(HEAD_RESOURCE)]
        assert len(heads) == 1 and heads[0]["Resources"].get("GPU", 0) == 0
        assert heads[0]["NodeID"] == sim.head_node_id
        for n in nodes:
            if n is not heads[0]:
                assert n["Resources"]["GPU"] == 1

        # a machine goes away, another joins
        sim.remove_node(by_class["12gb"][0])
        added = sim.add_class_node("40gb")
        after = sim.nodes_by_class()
        assert {name: len(ids) for name, ids in after.items()} == {"12gb": 1, "40gb": 1}
        assert after["40gb"] == [added]
        with pytest.raises(ValueError):
            sim.remove_node(sim.head_node_id)
    finally:
        sim.shutdown()
    if kv_before is None:  # this process was not connected to any cluster: still is not
        assert not ray.is_initialized()
    assert internal_kv.global_gcs_client is kv_before
    with pytest.raises(RuntimeError):
        sim.nodes()
    assert time.monotonic() - t0 < 60


def test_cluster_yaml_gives_every_node_the_ray_token_and_token_auth():
    """Every `ray start` (head and workers) runs with RAY_AUTH_MODE=token and the token file the
    launcher copies to every node (never a token value in the file)."""
    config = prepared_config()
    mounted = config["file_mounts"]
    (token_mount,) = [target for target, source in mounted.items() if source.endswith("/ray_token")]
    setup = "\n".join(config["setup_commands"])
    assert f"chmod 600 {token_mount}" in setup
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in setup and "~/i2v-farm-ray-auth.sh" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        before = start[:start.index("ray start")]
        assert ". ~/i2v-farm-ray-auth.sh;" in before and "umask 077;" in before, key
    assert "RAY_AUTH_TOKEN=" not in CLUSTER_YAML.read_text()  # the token travels as a file, never inline
