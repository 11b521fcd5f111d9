"""The main driver end to end: real `mlflow run .` subprocesses on a real SQLite registry."""

import subprocess
import time

import pytest

from tests.conftest import REPO, mlflow_run_env

pytestmark = pytest.mark.slow

NAME = "cifar10-classifier"
# Tiny and quick: a fixed LR skips find_lr, which main runs only when max_lr is 0.
BASE = {"source": "synthetic", "models": "fast_net", "epochs": "2", "batch_size": "64", "max_lr": "0.05",
        "train_limit": "200", "test_limit": "100", "aug": "tensor"}


def run_main(tmp_path, tracking_uri, env: dict | None = None, **overrides) -> subprocess.CompletedProcess:
    params = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
    cmd = ["mlflow", "run", str(REPO), "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = mlflow_run_env(tracking_uri, CIFAR10_CHECKPOINTS=str(tmp_path / "checkpoints"), **(env or {}))
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def children(client, parent_id: str, experiment_id: str = "0") -> dict[str, object]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["mlflow.project.entryPoint"]: r for r in runs}


def latest_driver(client, experiment_id: str = "0"):
    return client.search_runs([experiment_id], filter_string="tags.`mlflow.project.entryPoint` = 'main'",
                              order_by=["attributes.start_time DESC"])[0]


