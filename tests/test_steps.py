"""find_lr, train and evaluate end to end through `mlflow run` on a tiny synthetic set, chained
as the main driver chains them (find_lr's suggestion feeds train, train's run feeds evaluate),
then inspected through MlflowClient. The three subprocesses run once for the module; the
in-process tests at the bottom cover the edges that need no subprocess."""

import subprocess

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from steps.data import synthetic, write_data
from tests.conftest import REPO, mlflow_run_env

EPOCHS = 2


def mlflow_run(entry_point: str, env: dict, cwd, **params) -> subprocess.CompletedProcess:
    cmd = ["mlflow", "run", str(REPO), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def only_run(client: MlflowClient, entry_point: str):
    runs = client.search_runs(["0"], filter_string=f"tags.`mlflow.project.entryPoint` = '{entry_point}'")
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """find_lr -> train (max_lr 0, lr_run = the find_lr run) -> evaluate, once."""
    tmp = tmp_path_factory.mktemp("steps")
    data_dir = tmp / "data"
    write_data(data_dir, *synthetic(n_train=160, n_test=100), source="synthetic")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = mlflow_run_env(uri, CIFAR10_CHECKPOINTS=str(tmp / "checkpoints"))
    client = MlflowClient(tracking_uri=uri)

    mlflow_run("find_lr", env, tmp, data=data_dir, recipe="reference", model="fast_net", batch_size=32, num_iter=20,
               aug="tensor")
    lr_run = only_run(client, "find_lr")
    train_out = mlflow_run("train", env, tmp, data=data_dir, recipe="reference", model="fast_net", epochs=EPOCHS,
                           batch_size=32, max_lr=0, lr_run=lr_run.info.run_id, aug="reference")
    train_run = only_run(client, "train")
    mlflow_run("evaluate", env, tmp, model_uri=train_run.info.run_id, data=data_dir)
    return {"client": client, "tmp": tmp, "data_dir": data_dir, "lr_run": lr_run, "train_run": train_run,
            "eval_run": only_run(client, "evaluate"), "train_stderr": train_out.stderr}


def artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.mark.slow
def test_find_lr_logs_a_suggestion_within_the_sweep_and_its_plot(pipeline):
    run = pipeline["lr_run"]
    assert run.info.status == "FINISHED"
    assert 1e-7 <= run.data.metrics["suggested_lr"] <= 10
    assert run.data.params["model"] == "fast_net" and run.data.params["num_iter"] == "20"
    assert run.data.params["data_digest"] == run.data.tags["data_digest"]
    assert artifacts(pipeline["client"], run.info.run_id) == {"plots/lr_range_test.png"}


@pytest.mark.slow
def test_train_takes_the_suggestion_and_logs_each_epoch_once(pipeline):
    client, run = pipeline["client"], pipeline["train_run"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert float(params["max_lr_used"]) == pipeline["lr_run"].data.metrics["suggested_lr"]
    assert params["max_lr_source"] == f"find_lr run {pipeline['lr_run'].info.run_id}"
    assert params["epochs"] == str(EPOCHS) and params["recipe"] == "reference"
    # Not passed to mlflow run: logged by it as `recipe` (not given), resolved by train as <name>_resolved.
    assert params["optimizer"] == "recipe" and params["optimizer_resolved"] == "sgd"
    assert params["whiten"] == "recipe" and params["whiten_resolved"] == "False"
    assert params["data_digest"] == pipeline["lr_run"].data.params["data_digest"]
    for name in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, EPOCHS + 1))
    assert artifacts(client, run.info.run_id) == {"weights/state_dict.pt", "weights/model_config.json",
                                                  "model_summary.txt"}
    # The network is also the run's LoggedModel, the pyfunc without calibration, and the run
    # records the sets it trained and tested on.
    logged = client.get_logged_model(run.data.tags["model_id"])
    assert logged.source_run_id == run.info.run_id and logged.name == "model"
    assert sorted(i.dataset.name for i in run.inputs.dataset_inputs) == ["cifar10-test", "cifar10-train"]
    summary_path = client.download_artifacts(run.info.run_id, "model_summary.txt", str(pipeline["tmp"]))
    assert "Total params: 1,972,792" in open(summary_path).read()
    assert "epoch 2/2: train loss" in pipeline["train_stderr"]  # one plain line per epoch off a terminal
    assert not (pipeline["tmp"] / "checkpoints" / run.data.tags["checkpoint_key"]).exists()  # removed when done


