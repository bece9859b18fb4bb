"""``runs.compare --executor ray``: a local Ray instance, and a two-node cluster on loopback.

Ray is an optional extra (``pip install -e '.[ray]'``); CI installs it, so the local test runs there. The
two-node test starts a Ray cluster of its own (several processes per node) and takes minutes on a busy 2-core
machine, so it runs only with ``DYNDROP_RAY_CLUSTER_TESTS=1``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster

pytestmark = pytest.mark.slow

TINY = ["--preset", "tiny", "--eval-interval", "10", "--eval-iters", "2", "--gen-tokens", "0", "--threads", "1",
        "--no-progress", "--wandb", "disabled", "--no-warm-up"]


def trials(out: Path) -> dict[tuple[str, int], dict]:
    return {(t["controller"], t["seed"]): t for t in json.loads((out / "results.json").read_text())["trials"]}


def nodes(out: Path) -> list[str]:
    return [json.loads(p.read_text())["ray_node"] for p in sorted((out / "trials").glob("*/trial.json"))]


def test_a_local_ray_comparison_reproduces_the_local_table(tmp_path):
    from runs.compare import cli

    args = [*TINY, "--max-iters", "30", "--controllers", "constant@0,0.1", "--seeds", "2"]
    assert cli([*args, "--out", str(tmp_path / "local")]) == 0
    assert cli([*args, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    local, remote = trials(tmp_path / "local"), trials(tmp_path / "ray")
    assert local.keys() == remote.keys() and len(local) == 4
    for key in local:  # one thread, the same code: the same numbers, bit for bit
        for metric in ("best_val_loss", "best_val_loss_full", "final_train_loss"):
            assert remote[key][metric] == local[key][metric], (key, metric)
    record = json.loads(next((tmp_path / "ray" / "trials").glob("*/trial.json")).read_text())
    assert record["config"]["out"].startswith(str(tmp_path / "ray"))  # the driver's path, not the task's
    assert not ray.is_initialized()  # the local instance was stopped


@pytest.fixture
def cluster():
    """A head and one worker node on loopback, one CPU each; only these Ray processes are stopped after."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


@pytest.mark.skipif(os.environ.get("DYNDROP_RAY_CLUSTER_TESTS") != "1",
                    reason="starts a two-node Ray cluster; set DYNDROP_RAY_CLUSTER_TESTS=1")
def test_two_nodes_share_the_trials(cluster, tmp_path):
    from runs.compare import cli

    c, worker = cluster
    out = tmp_path / "cmp"
    assert cli([*TINY, "--max-iters", "200", "--controllers", "constant@0,0.1", "--seeds", "1", "--executor", "ray",
                "--address", c.address, "--cpus-per-trial", "1", "--out", str(out)]) == 0
    assert sorted(nodes(out)) == sorted([c.head_node.node_id, worker.node_id])