def test_pipeline_registers_reuses_and_reports_failures(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    # MLFLOW_EXPERIMENT_ID, as MLflow documents it, puts the parent and every step in that
    # experiment (the test below does the same for MLFLOW_EXPERIMENT_NAME).
    team = client.create_experiment("cifar-team")
    env = {"MLFLOW_EXPERIMENT_ID": team}
    first = run_main(tmp_path, tracking_uri, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert client.search_runs(["0"]) == []  # nothing landed in the default experiment
    driver = latest_driver(client, team)
    steps = children(client, driver.info.run_id, team)
    assert set(steps) == {"download_data", "train", "evaluate"}  # no find_lr: max_lr was given
    assert all(r.info.status == "FINISHED" for r in steps.values())
    v1 = client.get_model_version_by_alias(NAME, "champion")
    assert v1.tags["train_run_id"] == steps["train"].info.run_id
    assert float(v1.tags["test_accuracy"]) == pytest.approx(steps["evaluate"].data.metrics["test_accuracy"], abs=1e-6)
    assert float(v1.tags["val_accuracy"]) == pytest.approx(steps["evaluate"].data.metrics["val_accuracy"], abs=1e-6)
    assert "challenger" in v1.aliases
    # auto on a machine without CUDA: the cpu recipe, said in the log and recorded.
    assert "recipe auto -> cpu (no CUDA device" in first.stderr and driver.data.tags["recipe"] == "cpu"
    assert steps["train"].data.params["recipe"] == "cpu"
    # MLflow 3's model-centric record: the version is the LoggedModel evaluate logged (train's
    # network with its calibration), and evaluate's metrics are linked to it.
    model_id = steps["evaluate"].data.tags["calibrated_model_id"]
    assert v1.source == f"models:/{model_id}" and v1.run_id == steps["evaluate"].info.run_id
    linked = {m.key for m in client.get_logged_model(model_id).metrics}
    assert {"test_accuracy", "val_accuracy", "test_ece_calibrated", "unknown_threshold"} <= linked
    assert steps["evaluate"].data.tags["calibration_split"] == "validation"
    # evaluate takes the registry's URIs, and knows which training run and logged model they name.
    from steps.evaluate import resolve_model

    champion = resolve_model(f"models:/{NAME}@champion")
    assert (champion.train_run_id, champion.model_id) == (steps["train"].info.run_id, model_id)
    assert (champion.folder / "state_dict.pt").is_file()
    # Its model card, and the line its promotion left there.
    for section in ("# cifar10-classifier v1: fast_net", "## Accuracy on 100 test images", "## Calibration",
                    "## `unknown`", "| noise |", "## Runs", steps["train"].info.run_id, "## Intended use and limits"):
        assert section in v1.description, section
    assert "Became champion on " in v1.description and ": promoted: " in v1.description

    # The same command again: every step is reused, nothing retrained; a new version is
    # registered and, being no better than the champion on the same test data, stays challenger.
    second = run_main(tmp_path, tracking_uri, env)
    assert second.returncode == 0, second.stderr[-3000:]
    for step in ("download_data", "train", "evaluate"):
        assert f"{step}: reusing finished run" in second.stderr
    assert children(client, latest_driver(client, team).info.run_id, team) == {}
    v2 = client.get_model_version_by_alias(NAME, "challenger")
    assert int(v2.version) == int(v1.version) + 1
    assert client.get_model_version_by_alias(NAME, "champion").version == v1.version
    assert v2.tags["champion_decision"].startswith("kept:") and "val accuracy on 200 images" in v2.tags["champion_decision"]
    assert "## Calibration" in v2.description and "Became champion" not in v2.description

    # The same command without epochs: the recipe's epochs, another training, so the finished
    # 2-epoch train must not be reused (nor the evaluate of its model).
    third = run_main(tmp_path, tracking_uri, env, epochs=None)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "download_data: reusing finished run" in third.stderr
    assert "train: reusing" not in third.stderr and "evaluate: reusing" not in third.stderr
    assert set(children(client, latest_driver(client, team).info.run_id, team)) == {"train", "evaluate"}

    # A step that fails while it runs (a peak LR that overflows, which no check before the
    # run can see): its own message heads the driver's error, and the driver fails.
    bad = run_main(tmp_path, tracking_uri, env, max_lr="1e30")
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("Error: train failed:")]
    assert len(errors) == 1 and "training loss became" in errors[0] and "lower max_lr" in errors[0]
    assert "download_data: reusing finished run" in bad.stderr  # it picked up after the finished step
    assert latest_driver(client, team).info.status == "FAILED"


def test_unknown_model_is_refused_before_any_step(tmp_path, tracking_uri):
    result = run_main(tmp_path, tracking_uri, models="fast_net,no_such_net")
    assert result.returncode != 0
    assert "Error: unknown model(s) no_such_net; known: custom_resnet, fast_net, fast_net_small, resnet18, separable_net" in result.stderr


def test_step_params_pass_the_recipe_and_only_the_options_given():
    from steps.main import PipelineConfig, step_params

    # The reference recipe has no fixed LR: find_lr runs, with the recipe, so on the network,
    # optimizer and batches train will use.
    train, find_lr = step_params("custom_resnet", "runs:/d/data", "reference", PipelineConfig())
    assert train == {"data": "runs:/d/data", "recipe": "reference", "model": "custom_resnet", "seed": 0}
    assert find_lr == {"data": "runs:/d/data", "recipe": "reference", "model": "custom_resnet", "seed": 0}
    # cpu has its own LR: no find_lr; an option given to main reaches train, the rest do not.
    train, find_lr = step_params("fast_net", "d", "cpu", PipelineConfig(epochs=1))
    assert find_lr is None and train["recipe"] == "cpu" and train["epochs"] == 1
    assert "batch_size" not in train and "max_lr" not in train
    # max_lr 0 given over a recipe that has one: find_lr on the cpu recipe (Muon, whitening).
    _, find_lr = step_params("fast_net", "d", "cpu", PipelineConfig(max_lr=0.0, batch_size=256))
    assert find_lr == {"data": "d", "recipe": "cpu", "model": "fast_net", "seed": 0, "batch_size": 256}
    # A time budget reaches train only (it chooses the epochs), and not when off.
    train, find_lr = step_params("fast_net", "d", "cpu", PipelineConfig(time_budget=900.0, max_lr=0.0))
    assert train["time_budget"] == 900.0 and "time_budget" not in find_lr
    assert "time_budget" not in step_params("fast_net", "d", "cpu", PipelineConfig())[0]


def test_reuse_needs_every_parameter_of_the_entry_point_equal(tracking_uri):
    """A finished run is reused only when all the entry point's parameters match, those left at
    their defaults included: a run given epochs=1 is no match for a command that left epochs to
    the recipe, and the reverse."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from steps.main import CODE_TAG, all_params, as_logged, find_finished

    client = MlflowClient()
    short = all_params("train", {"data": "runs:/d/data", "recipe": "cpu", "model": "fast_net_small", "epochs": 1})
    full = all_params("train", {"data": "runs:/d/data", "recipe": "cpu", "model": "fast_net_small"})
    assert full["epochs"] == "recipe" and full["lr_run"] == "none" and len(full) == len(short)
    with mlflow.start_run(tags={"mlflow.project.entryPoint": "train", CODE_TAG: "c1"}) as run:
        mlflow.log_params(as_logged(short))
    assert find_finished(client, "0", "train", as_logged(short), "c1").info.run_id == run.info.run_id
    assert find_finished(client, "0", "train", as_logged(full), "c1") is None
    assert find_finished(client, "0", "train", as_logged(short), "other code") is None
    with pytest.raises(ValueError, match="no parameter"):
        all_params("train", {"epoch": 1})


def same_step_run(client, params: dict[str, str], start_time: int, status: str | None = None) -> str:
    """A download_data run with these parameters as main tags its steps, created at start_time
    (ms) and, with status, ended at once."""
    from steps.main import CODE_TAG

    run = client.create_run("0", start_time=start_time, tags={"mlflow.project.entryPoint": "download_data",
                                                              CODE_TAG: "c1"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_of_identical_finished_runs_the_earliest_created_is_reused(tracking_uri):
    """Two users who ran the same step at once both go on from the run created first, and so
    does every later command: what follows it is then reused for both."""
    from mlflow.tracking import MlflowClient

    from steps.main import all_params, as_logged, find_finished

    client = MlflowClient()
    params = as_logged(all_params("download_data", {"source": "synthetic"}))
    now = int(time.time() * 1000)
    runs = [same_step_run(client, params, now + offset, "FINISHED") for offset in (2000, 0, 1000)]
    same_step_run(client, params, now - 1000, "FAILED")
    assert find_finished(client, "0", "download_data", params, "c1").info.run_id == runs[1]


def test_a_step_goes_on_from_an_identical_run_started_before_it_once_that_finishes(tracking_uri):
    """go_on_from: an identical run created before ours and still running is waited for, and
    gone on from if it finishes; not if it fails, if it is too old to be running still (its
    processes were killed without ending it), or if it outlasts our own step's time (or the
    minimum wait, for a step that took less)."""
    import threading

    from mlflow.tracking import MlflowClient

    from steps.main import all_params, as_logged, go_on_from

    client = MlflowClient()
    now = int(time.time() * 1000)

    def scenario(source: str, earlier_ms: int, end_with: str | None, took_s: float,
                 min_wait_s: float = 0) -> tuple[bool, float]:
        """(whether the earlier run was chosen, seconds waited)."""
        params = as_logged(all_params("download_data", {"source": source}))
        earlier = same_step_run(client, params, now - earlier_ms)
        own = same_step_run(client, params, now, "FINISHED")
        if end_with:
            threading.Timer(1.0, client.set_terminated, (earlier, end_with)).start()
        started = time.monotonic()
        chosen = go_on_from(client, "0", "download_data", params, "c1", own, took_s=took_s, poll_s=0.1,
                            min_wait_s=min_wait_s)
        assert chosen in (earlier, own)
        return chosen == earlier, time.monotonic() - started

    chosen, waited = scenario("finishes", 500, "FINISHED", took_s=30)
    assert chosen and 0.9 < waited < 10
    chosen, waited = scenario("fails", 500, "FAILED", took_s=30)
    assert not chosen and 0.9 < waited < 10
    chosen, waited = scenario("killed an hour ago", 3_600_000, None, took_s=30)
    assert not chosen and waited < 5
    chosen, waited = scenario("outlasts us", 500, None, took_s=1.5)
    assert not chosen and 1.4 < waited < 10
    # A step that took a tenth of a second still waits up to min_wait_s for one started before it.
    chosen, waited = scenario("slower start-up", 500, "FINISHED", took_s=0.1, min_wait_s=30)
    assert chosen and 0.9 < waited < 10


def test_mlflow_experiment_name_puts_the_whole_pipeline_in_that_experiment(tmp_path, tracking_uri):
    """It made every step refuse to start ("Specify only one of 'experiment-name' or
    'experiment-id'"), as main starts them by experiment ID."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.create_experiment("cifar-team")
    result = run_main(tmp_path, tracking_uri, env={"MLFLOW_EXPERIMENT_NAME": "cifar-team"}, epochs=1)
    assert result.returncode == 0, result.stderr[-3000:]
    driver = latest_driver(client, experiment_id)
    assert set(children(client, driver.info.run_id, experiment_id)) == {"download_data", "train", "evaluate"}
    assert client.search_runs(["0"]) == []  # nothing landed in the default experiment


@pytest.mark.parametrize("overrides, error", [
    ({"recipe": "turbo"}, "unknown recipe 'turbo'; known: auto, reference, fast, cpu"),
    # The cpu recipe's first epochs are 24x24, which custom_resnet's last pool cannot take.
    ({"recipe": "cpu", "models": "fast_net_small,custom_resnet"}, "custom_resnet cannot take 24x24 images"),
    ({"epochs": "3", "time_budget": "15m"}, "give epochs or a time budget, not both"),
])
def test_a_config_train_would_refuse_is_refused_before_any_step(tmp_path, tracking_uri, overrides, error):
    result = run_main(tmp_path, tracking_uri, **overrides)
    assert result.returncode != 0
    assert f"Error: {error}" in result.stderr
    assert "download_data: starting" not in result.stderr