@pytest.mark.slow
def test_evaluate_logs_metrics_tables_and_plots(pipeline):
    client, run = pipeline["client"], pipeline["eval_run"]
    train_id = pipeline["train_run"].info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["train_run_id"] == train_id and run.data.params["model_uri"] == train_id
    assert run.data.params["data_digest"] == pipeline["train_run"].data.params["data_digest"]
    metrics = run.data.metrics
    # The same weights on the same test set give the same accuracy as train's last epoch.
    assert metrics["test_accuracy"] == pytest.approx(pipeline["train_run"].data.metrics["test_accuracy"])
    assert 0 <= metrics["test_accuracy_flip_tta"] <= 1 and np.isfinite(metrics["test_loss"])
    assert 0 <= metrics["test_accuracy_tta"] <= 1
    assert artifacts(client, run.info.run_id) == {
        "per_class_accuracy.csv", "ood.csv", "calibration.json", "plots/per_class_accuracy.png",
        "plots/confusion_matrix.png", "plots/misclassified.png", "plots/training_curves.png",
        "plots/reliability.png", "plots/ood_scores.png"}
    # Calibration: this data has no validation split, so a cross-fit on the test set, said in a tag.
    assert run.data.tags["calibration_split"] == "test_cross_fit"
    assert metrics["temperature"] > 0 and all(np.isfinite(metrics[k]) for k in (
        "test_nll", "test_nll_calibrated", "test_ece", "test_ece_calibrated"))
    assert metrics["test_nll"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    # unknown: its threshold, and its figures against every foreign source measured.
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "ood.csv", str(pipeline["tmp"])))
    sources = set(table["source"]) - {"cifar10_test"}
    assert {"noise", "flat", "gradient", "text"} <= sources and set(table["score"]) == {"max_probability", "energy"}
    for source in sources:
        assert 0 <= metrics[f"ood_auroc_{source}"] <= 1 and 0 <= metrics[f"ood_false_accept_{source}"] <= 1
    assert 0.9 <= metrics["unknown_accept_rate_test"] <= 1  # set on these very images: in-sample
    # The calibrated model is the run's LoggedModel, with every metric linked to it.
    logged = client.get_logged_model(run.data.tags["calibrated_model_id"])
    assert logged.source_run_id == run.info.run_id
    assert {"test_accuracy", "test_ece_calibrated", "unknown_threshold"} <= {m.key for m in logged.metrics}
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_class_accuracy.csv", str(pipeline["tmp"])))
    assert list(table.columns) == ["class", "correct", "total", "accuracy"]
    assert table["total"].sum() == 100
    assert table["correct"].sum() / 100 == pytest.approx(metrics["test_accuracy"])


# --- in-process edges ------------------------------------------------------------------------------------

def test_evaluate_resolves_run_ids_and_local_folders(tmp_path):
    from steps.evaluate import ModelSource, resolve_model
    from steps.errors import StepError

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model_config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "w")) == ModelSource(tmp_path / "w", "", "")
    with pytest.raises(StepError, match="no model_config.json"):
        resolve_model(str(tmp_path))


def test_train_refuses_unknown_choices_in_one_line(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    from steps.train import cli

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.chdir(tmp_path)

    for option, value, message in (("--aug", "mixup", "unknown augmentation 'mixup'; known: reference"),
                                   ("--optimizer", "lion", "unknown optimizer 'lion'; known: sgd, adam, adamw"),
                                   ("--model", "vgg", "unknown model 'vgg'; known models:"),
                                   ("--epochs", "2.5", "'2.5' is not a whole number")):
        result = CliRunner().invoke(cli, ["--data", str(synthetic_data_dir), option, value])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was written


@pytest.mark.parametrize("exc, tag", [
    (ValueError("\nbad value\n  at line 3"), "ValueError: bad value"),  # a bug keeps its type name
    (KeyError(), "KeyError"),
])
def test_a_failed_step_tags_its_run_with_the_errors_first_line(tracking_uri, exc, tag):
    import mlflow

    from steps.runtime import ERROR_TAG, step_command

    with pytest.raises(type(exc)), step_command() as run:
        raise exc
    assert MlflowClient().get_run(run.info.run_id).data.tags[ERROR_TAG] == tag
    assert mlflow.active_run() is None


def test_first_line_skips_leading_blank_lines():
    from steps.errors import StepError, first_line

    assert first_line(StepError("\n\n  disk full  \nmore")) == "disk full"
    assert first_line(StepError()) == ""


def test_find_lr_tests_the_configuration_train_will_use(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    """find_lr with the cpu recipe sweeps the whitened network with the recipe's optimizer
    (Muon on the conv filters), label smoothing and batch size, as train would build them."""
    from mlflow.tracking import MlflowClient

    from steps import find_lr as find_lr_step
    from steps.optim import MuonSGD

    seen = {}
    real = find_lr_step.range_test

    def spy(model, optimizer, data, **kwargs):
        seen.update(model=model, optimizer=optimizer, **kwargs)
        return real(model, optimizer, data, **{**kwargs, "num_iter": 5})

    monkeypatch.setattr(find_lr_step, "range_test", spy)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(find_lr_step.cli, ["--data", str(synthetic_data_dir), "--recipe", "cpu",
                                                   "--batch-size", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert isinstance(seen["optimizer"], MuonSGD) and not seen["model"].whiten.weight.requires_grad
    assert (seen["batch_size"], seen["label_smoothing"], seen["aug"]) == (32, 0.05, "altflip_translate")
    [run] = MlflowClient().search_runs(["0"])
    assert (run.data.params["optimizer"], run.data.params["whiten"], run.data.params["model"]) == (
        "muon", "True", "fast_net_small")
