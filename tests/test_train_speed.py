"""benchmarks/train_speed.py: smoke runs (synthetic data; a raw archive with MLflow and albumentations
unimportable), the network it trains against train's, and its one-line error for a missing archive."""

import json

import pytest

from benchmarks import train_speed


def test_train_speed_smoke_on_cpu(synthetic_data_dir, tmp_path):
    out = tmp_path / "speed.json"
    result = train_speed.main(["--data", str(synthetic_data_dir), "--recipe", "cpu", "--seeds", "1",
                               "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    (row,) = saved["seeds"]
    assert row["train_seconds"] > 0 and 0 <= row["test_accuracy_tta"] <= 1
    assert saved["config"]["epochs"] == 1 and saved["config"]["whiten"] and saved["compile_warmup_seconds"] is None
    assert saved["summary"]["test_accuracy"]["median"] == row["test_accuracy"]
    assert saved["command"].startswith("python benchmarks/train_speed.py --data")


def test_train_speed_runs_from_an_archive_without_mlflow_or_albumentations(tmp_path):
    """The GPU machines this benchmark is for have torch but not MLflow, albumentations or
    torchinfo: with those made unimportable, it still trains from the raw archive."""
    import subprocess
    import sys

    from steps import data as D
    from tests.conftest import REPO
    from tests.test_download_data import make_archive

    archive = make_archive(tmp_path / D.ARCHIVE_NAME)
    out = tmp_path / "speed.json"
    args = ["--data", str(archive), "--recipe", "cpu", "--seeds", "1", "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--out", str(out)]
    code = ("import runpy, sys\n"
            "sys.modules.update(dict.fromkeys(['mlflow', 'albumentations', 'cv2', 'torchinfo']))\n"
            f"sys.argv = ['train_speed.py', *{args!r}]\n"
            "runpy.run_path('benchmarks/train_speed.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["data"]["train_size"] == 5 * 30 and saved["data"]["source"] == str(archive)
    assert 0 <= saved["seeds"][0]["test_accuracy"] <= 1


def test_the_benchmark_trains_the_network_train_logs(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    """What the benchmark times is train's training: for one config (whitening with its bias
    frozen after epoch 1, EMA, a low-res first epoch, Muon) on the same data, its network is
    bit for bit the one train logs."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from steps import hardware
    from steps.augment import build_policy
    from steps.data import load_data
    from steps.recipes import TrainConfig
    from steps.training import training_set
    from steps.train import train

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    cfg = TrainConfig(epochs=2, batch_size=50, max_lr=0.05, optimizer="muon", aug="flip_translate",
                      schedule="warmup_linear", whiten=True, ema=0.9, low_res=24, low_res_pct=0.5,
                      whiten_bias_epochs=1)
    with mlflow.start_run() as run:
        train(cfg, str(synthetic_data_dir), device="cpu")
    logged = torch.load(MlflowClient().download_artifacts(run.info.run_id, "weights/state_dict.pt", str(tmp_path)),
                        weights_only=True)

    hw = hardware.hardware("cpu")
    data = load_data(str(synthetic_data_dir))
    net, _ = train_speed.train_seed(cfg, data, hw, training_set(data, build_policy(cfg.aug, data.mean), hw))
    timed = net.state_dict()
    assert timed.keys() == logged.keys() and all(torch.equal(timed[k], logged[k]) for k in timed)


def test_read_data_takes_an_archive_as_a_path_or_a_file_url(tmp_path):
    from steps import data as D
    from tests.test_download_data import make_archive

    archive = make_archive(tmp_path / D.ARCHIVE_NAME)
    by_path, by_url = train_speed.read_data(str(archive)), train_speed.read_data(archive.as_uri())
    assert by_url.digest == by_path.digest and len(by_url.train_y) == 5 * 30
    assert by_url.source == str(archive)


def test_train_speed_refuses_a_missing_archive_in_one_line(tmp_path):
    missing = tmp_path / "nowhere.tar.gz"
    with pytest.raises(SystemExit) as stopped:
        train_speed.main(["--data", str(missing), "--recipe", "cpu", "--out", str(tmp_path / "x.json")])
    assert str(stopped.value) == f"error: {missing}: no such file or folder"
    assert not (tmp_path / "x.json").exists()


def test_augment_workers_reach_the_pool_and_leave_the_network_unchanged(synthetic_data_dir, tmp_path, monkeypatch):
    """--augment-workers overrides train's choice (none on a CPU) for a per-image policy, so
    the pool's speed can be set against one process on a GPU machine; the network is the same."""
    from steps import batches

    seen = []
    real = batches.iterate_batches

    def spy(*args, **kwargs):
        seen.append(kwargs["workers"])
        return real(*args, **kwargs)

    monkeypatch.setattr(batches, "iterate_batches", spy)
    common = ["--data", str(synthetic_data_dir), "--recipe", "reference", "--max-lr", "0.05", "--seeds", "1",
              "--epochs", "1", "--batch-size", "50", "--device", "cpu"]
    pooled = train_speed.main([*common, "--augment-workers", "2", "--out", str(tmp_path / "2.json")])
    alone = train_speed.main([*common, "--out", str(tmp_path / "0.json")])
    assert seen == [2, 0] and (pooled["augment_workers"], alone["augment_workers"]) == (2, 0)
    assert pooled["seeds"][0]["test_accuracy_tta"] == alone["seeds"][0]["test_accuracy_tta"]
    with pytest.raises(SystemExit, match="--augment-workers must be 0 or more, got -1"):
        train_speed.main([*common, "--augment-workers", "-1", "--out", str(tmp_path / "bad.json")])
