"""Training to a time budget (steps.budget): the arithmetic that picks the epochs, the timing
that must leave the training as it found it, and a real `mlflow run` of train that keeps a
one-minute budget."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from mlflow.tracking import MlflowClient

from steps import budget, hardware, recipes, schedules
from steps.batches import num_batches
from steps.data import load_data, synthetic, write_data
from steps.errors import StepError
from steps.recipes import resolve_config
from steps.training import start_training, train_epoch, training_set
from tests.conftest import REPO, mlflow_run_env


@pytest.mark.parametrize("text, seconds", [("900", 900), ("90s", 90), ("15m", 900), ("15 min", 900),
                                           ("1.5h", 5400), ("1h30m", 5400), ("0", 0)])
def test_a_budget_is_read_in_seconds_or_with_a_unit(text, seconds):
    assert budget.parse_seconds(text) == seconds


@pytest.mark.parametrize("text", ["abc", "-5", "15x", "1e3", "m"])
def test_a_budget_that_is_not_a_duration_is_refused_in_one_line(text):
    with pytest.raises(StepError, match="not a duration") as caught:
        budget.parse_seconds(text)
    assert "\n" not in str(caught.value)


def test_epochs_and_a_budget_together_are_refused():
    with pytest.raises(StepError, match="not both"):
        resolve_config("cpu", {"epochs": 5, "time_budget": 60.0})
    assert resolve_config("cpu", {"time_budget": 60.0}).time_budget == 60.0


def test_the_most_epochs_that_fit_are_chosen_with_their_share_at_low_resolution():
    cfg = resolve_config("cpu", {"time_budget": 100.0, "test_every": 2})  # low_res 24 for 5/9 of the epochs
    pace = budget.Pace(step_seconds=0.1, low_res_step_seconds=0.05, test_seconds=0.05, probe_seconds=0.0)
    # 10 steps an epoch: 1 s at full size, 0.5 s at low resolution, plus a test pass after every 2nd and the last.
    assert budget.predicted_seconds(cfg, 9, 10, pace) == pytest.approx(5 * 0.5 + 4 * 1.0 + 5 * 0.05)
    fit = budget.fit_epochs(cfg, 10, pace, seconds_left=100.0)
    assert fit.test_every == 2  # its test passes take well under TEST_SHARE of the budget
    assert budget.predicted_seconds(cfg, fit.epochs, 10, pace) <= budget.FILL * 100
    assert budget.predicted_seconds(cfg, fit.epochs + 1, 10, pace) > budget.FILL * 100
    assert fit.low_res_epochs == math.floor(cfg.low_res_pct * fit.epochs + 1e-9) > 0
    # Twice the time left, about twice the epochs; none left, still one (with a warning).
    assert budget.fit_epochs(cfg, 10, pace, 200.0).epochs in range(2 * fit.epochs - 2, 2 * fit.epochs + 3)
    assert budget.fit_epochs(cfg, 10, pace, 0.1).epochs == 1


@pytest.mark.parametrize("given", [1, 3])
def test_test_passes_are_spaced_to_take_at_most_their_share_of_a_budget(given):
    cfg = resolve_config("cpu", {"time_budget": 100.0, "test_every": given})
    pace = budget.Pace(step_seconds=0.05, low_res_step_seconds=0.05, test_seconds=1.0, probe_seconds=0.0)
    fit = budget.fit_epochs(cfg, 10, pace, seconds_left=100.0)  # after each 0.5-s epoch, a pass would be 2/3 of the time
    at = replace(cfg, epochs=fit.epochs, test_every=fit.test_every)
    passes = sum(recipes.tests_after(at, e) for e in range(1, fit.epochs + 1))
    assert fit.test_every > given and passes * pace.test_seconds <= budget.TEST_SHARE * 100
    assert recipes.tests_after(at, fit.epochs)  # the weights logged are tested
    # The epochs that fit are counted with these passes, not one after each.
    assert budget.predicted_seconds(at, fit.epochs, 10, pace) <= budget.FILL * 100
    assert fit.epochs >= (budget.FILL - budget.TEST_SHARE) * 100 / 0.5 - 1  # a pass after each: 64
    assert f"every {fit.test_every} epochs" in fit.reason(100.0)
    # A test_every above what the share asks is kept.
    assert budget.fit_epochs(replace(cfg, test_every=1000), 10, pace, 100.0).test_every == 1000


def test_timing_the_steps_leaves_the_training_as_it_was(tmp_path):
    """A budget run must equal a run given the epochs it chose: the steps timed on the
    training's own model, optimizer, EMA and random stream are undone."""
    write_data(tmp_path / "data", *synthetic(n_train=256, n_test=64), source="synthetic")
    data = load_data(str(tmp_path / "data"))
    hw = hardware.hardware("cpu", "fp32")
    cfg = resolve_config("cpu", {"batch_size": 32, "epochs": 1})
    timed, untouched = start_training(cfg, data, hw), start_training(cfg, data, hw)
    train_set = training_set(data, timed.policy, hw)
    pace = budget.measure_pace(cfg, timed, train_set, data, hw)
    assert pace.step_seconds > 0 and pace.low_res_step_seconds > 0 and pace.test_seconds > 0

    steps = num_batches(len(data.train_y), cfg.batch_size, drop_last=True)
    results = []
    for training in (timed, untouched):
        scheduler = schedules.lambda_scheduler(training.optimizer,
                                               schedules.SCHEDULES[cfg.schedule](cfg, cfg.max_lr, cfg.epochs * steps))
        results.append(train_epoch(cfg, training, scheduler, 1, train_set, data, hw))
    assert results[0] == results[1]
    after, fresh = timed.result.state_dict(), untouched.result.state_dict()
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)


@pytest.mark.slow
def test_train_keeps_a_one_minute_budget_and_logs_the_epochs_it_chose(tmp_path, tracking_uri):
    # Epochs of a few seconds, as real ones are (minutes): each epoch's metrics go to the store
    # from a background thread that competes with the steps, which the timing does not see, so
    # a budget of hundreds of sub-second epochs overruns (README, "A time budget").
    write_data(tmp_path / "data", *synthetic(n_train=8000, n_test=200), source="synthetic")
    limit = 60.0
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
         "--experiment-name", "budget", "-P", f"data={tmp_path / 'data'}", "-P", "recipe=cpu",
         "-P", "batch_size=128", "-P", "time_budget=1m"],
        cwd=tmp_path, env=mlflow_run_env(tracking_uri), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("budget").experiment_id])
    epochs = int(run.data.params["epochs_resolved"])  # mlflow run logged epochs as "recipe": not given
    assert epochs > 1
    assert float(run.data.params["time_budget_seconds"]) == limit
    assert f"{epochs} epochs" in run.data.tags["budget_choice"]
    assert int(run.data.params["budget_low_res_epochs"]) == math.floor(5 / 9 * epochs + 1e-9)
    every = int(run.data.params["budget_test_every"])
    assert every >= 1 and (every == 1) == ("after every epoch" in run.data.tags["budget_choice"])
    # Every chosen epoch trained and logged once; the budget kept within 10%.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, epochs + 1))
    tested = [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == tested
    used = run.data.metrics["budget_used_seconds"]
    assert 0.9 * limit <= used <= 1.1 * limit, (used, run.data.tags["budget_choice"])
    assert run.data.metrics["train_seconds"] < used
