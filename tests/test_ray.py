"""``runs.compare --executor ray``: a local Ray instance, and a two-node cluster on loopback.

Ray is an optional extra (``pip install -e '.[ray]'``); CI installs it, so these tests run there. The cluster
tests start a head and a worker node of their own (Cluster from ray.cluster_utils, several processes per node)
and stop only those; together they take about a minute on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import threading
import time
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


HOOKS = Path(__file__).parent / "ray_hooks"
"""On the cluster's PYTHONPATH: its ``sitecustomize`` registers the test-only ``wait_for_file`` controller in
every worker (tests/ray_hooks/wait_controller.py)."""


@pytest.fixture
def cluster(monkeypatch):
    """A head and one worker node on loopback, one CPU each; only these Ray processes are stopped after. Their
    workers know the ``wait_for_file`` controller, and so does this process."""
    monkeypatch.syspath_prepend(str(HOOKS))
    import wait_controller  # noqa: F401  (registers the controller here too: the driver checks every spec)

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def test_two_nodes_share_the_trials(cluster, tmp_path):
    from runs.compare import cli

    c, worker = cluster
    out = tmp_path / "cmp"
    assert cli([*TINY, "--max-iters", "200", "--controllers", "constant@0,0.1", "--seeds", "1", "--executor", "ray",
                "--address", c.address, "--cpus-per-trial", "1", "--out", str(out)]) == 0
    assert sorted(nodes(out)) == sorted([c.head_node.node_id, worker.node_id])


def test_without_an_address_a_comparison_starts_its_own_instance_beside_a_running_cluster(cluster, tmp_path):
    """Ray's own default would join the newest cluster on the machine (another user's, another comparison's)."""
    from runs.compare import cli

    c, worker = cluster
    out = tmp_path / "cmp"
    assert cli([*TINY, "--max-iters", "20", "--controllers", "constant@0", "--seeds", "1,", "--executor", "ray",
                "--out", str(out)]) == 0
    assert nodes(out)[0] not in {c.head_node.node_id, worker.node_id}


def node_processes(node) -> list:
    """The node's raylet and every process under it (its workers): what a crashed machine takes down."""
    import psutil

    try:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        return [raylet, *raylet.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def running_a_trial(node) -> bool:
    """Whether one of the node's workers runs a trial (Ray titles a busy worker ``ray::<function>``)."""
    import psutil

    for proc in node_processes(node):
        try:
            if "run_remote_trial" in " ".join(proc.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


@pytest.mark.parametrize("retries", [3, 0])
def test_a_worker_node_killed_mid_trial_costs_a_rerun_not_a_row(cluster, tmp_path, monkeypatch, capsys, retries):
    """With Ray's retries the killed node's trial reruns on the head; without them, one line and exit 2.

    Deterministic: both trials hold at their first control step until the file ``go`` exists (the
    ``wait_for_file`` controller), so both nodes are busy, the worker's trial is surely running when its node
    is killed, and ``go`` is created only after the kill.
    """
    from experiments import ray_executor
    from runs.compare import cli

    monkeypatch.setattr(ray_executor, "MAX_RETRIES", retries)
    c, worker = cluster
    go = tmp_path / "go"
    seen: list[bool] = []

    def kill_the_worker_node_mid_trial():
        deadline = time.monotonic() + 300
        while not running_a_trial(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        seen.append(running_a_trial(worker))
        for proc in node_processes(worker):
            proc.kill()  # SIGKILL, no goodbye: as when the machine dies
        go.touch()  # only now may the trials go on

    killer = threading.Thread(target=kill_the_worker_node_mid_trial, daemon=True)
    killer.start()
    out = tmp_path / "cmp"
    code = cli([*TINY, "--max-iters", "20", "--controllers", f"wait_for_file:path={go}", "--seeds", "2",
                "--executor", "ray", "--address", c.address, "--cpus-per-trial", "1", "--out", str(out)])
    killer.join(timeout=10)
    assert seen == [True], "the worker node never ran a trial"
    if retries:
        assert code == 0
        table = trials(out)
        assert len(table) == 2 and all(t["best_val_loss_full"] > 0 for t in table.values())
        assert nodes(out) == [c.head_node.node_id] * 2  # the killed node's trial reran on the head
    else:
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "lost with its node or worker (NodeDiedError)" in err[0], err
    c.remove_node(worker, allow_graceful=False)  # its processes are dead; drop them from the cluster's books
