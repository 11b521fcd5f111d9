"""Stopping main stops the step it runs: real `mlflow run .` subprocesses, killed mid-training.

MLflow starts each step detached from main (setsid), so without steps.lifeline a stopped main
left its train step training on, holding the checkpoint lock a rerun needs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from steps.checkpoints import load_checkpoint
from steps.lifeline import MAIN_ENV, start_time
from tests.conftest import REPO, mlflow_run_env

# Small and quick: main is stopped as soon as train has checkpointed its first epoch (one every
# epoch, CIFAR10_CHECKPOINT_INTERVAL 0). Ten epochs, so that a step left running is still running
# when the test looks; the cpu recipe has a fixed LR, so no find_lr.
PARAMS = {"source": "synthetic", "models": "fast_net_small", "recipe": "cpu", "epochs": "10", "batch_size": "50",
          "train_limit": "400", "test_limit": "100"}
STOP_S = 15  # the most a stopped main may leave its step running


def start_main(tmp_path: Path, tracking_uri: str, log: Path) -> tuple[list[str], dict, subprocess.Popen]:
    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local"]
    for key, value in PARAMS.items():
        cmd += ["-P", f"{key}={value}"]
    env = mlflow_run_env(tracking_uri, CIFAR10_CHECKPOINTS=str(tmp_path / "checkpoints"),
                         CIFAR10_CHECKPOINT_INTERVAL="0")
    # Its own session, as a terminal's job has its own process group: killpg then spares pytest.
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                               start_new_session=True)
    return cmd, env, process


def ours(tmp_path: Path) -> dict[int, str]:
    """pid -> command line of every live process started for this test: they alone have its
    checkpoint folder in their environment."""
    marker = f"CIFAR10_CHECKPOINTS={tmp_path / 'checkpoints'}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or a zombie's
            pass
    return found


@pytest.fixture
def no_orphans(tmp_path):
    """Whatever the test finds, it leaves no process of its own behind."""
    yield
    for pid in ours(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_epoch(tmp_path: Path, process: subprocess.Popen, timeout_s: float = 300) -> int:
    """Poll until train has checkpointed a finished epoch; return that epoch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "main ended before it could be stopped"
        for path in (tmp_path / "checkpoints").glob("*/last.pt"):
            if (epoch := load_checkpoint(path)["epoch"]) >= 1:
                return epoch
        time.sleep(0.2)
    raise AssertionError("train checkpointed no epoch")


def train_runs(client: MlflowClient) -> list:
    return client.search_runs(["0"], filter_string="tags.`mlflow.project.entryPoint` = 'train'",
                              order_by=["attributes.start_time ASC"])


def wait_until_stopped(tmp_path: Path, client: MlflowClient) -> tuple[dict[int, str], str]:
    """(this test's live processes, the train run's status), once none is left or STOP_S passed."""
    deadline = time.monotonic() + STOP_S
    while True:
        left, status = ours(tmp_path), train_runs(client)[0].info.status
        if (not left and status != "RUNNING") or time.monotonic() > deadline:
            return left, status
        time.sleep(0.5)


@pytest.mark.slow
def test_kill_9_of_mains_process_group_stops_its_step_and_a_rerun_resumes(tmp_path, tracking_uri, no_orphans):
    client = MlflowClient()
    cmd, env, main = start_main(tmp_path, tracking_uri, tmp_path / "first.log")
    try:
        killed_at = wait_for_epoch(tmp_path, main)
    finally:
        os.killpg(main.pid, signal.SIGKILL)  # as `kill -9 -PGID`, or a terminal closed hard
        main.wait()

    left, status = wait_until_stopped(tmp_path, client)
    assert left == {}, f"still running {STOP_S} s after main was killed: {left}"
    assert status == "KILLED"

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    killed, resumed = train_runs(client)
    assert int(resumed.data.tags["resumed_from_epoch"]) >= killed_at
    assert resumed.data.tags["resumed_from_run"] == killed.info.run_id
    assert resumed.info.status == "FINISHED"


# Ctrl-C in main's terminal reaches main's whole process group; another process's kill reaches
# main alone (the `mlflow run` above it then sees main fail).
@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm-to-main"])
@pytest.mark.slow
def test_a_signal_to_main_stops_its_step(signum, group, tmp_path, tracking_uri, no_orphans):
    client = MlflowClient()
    log = tmp_path / "main.log"
    _, _, main = start_main(tmp_path, tracking_uri, log)
    try:
        wait_for_epoch(tmp_path, main)
        if group:
            os.killpg(main.pid, signum)
        else:
            [main_pid] = [pid for pid, cmdline in ours(tmp_path).items() if "-m steps.main" in cmdline]
            os.kill(main_pid, signum)
        assert main.wait(timeout=STOP_S) != 0
    finally:
        if main.poll() is None:
            os.killpg(main.pid, signal.SIGKILL)
            main.wait()

    left, status = wait_until_stopped(tmp_path, client)
    assert left == {}, f"still running {STOP_S} s after main was stopped: {left}"
    assert status == "KILLED"
    errors = [line for line in log.read_text().splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, log.read_text()[-3000:]
    assert errors[0].startswith(f"Error: stopped by {signum.name}: train (run ") and "KILLED" in errors[0]


# A step that watches a main: it trains for 30 s unless stopped.
STEP = textwrap.dedent("""
    import time, mlflow
    from steps.lifeline import watch_main
    with mlflow.start_run() as run, watch_main(run.info.run_id):
        print(run.info.run_id, flush=True)
        time.sleep({body_s})
""")


@pytest.mark.parametrize("main, body_s, stopped", [
    (None, 1, False),  # run by hand: not watched
    ("live", 3, False),  # its main lives on
    ("reused", 30, True),  # main's pid, now another process's (its start time differs)
    ("gone", 30, True),
])
def test_a_step_stops_itself_when_its_main_is_gone(main, body_s, stopped, tracking_uri):
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != MAIN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    me = os.getpid()
    if main is not None:
        gone = subprocess.Popen(["true"])
        gone.wait()
        env[MAIN_ENV] = {"live": f"{me}:{start_time(me)}", "reused": f"{me}:{int(start_time(me)) - 1}",
                         "gone": f"{gone.pid}:1"}[main]
    started = time.monotonic()
    # Its own session, as MLflow starts a step: the process group it kills is its own.
    step = subprocess.run([sys.executable, "-c", STEP.format(body_s=body_s)], env=env, capture_output=True,
                          text=True, timeout=120, start_new_session=True)
    run_id = step.stdout.split()[0]
    status = MlflowClient().get_run(run_id).info.status
    if stopped:
        assert step.returncode == -signal.SIGKILL and status == "KILLED", step.stderr[-2000:]
        assert time.monotonic() - started < body_s
        assert "main (pid " in step.stderr and "is gone: stopping this step" in step.stderr
    else:
        assert step.returncode == 0 and status == "FINISHED", step.stderr[-2000:]
