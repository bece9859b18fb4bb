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


def test_two_nodes_share_the_trials(cluster, tmp_path, capsys):
    from runs.compare import cli

    c, worker = cluster
    out = tmp_path / "cmp"
    args = [*TINY, "--max-iters", "200", "--controllers", "constant@0,0.1", "--seeds", "1", "--executor", "ray",
            "--address", c.address, "--cpus-per-trial", "1", "--out", str(out)]
    # #22 item 13: a request no node can meet waited forever; now one line, before anything is written
    assert cli([*args, "--gpus-per-trial", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no node of the Ray cluster" in err[0] and "--gpus-per-trial" in err[0], err
    assert not out.exists()
    assert cli(args) == 0
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


# -- before anything is written: the address, the request (#22 items 13, 15, cosmetics) ----------------------

def options(command: str) -> list[str]:
    """:data:`TINY` as ``command`` takes it (runs.pbt has no warm-up to skip)."""
    return [a for a in TINY if command == "compare" or a != "--no-warm-up"]


@pytest.mark.parametrize("command, args, words", [
    ("compare", ["--executor", "ray", "--address", "127.0.0.1:1"], "nothing answers at --address 127.0.0.1:1"),
    ("compare", ["--executor", "ray", "--address", "http://x:99999"], "give auto or HOST:PORT"),
    ("compare", ["--executor", "ray", "--gpus-per-trial", "nan"], "--gpus-per-trial nan"),
    ("pbt", ["--address", "127.0.0.1:1"], "nothing answers at --address 127.0.0.1:1"),
    ("pbt", ["--gpus-per-member", "nan"], "--gpus-per-member nan"),
    ("pbt", ["--cpus-per-member", "inf", "--address", "auto"], "--cpus-per-member inf"),
])
def test_a_bad_address_or_request_is_one_line_before_anything_is_written(tmp_path, capsys, command, args, words):
    """A bad --address wrote comparison.json, trial.json and the lock before failing (a rerun of runs.pbt with the
    right address was then refused), 127.0.0.1:1 retried for minutes, nan was accepted and hung."""
    import importlib

    cli = importlib.import_module(f"runs.{command}").cli
    extra = ["--controllers", "constant", "--seeds", "1,"] if command == "compare" else ["--population", "2"]
    t0 = time.monotonic()
    assert cli([*options(command), "--max-iters", "20", *extra, *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 60


def test_a_request_this_machine_cannot_meet_is_refused_without_starting_ray(tmp_path, capsys):
    """#22 item 13: --gpus-per-trial 1 on a machine without a GPU hung silently (> 240 s)."""
    import torch

    from runs.compare import cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli([*TINY, "--max-iters", "20", "--controllers", "constant", "--seeds", "1,", "--executor", "ray",
                "--gpus-per-trial", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 GPUs" in err[0] and "--gpus-per-trial" in err[0], err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


# -- SIGTERM: as locally (#22 item 14) -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compare", "pbt"])
def test_sigterm_under_ray_exits_143_with_the_hint_and_leaves_no_temp_folder(tmp_path, command):
    """SIGTERM under Ray printed Ray's dump and exited 134 or 1, and left /tmp/dyndrop-trial-* behind."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="dd", dir="/tmp"))  # short: Ray's sockets live under it
    args = {"compare": ["--controllers", "constant@0.1,0.2", "--seeds", "1,", "--executor", "ray"],
            "pbt": ["--population", "2", "--jobs", "2"]}[command]
    started = {"compare": "dyndrop-ray-*/dyndrop-trial-*", "pbt": "dyndrop-pbt-*/pbt/*/checkpoint_*"}[command]
    proc = subprocess.Popen([sys.executable, "-m", f"runs.{command}", *options(command), "--max-iters", "100000", *args,
                             "--out", str(tmp_path / "out")], env={**os.environ, "TMPDIR": str(tmp)},
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp.glob(started)):  # a trial (a PBT member) is training in a Ray worker
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        left = [p.name for p in tmp.iterdir() if p.name.startswith("dyndrop-")]
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 143, err
    hint = {"compare": "rerun the same command to continue", "pbt": "rerun it with --overwrite"}[command]
    assert hint in err and "Traceback" not in err, err
    assert not left


# -- a cluster started the documented way, with Ray's token authentication (#22 item 25) ---------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_started_the_documented_way_with_token_auth(tmp_path):
    """Ray >= 2.5x's ray start --head turns token authentication on where ~/.ray/auth_token exists (any local
    ray.init writes one). The comparison said 'cannot reach a Ray cluster ... start one with ray start --head'.
    docs/comparisons.md's commands: the head as usual, RAY_AUTH_MODE=token and the head's token on every other
    node and on the machine that runs the comparison."""
    import shutil
    import subprocess
    import sys
    import tempfile

    import psutil

    pytest.importorskip("ray._private.authentication.authentication_token_setup")
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    home = Path(tempfile.mkdtemp(prefix="dh", dir="/tmp"))  # short: Ray's sockets live under it
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env = {**base, "HOME": str(home)}
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    with_token = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    port = free_port()
    common = ["--num-cpus", "1", "--temp-dir", str(home / "r"), "--block", "--include-dashboard=false"]
    nodes = [subprocess.Popen([ray_cli, "start", "--head", "--port", str(port), *common], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while subprocess.run([ray_cli, "status", "--address", address], env=with_token,
                             capture_output=True).returncode != 0:
            assert nodes[0].poll() is None and time.monotonic() < deadline, "the head did not start"
            time.sleep(1)
        nodes.append(subprocess.Popen([ray_cli, "start", "--address", address, *common], env=with_token,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        compare = [sys.executable, "-m", "runs.compare", *TINY, "--max-iters", "20", "--controllers",
                   "constant@0,0.1", "--seeds", "1", "--executor", "ray", "--address", address,
                   "--out", str(tmp_path / "cmp")]
        root = Path(__file__).resolve().parents[1]
        refused = subprocess.run(compare, env=env, cwd=root, capture_output=True, text=True, timeout=300)
        err = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(err) == 1, refused.stderr
        assert "asks for a token" in err[0] and "RAY_AUTH_MODE=token" in err[0], err
        assert not (tmp_path / "cmp").exists()
        done = subprocess.run(compare, env=with_token, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert len(trials(tmp_path / "cmp")) == 2
    finally:
        for node in nodes:  # --block: each stops its own node's processes on SIGTERM
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        for proc in psutil.process_iter(["cmdline"]):  # anything of these nodes' left behind
            try:
                if str(home) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(home, ignore_errors=True)
