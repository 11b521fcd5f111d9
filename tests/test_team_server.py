"""A team's tracking server, all real: PostgreSQL, `mlflow server` with proxied artifacts, and
users who set nothing but MLFLOW_TRACKING_URI.

One server for the module, started as the README's team section says: PostgreSQL from initdb and
pg_ctl on a free port in a temporary folder (as the `postgres` user when the tests run as root,
which PostgreSQL refuses), `mlflow server` on it with --artifacts-destination. Two users run
`main` at the same time into the same registered model, one reruns and reuses every step, the
champion is promoted by hand and served by `mlflow models serve` from a folder outside the
repository whose only setting is the server's URL.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from benchmarks import _server
from steps.champion import margin
from steps.data import synthetic
from tests.conftest import REPO, mlflow_run_env
from tests.test_pyfunc import encode
from tests.test_registry import assert_settled, decide_at_once
from tests.test_serving import post, predictions, split

pytestmark = pytest.mark.slow

NAME = "cifar10-classifier"
EXPERIMENT = "cifar-team"
START_TIMEOUT_S = 180
MAIN_TIMEOUT_S = 600
# Two users' settings, the smallest that train apart on the synthetic set: fast_net_small for two
# epochs at a working LR learns it (about 0.6), one epoch at a negligible LR does not (about 0.1).
COMMON = {"source": "synthetic", "recipe": "reference", "models": "fast_net_small", "batch_size": "32",
          "aug": "none", "train_limit": "200", "test_limit": "100"}
GOOD = {**COMMON, "epochs": "2", "max_lr": "0.2"}
POOR = {**COMMON, "epochs": "1", "max_lr": "1e-6"}


@dataclass(frozen=True)
class Team:
    url: str  # the tracking server: all a user sets (MLFLOW_TRACKING_URI)
    pg_port: int
    artifacts: Path  # the server's --artifacts-destination


def as_postgres_user() -> list[str]:
    """The prefix that runs PostgreSQL's programs as a user it accepts: none, or, as root, runuser
    to `postgres`."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, which PostgreSQL refuses, and there is no user `postgres` to run it as "
                    "(.ci/run creates one: useradd --system postgres)")
    return ["runuser", "-u", "postgres", "--"]


