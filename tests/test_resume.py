"""Resuming train from its checkpoint: in-process after a crash (the resumed run ends with the
same weights and metrics as an uninterrupted one), and for real, by SIGKILLing an
`mlflow run` mid-training and running the same command again."""

import os
import signal
import subprocess
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from steps import checkpoints
from steps.checkpoints import load_checkpoint
from steps.data import synthetic, write_data
from steps.recipes import TrainConfig
from steps.train import EPOCH_METRICS, train
from tests.conftest import REPO, mlflow_run_env


class Crash(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """In-process runs write their artifacts under the working directory (the SQLite store's
    default artifact root is ./mlruns), so each test works in its own folder."""
    monkeypatch.chdir(tmp_path)


def history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name)) for name in EPOCH_METRICS}


def weights(client: MlflowClient, run_id: str, tmp) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "weights/state_dict.pt", str(tmp))
    return torch.load(path, weights_only=True)


# test_every 2: epoch 1, the one the crashed run checkpoints, has no test metrics to carry over.
@pytest.mark.parametrize("test_every, tested", [(1, [1, 2]), (2, [2])])
def test_resumed_training_matches_an_uninterrupted_one(test_every, tested, synthetic_data_dir, tracking_uri, tmp_path,
                                                      monkeypatch, caplog):
    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", "0")  # a checkpoint after every epoch, however short
    monkeypatch.setattr("steps.find_lr.NUM_ITER", 12)  # max_lr 0: a short range test in the run
    cfg = TrainConfig(epochs=2, batch_size=50, max_lr=0, aug="reference", test_every=test_every)
    client = MlflowClient()
    real_save = checkpoints.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            raise Crash("killed after epoch 1")

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        with mlflow.start_run() as crashed:
            train(cfg, str(synthetic_data_dir), device="cpu")
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    assert len(list((tmp_path / "checkpoints").glob("*/last.pt"))) == 1

    caplog.set_level("INFO", logger="steps.train")
    with mlflow.start_run() as resumed:
        train(cfg, str(synthetic_data_dir), device="cpu")
    resumed_log = caplog.text
    caplog.clear()
    with mlflow.start_run() as straight:
        train(cfg, str(synthetic_data_dir), device="cpu")

    tags = client.get_run(resumed.info.run_id).data.tags
    assert tags["resumed_from_epoch"] == "1" and tags["resumed_from_run"] == crashed.info.run_id
    assert "resumed_from_epoch" not in client.get_run(straight.info.run_id).data.tags
    assert list((tmp_path / "checkpoints").glob("*/last.pt")) == []
    # The range test ran once, in the crashed run, and its result was carried into the resumed one.
    for run in (resumed, straight):
        data = client.get_run(run.info.run_id).data
        assert data.params["max_lr_source"] == "range test in this run"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/lr_range_test.png"]
    assert client.get_run(resumed.info.run_id).data.metrics["suggested_lr"] == \
        client.get_run(straight.info.run_id).data.metrics["suggested_lr"]
    # Same order of batches, same augmentations, same optimizer state: the same numbers.
    assert history(client, resumed.info.run_id) == history(client, straight.info.run_id)
    for name, points in history(client, resumed.info.run_id).items():
        assert [s for s, _ in points] == (tested if name.startswith("test_") else [1, 2]), name
    # Epoch times are each process's own: the resumed run has only the epoch it ran; the
    # straight one has both, and train_seconds is their sum.
    resumed_times = client.get_metric_history(resumed.info.run_id, "epoch_seconds")
    assert [m.step for m in resumed_times] == [2] and resumed_times[0].value > 0
    straight_times = sorted((m.step, m.value) for m in client.get_metric_history(straight.info.run_id, "epoch_seconds"))
    assert [step for step, _ in straight_times] == [1, 2]
    straight_seconds = client.get_run(straight.info.run_id).data.metrics["train_seconds"]
    assert straight_seconds == pytest.approx(sum(v for _, v in straight_times))
    # The closing line splits this process's first epoch (compile warm-up) from the rest.
    (_, first), (_, second) = straight_times
    assert f"train_seconds {straight_seconds:.2f}: this process's first epoch {first:.2f} s, its other 1 {second:.2f} s" \
        in caplog.text
    assert "its other 0 " in resumed_log
    a, b = weights(client, resumed.info.run_id, tmp_path / "a"), weights(client, straight.info.run_id, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wait_for_checkpoint(root, process: subprocess.Popen, timeout_s: float = 240) -> int:
    """Poll until a checkpoint of at least one finished epoch exists; return its epoch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        for path in root.glob("*/last.pt"):
            epoch = checkpoints.load_checkpoint(path)["epoch"]
            if epoch >= 1:
                return epoch
        time.sleep(0.1)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_kill_9_mid_training_then_rerun_resumes_and_logs_each_epoch_once(tmp_path):
    epochs = 3
    data_dir = tmp_path / "data"
    write_data(data_dir, *synthetic(n_train=480, n_test=100), source="synthetic")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    checkpoints = tmp_path / "checkpoints"
    env = mlflow_run_env(uri, CIFAR10_CHECKPOINTS=str(checkpoints), CIFAR10_CHECKPOINT_INTERVAL="0")
    cmd = ["mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local", "-P", f"data={data_dir}",
           "-P", f"epochs={epochs}", "-P", "batch_size=32", "-P", "max_lr=0.05", "-P", "aug=none"]

    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        wait_for_checkpoint(checkpoints, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    [path] = checkpoints.glob("*/last.pt")
    killed_at = load_checkpoint(path)["epoch"]
    assert 1 <= killed_at < epochs

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{killed_at} of {epochs} epochs done" in second.stderr

    client = MlflowClient(tracking_uri=uri)
    killed_run, final_run = client.search_runs(["0"], order_by=["attributes.start_time ASC"])
    assert killed_run.info.status == "KILLED"  # marked by the rerun, which knew it dead
    assert final_run.info.status == "FINISHED"
    assert final_run.data.tags["resumed_from_epoch"] == str(killed_at)
    assert final_run.data.tags["resumed_from_run"] == killed_run.info.run_id
    for name, points in history(client, final_run.info.run_id).items():
        assert [step for step, _ in points] == list(range(1, epochs + 1)), name
    assert [a.path for a in client.list_artifacts(final_run.info.run_id, "weights")] == \
        ["weights/model_config.json", "weights/state_dict.pt"]
    assert not path.parent.exists()


def test_a_torn_or_foreign_checkpoint_is_refused_with_its_path(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    from steps.data import load_data
    from steps.errors import StepError
    from steps.checkpoints import checkpoint_key

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path))
    cfg = TrainConfig(epochs=1, batch_size=50, max_lr=0.1, aug="none")
    from steps.code_version import code_version

    key = checkpoint_key(cfg, load_data(str(synthetic_data_dir)).digest, code_version(), tracking_uri)
    path = tmp_path / key / "last.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(StepError, match=f"{path}: unreadable checkpoint .*delete it to start over"):
        with mlflow.start_run():
            train(cfg, str(synthetic_data_dir), device="cpu")
    checkpoints.save_checkpoint(path, {"format": 1, "key": "another"})
    with pytest.raises(StepError, match="another format or config"):
        with mlflow.start_run():
            train(cfg, str(synthetic_data_dir), device="cpu")


def test_retrying_retries_then_reports_without_raising(caplog):
    from steps.train import retrying

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("store away")

    retrying("flaky", flaky, attempts=4, delay_s=0)
    assert len(calls) == 3
    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionError("store gone")

    retrying("epoch 1 metrics", down, attempts=3, delay_s=0)
    assert len(calls) == 3
    assert "could not log epoch 1 metrics after 3 attempts (store gone); training continues" in caplog.text


def test_metric_logging_that_fails_mid_run_does_not_stop_training(synthetic_data_dir, tracking_uri, tmp_path,
                                                                  monkeypatch, caplog):
    """The tracking store refuses epoch 1's metrics for good: training goes on, says so, and
    still ends with its weights logged and epoch 2's metrics in the run."""
    from steps import train as train_step

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    real = mlflow.log_metrics

    def refuse_epoch_1(values, step=None, **kwargs):
        if step == 1:
            raise ConnectionError("tracking store unreachable")
        return real(values, step=step, **kwargs)

    monkeypatch.setattr(train_step.mlflow, "log_metrics", refuse_epoch_1)
    monkeypatch.setattr(train_step.time, "sleep", lambda s: None)  # no backoff waits in a test
    cfg = TrainConfig(epochs=2, batch_size=50, max_lr=0.05, aug="none")
    with mlflow.start_run() as run:
        train(cfg, str(synthetic_data_dir), device="cpu")
    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == [2]
    assert "could not log epoch 1 metrics" in caplog.text
    assert [f.path for f in client.list_artifacts(run.info.run_id, "weights")]


def test_epoch_metrics_are_written_off_the_training_thread_and_a_failed_write_again(
        synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    """Each epoch's metrics go to MLflow's background logging thread, so the loop never waits on
    the store; when that write fails (here epoch 1's, once), train writes them again at the end
    and the run still holds every epoch once."""
    import threading

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    real = SqlAlchemyStore.log_batch
    writers, failed = [], []

    def fail_epoch_1_once(self, run_id, metrics=(), params=(), tags=()):
        if any(m.key == "test_accuracy" for m in metrics):
            writers.append(threading.current_thread() is threading.main_thread())
            if not failed and any(m.step == 1 for m in metrics):
                failed.append(1)
                raise ConnectionError("tracking store unreachable")
        return real(self, run_id, metrics=metrics, params=params, tags=tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", fail_epoch_1_once)
    cfg = TrainConfig(epochs=2, batch_size=50, max_lr=0.05, aug="none")
    with mlflow.start_run() as run:
        train(cfg, str(synthetic_data_dir), device="cpu")
    # The first write came from the background thread and failed; the main thread wrote again
    # (the threads' later writes may come in either order, and MLflow may merge queued epochs).
    assert failed and writers[0] is False and True in writers
    for name, points in history(MlflowClient(), run.info.run_id).items():
        assert [step for step, _ in points] == [1, 2], name


def test_checkpoints_are_written_once_the_interval_has_passed(synthetic_data_dir, tracking_uri, tmp_path,
                                                              monkeypatch):
    from steps.errors import StepError

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    saved = []
    real_save = checkpoints.save_checkpoint
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda path, state: saved.append(state["epoch"]) or
                        real_save(path, state))
    cfg = TrainConfig(epochs=3, batch_size=50, max_lr=0.05, aug="none")
    for interval, expected in (("0", [1, 2, 3]), ("", []), ("3600", [])):  # "" = the default, 60 s
        saved.clear()
        monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", interval)
        with mlflow.start_run():
            train(cfg, str(synthetic_data_dir), device="cpu")
        assert saved == expected, interval
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", bad)
        with pytest.raises(StepError, match=f"CIFAR10_CHECKPOINT_INTERVAL is a number of seconds >= 0 .*got '{bad}'"):
            with mlflow.start_run():
                train(cfg, str(synthetic_data_dir), device="cpu")


def test_a_checkpoint_is_resumed_only_by_the_same_code_and_tracking_store(synthetic_data_dir, tracking_uri, tmp_path,
                                                                          monkeypatch):
    """After a fix to the code, or from another tracking store, the rerun of a command trains
    afresh instead of resuming weights trained by other code, or a run it cannot copy into."""
    from steps import train as train_step

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", "0")
    cfg = TrainConfig(model="fast_net_small", epochs=2, batch_size=50, max_lr=0.05, aug="none")
    real_save = checkpoints.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        raise Crash("killed after epoch 1")

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        with mlflow.start_run():
            train(cfg, str(synthetic_data_dir), device="cpu")
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)

    def resumed(run) -> bool:
        return "resumed_from_epoch" in MlflowClient().get_run(run.info.run_id).data.tags

    monkeypatch.setattr(train_step, "code_version", lambda: "the code after a fix")
    with mlflow.start_run() as other_code:
        train(cfg, str(synthetic_data_dir), device="cpu")
    monkeypatch.undo()  # the real code version again, and the checkpoint settings:
    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", "0")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'another.db'}")
    try:
        with mlflow.start_run() as other_store:
            train(cfg, str(synthetic_data_dir), device="cpu")
    finally:
        mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run() as same:
        train(cfg, str(synthetic_data_dir), device="cpu")
    assert not resumed(other_code)
    assert MlflowClient(f"sqlite:///{tmp_path / 'another.db'}").get_run(other_store.info.run_id).data.tags.get(
        "resumed_from_epoch") is None
    assert MlflowClient().get_run(same.info.run_id).data.tags["resumed_from_epoch"] == "1"