def run_checked(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start_tracking_server(root: Path, pg_port: int) -> tuple[subprocess.Popen, str]:
    port = _server.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    (root / "server").mkdir()
    with (root / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"postgresql://mlflow@127.0.0.1:{pg_port}/mlflow",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"],
            cwd=root / "server", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    return process, url


def stop(process: subprocess.Popen) -> None:
    """End the server's process group (the CLI, uvicorn and its workers); it keeps nothing that
    needs a slow stop, the database being PostgreSQL's."""
    _server.stop_group(process, grace_s=5)


@pytest.fixture(scope="module")
def team():
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    psycopg = pytest.importorskip("psycopg", reason="the server's PostgreSQL driver: pip install -e '.[team]'")
    run_as = as_postgres_user()
    # Under /tmp, not pytest's folder (which only its user may enter), for the postgres user.
    root = Path(tempfile.mkdtemp(prefix="cifar10-team-"))
    if run_as:
        shutil.chown(root, "postgres")
    pg_port = _server.free_port()
    data = root / "pg"
    server = None
    try:
        run_checked([*run_as, initdb, "-D", str(data), "-U", "mlflow", "--auth=trust", "--no-locale", "-E", "UTF8"])
        run_checked([*run_as, pg_ctl, "-D", str(data), "-l", str(root / "pg.log"), "-w",
                     "-o", f"-h 127.0.0.1 -p {pg_port} -k {root}", "start"])
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="mlflow", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        server, url = start_tracking_server(root, pg_port)
        yield Team(url, pg_port, root / "artifacts")
    finally:
        if server is not None:
            stop(server)
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def start_main(team: Team, home: Path, params: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """`mlflow run` of the project as a user of the team would: from their own folder, with the
    server's URL and the team's experiment. Returns the process and the file of its output."""
    home.mkdir(exist_ok=True)
    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = mlflow_run_env(team.url, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, CIFAR10_CHECKPOINTS=str(home / "checkpoints"))
    output = home / f"main-{len(list(home.glob('main-*.log')))}.log"
    with output.open("w") as log:
        return subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT), output


def finish(started: tuple[subprocess.Popen, Path]) -> str:
    process, output = started
    process.wait(timeout=MAIN_TIMEOUT_S)
    assert process.returncode == 0, output.read_text()[-3000:]
    return output.read_text()


def test_two_users_share_a_server_and_the_champion_is_served_from_it(team, tmp_path):
    client = MlflowClient(team.url)
    client.create_experiment(EXPERIMENT)  # once, as a team does: two first runs would race to create it
    started = time.monotonic()

    # Two users at once, into the same registered model: both versions registered, and
    # `champion` on the better one whichever decided last.
    users = [start_main(team, tmp_path / "alice", GOOD), start_main(team, tmp_path / "bob", POOR)]
    for user in users:
        finish(user)
    concurrent_s = time.monotonic() - started
    versions = {v.version: client.get_model_version(NAME, v.version)
                for v in client.search_model_versions(f"name='{NAME}'")}
    assert sorted(versions) == ["1", "2"]
    max_lr = {v: client.get_run(mv.tags["train_run_id"]).data.params["max_lr"] for v, mv in versions.items()}
    good = next(v for v in versions if max_lr[v] == GOOD["max_lr"])
    poor = next(v for v in versions if v != good)
    val = {v: float(mv.tags["val_accuracy"]) for v, mv in versions.items()}
    val_images = 200  # the synthetic set's validation split
    assert val[good] > val[poor] + margin(val[poor], val_images), val  # the scenario: better beyond the margin
    assert [v for v, mv in versions.items() if "champion" in mv.aliases] == [good]
    assert client.get_run(versions[good].tags["pipeline_run_id"]).data.tags["champion_moved"] == "true"
    assert versions[good].tags["champion_decision"].startswith("promoted: ")
    assert "challenger" in versions["2"].aliases and "challenger" not in versions["1"].aliases
    # Both ran download_data at once; both went on from the one created first (steps.main.go_on_from).
    assert versions["1"].tags["data_run_id"] == versions["2"].tags["data_run_id"]
    # Artifacts went through the server to its --artifacts-destination.
    model_id = versions[good].source.removeprefix("models:/")
    assert client.get_logged_model(model_id).artifact_location.startswith("mlflow-artifacts:")
    assert any(team.artifacts.rglob("state_dict.pt"))

    # bob again, the same command: every step reused from the server; a new version, kept.
    rerun = time.monotonic()
    again = finish(start_main(team, tmp_path / "bob", POOR))
    rerun_s = time.monotonic() - rerun
    for step in ("download_data", "train", "evaluate"):
        assert f"{step}: reusing finished run" in again
    assert client.get_model_version_by_alias(NAME, "challenger").version == "3"
    assert client.get_model_version_by_alias(NAME, "champion").version == good
    assert client.get_model_version(NAME, "3").tags["champion_decision"].startswith("kept: ")

    # Promotion by hand, through the server.
    env = mlflow_run_env(team.url)
    promoted = subprocess.run([sys.executable, "-m", "steps.promote", "--version", poor], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert promoted.stdout.strip() == f"{NAME}: champion moved from version {good} to version {poor}"

    # The registry lives in PostgreSQL.
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=team.pg_port, user="mlflow", dbname="mlflow") as db:
        rows = db.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias",
                          (NAME,)).fetchall()
    assert rows == [("challenger", 3), ("champion", int(poor))]

    # Served from elsewhere: a folder outside the repository, nothing set but the server's URL,
    # the repository's code hidden, the model's files fetched through the server.
    serve = time.monotonic()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    logged = _server.LoggedModel(team.url, f"models:/{NAME}/{poor}", f"models:/{NAME}@champion", Path())
    try:
        served = _server.start(logged, elsewhere)
    except _server.ServerError as error:
        pytest.fail(str(error))
    try:
        assert {k for k in served.env if k.startswith("MLFLOW_")} == {"MLFLOW_TRACKING_URI", "MLFLOW_MODELS_WORKERS"}
        images = [encode(x) for x in synthetic(n_train=6, n_test=0)[0]]
        rows = predictions(post(served, split(*images)), len(images))
    finally:
        _server.stop(served)
    serve_s = time.monotonic() - serve
    mlflow.set_tracking_uri(team.url)
    try:
        expected = mlflow.pyfunc.load_model(f"models:/{NAME}/{poor}").predict(pd.DataFrame({"image": images}))
    finally:
        mlflow.set_tracking_uri(None)
    assert [row["label"] for row in rows] == list(expected["label"])
    np.testing.assert_allclose([row["probabilities"] for row in rows], np.stack(expected["probabilities"]),
                               atol=1e-5, rtol=0)
    print(f"two mains at once {concurrent_s:.0f} s, rerun {rerun_s:.0f} s, serve {serve_s:.0f} s")


@pytest.mark.parametrize("first, second, winner, late", [
    (0.60, 0.80, "2", "1"),  # the worse one's alias write lands last
    (0.80, 0.81, "1", "2"),  # within the margin: the first registered stays though the second wrote last
])
def test_two_decisions_at_once_settle_alike_through_the_server(team, first, second, winner, late):
    """tests/test_registry.py's forced interleaving of two decisions, through the REST API to
    PostgreSQL: the settling needs nothing of the store but reads and writes."""
    client = MlflowClient(team.url)
    name = f"race-{first}-{second}"
    assert decide_at_once(client, name, first, second, late) == {"1": winner == "1", "2": winner == "2"}
    assert_settled(client, name, winner)
