"""main: the whole pipeline, raw data to a registered model with `champion` decided.

Runs download_data, then for each model find_lr (only when the recipe's max_lr, or the one
given, is 0), train and evaluate, each as its own MLflow run nested under this one and started
through the MLflow Projects API with this run's environment manager. A step is reused instead of
run again only when a finished run of it has every one of its entry point's parameters equal
(so recipe values left to the recipe match only runs that left them too), the same code and
the same upstream runs. The candidate with the best validation accuracy is registered as a new
version of `registered_model` (the LoggedModel its evaluate run logged: train's network with the
calibration evaluate fitted) with the alias `challenger`, its description a model card
(steps.model_card), and `champion` moves to it only if it beats the current champion on the
same validation images by more than the promotion margin (steps.registry), which the card
of the new champion then records.

recipe `auto` picks `fast` where a CUDA device trains and `cpu` elsewhere; models not given are
the recipe's own.
"""

import logging
import os
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cache

import click
import mlflow
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from cifar_models import list_models
from steps import distributed, registry
from steps.artifacts import (CALIBRATED_MODEL_TAG, DATA_DIR, OOD_CSV, PER_CLASS_CSV, TEST_ACCURACY_METRIC,
                             VAL_ACCURACY_METRIC)
from steps.code_version import CODE_TAG, PROJECT_DIR, code_version
from steps.data import load_data
from steps.download_data import VAL_SIZE
from steps.errors import StepError
from steps.model_card import CardInputs, model_card
from steps.lifeline import name_main, wait_or_stop
from steps.options import DURATION, WHOLE, OrNotGiven, log_params
from steps.runtime import ERROR_TAG, step_command
from steps.recipes import TrainConfig, choose_recipe, recipe_model, resolve_config, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    source: str = "cifar10"  # download_data's source: cifar10, synthetic, or a local copy
    models: tuple[str, ...] = ()  # architectures to train and compare; () = the recipe's model
    recipe: str = "auto"  # train's preset (steps.recipes.RECIPES); auto = fast on CUDA, cpu elsewhere
    # None = the recipe's value; one given here wins over the recipe, for every model.
    epochs: int | None = None
    batch_size: int | None = None
    max_lr: float | None = None  # 0 = run find_lr for each model and take its suggestion
    aug: str | None = None  # augmentation policy name, see steps.augment
    time_budget: float = 0.0  # seconds for each training, its epochs chosen to fit (steps.budget); 0 = off
    seed: int = 0
    train_limit: int = 0  # class-balanced subset sizes, 0 = all
    test_limit: int = 0
    val_size: int = VAL_SIZE  # training images held out to choose and promote on; 0 = none (then the test set decides)
    registered_model: str = "cifar10-classifier"
    env_manager: str = "local"  # passed on to every step: children do not inherit it
    nproc_per_node: int = 1  # train's processes on this machine, one per GPU; > 1: data-parallel (steps.distributed)


@cache
def entry_point_defaults(entry_point: str) -> dict[str, str]:
    """The parameters MLproject declares for an entry point, with their defaults ("" when none)."""
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"][entry_point]["parameters"]
    return {name: "" if not isinstance(p, dict) or p.get("default") is None else str(p["default"])
            for name, p in spec.items()}


def all_params(entry_point: str, params: dict[str, object]) -> dict[str, str]:
    """Every parameter of the entry point: the ones given, the declared defaults for the rest."""
    unknown = params.keys() - entry_point_defaults(entry_point).keys()
    if unknown:
        raise ValueError(f"{entry_point} has no parameter(s) {sorted(unknown)}")
    return {**entry_point_defaults(entry_point), **{k: str(v) for k, v in params.items()}}


def as_logged(params: dict[str, str]) -> dict[str, str]:
    """The parameters as `mlflow run` logs them: shell-quoted where the shell needs it."""
    return {k: shlex.quote(v) for k, v in params.items()}


# Runs of one step are ordered by when they were created, not by when they finished: a run's
# end time is taken by its process before the store has it, so a user can choose before the
# run that ended first shows as ended. Creation times are in the store long before either ends.
def _created(run) -> tuple[int, str]:
    return run.info.start_time, run.info.run_id


def same_step_runs(client: MlflowClient, experiment_id: str, entry_point: str, params: dict[str, str], code: str,
                   status: str | None = None) -> list:
    """The runs of this entry point with exactly these parameters (every one the entry point
    declares, as as_logged gives them) and this code, oldest first; only those in `status` if given."""
    query = f"tags.`mlflow.project.entryPoint` = '{entry_point}' and tags.`{CODE_TAG}` = '{code}'"
    if status:
        query += f" and attributes.status = '{status}'"
    runs = client.search_runs([experiment_id], filter_string=query)
    return sorted((run for run in runs if all(run.data.params.get(k) == v for k, v in params.items())), key=_created)


def find_finished(client: MlflowClient, experiment_id: str, entry_point: str, params: dict[str, str], code: str):
    """The earliest-created finished run of this entry point with these parameters and code, or
    None: the one that users who ran the same step at once all go on from (go_on_from)."""
    return next(iter(same_step_runs(client, experiment_id, entry_point, params, code, "FINISHED")), None)


def go_on_from(client: MlflowClient, experiment_id: str, entry_point: str, params: dict[str, str], code: str,
               own_run_id: str, took_s: float, poll_s: float = 1.0, min_wait_s: float = 60.0) -> str:
    """The run to go on from once our own run of the step has finished: the earliest-created
    finished one, which a later command's find_finished reuses too. An identical run created
    before ours and still running is waited for, since it wins if it finishes: for as long as
    our step took (at least min_wait_s, as a short step's time is mostly start-up, which a busy
    host stretches), and only if it was created within that long before ours (an older one is
    a step whose processes were killed without ending its run)."""
    wait_s = max(took_s, min_wait_s)
    deadline = time.monotonic() + wait_s
    own = client.get_run(own_run_id)
    window_start = own.info.start_time - wait_s * 1000
    waited_for = None
    while True:
        earlier = [run for run in same_step_runs(client, experiment_id, entry_point, params, code)
                   if _created(run) < _created(own)]
        running = None
        for run in earlier:
            if run.info.status == "FINISHED":
                return run.info.run_id
            if run.info.status in ("RUNNING", "SCHEDULED") and run.info.start_time >= window_start:
                running = run.info.run_id
                break
        if running is None or time.monotonic() >= deadline:
            return own_run_id
        if running != waited_for:
            log.info("%s: waiting for run %s of the same step, started before this one", entry_point, running)
            waited_for = running
        time.sleep(poll_s)


def run_step(entry_point: str, params: dict, cfg: PipelineConfig, code: str) -> str:
    """Run one entry point as a child of the active run, or reuse an identical finished one.
    Returns the run ID; a failed step raises StepError with that step's own message first.
    Stopping main stops the step too, and leaves its run KILLED (steps.lifeline)."""
    client = MlflowClient()
    experiment_id = mlflow.active_run().info.experiment_id
    params = all_params(entry_point, params)
    done = find_finished(client, experiment_id, entry_point, as_logged(params), code)
    if done is not None:
        log.info("%s: reusing finished run %s (same parameters, code %s and inputs)", entry_point, done.info.run_id, code)
        return done.info.run_id
    log.info("%s: starting with %s", entry_point, params)
    # The step is put in this run's experiment by ID; an MLFLOW_EXPERIMENT_NAME it inherited
    # beside that ID makes its `mlflow run` refuse to start ("Specify only one of ...").
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    name_main()
    started = time.monotonic()
    submitted = mlflow.projects.run(str(PROJECT_DIR), entry_point=entry_point, parameters=params,
                                    env_manager=cfg.env_manager, experiment_id=experiment_id, synchronous=False)
    client.set_tag(submitted.run_id, CODE_TAG, code)
    if not wait_or_stop(submitted, entry_point):
        tags = client.get_run(submitted.run_id).data.tags
        reason = tags.get(ERROR_TAG, "see the step's output above")
        raise StepError(f"{entry_point} failed: {reason} (run {submitted.run_id}); run main again to resume from this step")
    # Another user of the same store may have run the same step at the same time: all go on
    # from one run, as a later command will, so that what follows is reused.
    chosen = go_on_from(client, experiment_id, entry_point, as_logged(params), code, submitted.run_id,
                        took_s=time.monotonic() - started)
    if chosen != submitted.run_id:
        log.info("%s: run %s of the same step was started first; going on from it", entry_point, chosen)
    return chosen


def main_options(cfg: PipelineConfig) -> dict[str, object]:
    """The train options main passes on; None = not given, the recipe's."""
    return {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_lr": cfg.max_lr, "aug": cfg.aug,
            "time_budget": cfg.time_budget or None}


def train_config(model: str, recipe: str, cfg: PipelineConfig) -> TrainConfig:
    """The config train will resolve for this model from the recipe and main's options."""
    return resolve_config(recipe, {"model": model, **main_options(cfg)})


def step_params(model: str, data_uri: str, recipe: str, cfg: PipelineConfig) -> tuple[dict, dict | None]:
    """(train's parameters, find_lr's or None when the resolved recipe has a fixed max_lr).

    Both get the recipe and only the options given to main, so that they resolve them as train
    would from the command line, and a run is reused only by a command that left the same
    options to the recipe (run_step compares every parameter). find_lr so runs the configuration
    train will train: its optimizer, label smoothing, whitening and BatchNorm settings."""
    given = {k: v for k, v in main_options(cfg).items() if v is not None}
    resolved = train_config(model, recipe, cfg)
    train_params = {"data": data_uri, "recipe": recipe, "model": model, "seed": cfg.seed, **given}
    if cfg.nproc_per_node != 1:
        train_params["nproc_per_node"] = cfg.nproc_per_node
    if resolved.max_lr > 0:
        return train_params, None
    find_lr_params = {k: v for k, v in train_params.items() if k not in ("max_lr", "epochs", "time_budget")}
    return train_params, find_lr_params


def train_and_evaluate(model: str, data_run: str, recipe: str, cfg: PipelineConfig, code: str) -> registry.Candidate:
    data_uri = f"runs:/{data_run}/{DATA_DIR}"
    train_params, find_lr_params = step_params(model, data_uri, recipe, cfg)
    if find_lr_params is not None:
        train_params["lr_run"] = run_step("find_lr", find_lr_params, cfg, code)
    train_run = run_step("train", train_params, cfg, code)
    eval_run = run_step("evaluate", {"model_uri": train_run, "data": data_uri}, cfg, code)
    metrics = MlflowClient().get_run(eval_run).data.metrics
    candidate = registry.Candidate(model, metrics[TEST_ACCURACY_METRIC], train_run, eval_run,
                                   metrics.get(VAL_ACCURACY_METRIC))
    log.info("%s: validation accuracy %s, test accuracy %.4f (train run %s, evaluate run %s)", model,
             "-" if candidate.val_accuracy is None else f"{candidate.val_accuracy:.4f}",
             candidate.test_accuracy, train_run, eval_run)
    return candidate


def choose(candidates: list[registry.Candidate]) -> registry.Candidate:
    """The candidate with the best validation accuracy; the test set decides only when the data
    has no validation split (val_size 0), and the log says so."""
    if all(c.val_accuracy is not None for c in candidates):
        return max(candidates, key=lambda c: c.val_accuracy)
    log.warning("no validation split (val_size 0): choosing and promoting on the test set, which then "
                "overstates the chosen model's accuracy")
    return max(candidates, key=lambda c: c.test_accuracy)


def card_for(client: MlflowClient, name: str, version: str, best: registry.Candidate, data_run: str,
             source: str) -> str:
    """The model card of a version registered from best's runs (steps.model_card)."""
    with tempfile.TemporaryDirectory() as tmp:
        tables = {f: pd.read_csv(mlflow.artifacts.download_artifacts(run_id=best.eval_run_id, artifact_path=f,
                                                                     dst_path=tmp)) for f in (PER_CLASS_CSV, OOD_CSV)}
    return model_card(CardInputs(name, version, client.get_run(best.train_run_id), client.get_run(best.eval_run_id),
                                 tables[PER_CLASS_CSV], tables[OOD_CSV], data_run,
                                 mlflow.active_run().info.run_id, source))


def register(best: registry.Candidate, data_run: str, cfg: PipelineConfig) -> tuple[str, bool]:
    """Register the calibrated model best's evaluate run logged as a new version with
    `challenger` and its model card, and decide on `champion`. Returns (version, became champion)."""
    client = MlflowClient()
    data = load_data(f"runs:/{data_run}/{DATA_DIR}")
    model_id = client.get_run(best.eval_run_id).data.tags.get(CALIBRATED_MODEL_TAG)
    if not model_id:
        raise StepError(f"evaluate run {best.eval_run_id} logged no model (no {CALIBRATED_MODEL_TAG} tag)")
    version = mlflow.register_model(f"models:/{model_id}", cfg.registered_model)
    tags = {"test_accuracy": repr(best.test_accuracy), "model": best.model, "data_digest": data.digest,
            "test_digest": data.test_digest, "train_run_id": best.train_run_id, "eval_run_id": best.eval_run_id,
            "data_run_id": data_run, "pipeline_run_id": mlflow.active_run().info.run_id}
    if best.val_accuracy is not None:
        tags.update(val_accuracy=repr(best.val_accuracy), val_digest=data.val_digest)
        score = registry.Score(best.val_accuracy, "val", data.val_digest, len(data.val_y))
        images = (data.val_x, data.val_y)
    else:
        score = registry.Score(best.test_accuracy, "test", data.test_digest, len(data.test_y))
        images = (data.test_x, data.test_y)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registered_model, version.version, key, value)
    client.update_model_version(cfg.registered_model, version.version,
                                description=card_for(client, cfg.registered_model, version.version, best, data_run,
                                                     data.source))
    registry.set_alias(client, cfg.registered_model, registry.CHALLENGER, version.version)
    log.info("registered %s v%s (%s, model %s, %s accuracy %.4f) as %s", cfg.registered_model, version.version,
             best.model, model_id, score.split, score.accuracy, registry.CHALLENGER)
    version = client.get_model_version(cfg.registered_model, version.version)
    moved = registry.decide_champion(client, cfg.registered_model, version, score, *images)
    return version.version, moved


def run_pipeline(cfg: PipelineConfig) -> tuple[str, bool]:
    recipe, why = choose_recipe(cfg.recipe)
    models = cfg.models or (recipe_model(recipe),)
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        raise StepError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    for model in models:  # an unknown recipe, or a config train would refuse, stops here, before any step
        resolved = train_config(model, recipe, cfg)
        validate(resolved)
        distributed.check_launch(distributed.Launch(cfg.nproc_per_node), resolved.batch_size, resolved.time_budget)
    # Options not given stay as mlflow run logged them; what they resolved to is in the tags.
    log_params({k: v for k, v in asdict(cfg).items() if v is not None and k != "models"})
    mlflow.set_tags({"recipe": recipe, "recipe_reason": why, "models": ",".join(models)})
    code = code_version()
    mlflow.set_tag(CODE_TAG, code)
    data_run = run_step("download_data", {"source": cfg.source, "train_limit": cfg.train_limit,
                                          "test_limit": cfg.test_limit, "val_size": cfg.val_size}, cfg, code)
    candidates = [train_and_evaluate(model, data_run, recipe, cfg, code) for model in models]
    best = choose(candidates)
    version, moved = register(best, data_run, cfg)
    mlflow.log_metric("best_test_accuracy", best.test_accuracy)
    if best.val_accuracy is not None:
        mlflow.log_metric("best_val_accuracy", best.val_accuracy)
    mlflow.set_tags({"registered_version": version, "champion_moved": str(moved).lower()})
    return version, moved


@click.command(help=__doc__)
@click.option("--source", default=PipelineConfig.source, show_default=True)
@click.option("--models", type=OrNotGiven(click.STRING), help="Comma-separated model names; the recipe's model when empty.")
@click.option("--recipe", default=PipelineConfig.recipe, show_default=True,
              help="train's preset: auto (fast on CUDA, cpu elsewhere), reference, cpu or fast.")
# Empty = not given: the recipe's value.
@click.option("--epochs", type=OrNotGiven(WHOLE), help="The recipe's when empty.")
@click.option("--batch-size", type=OrNotGiven(WHOLE), help="The recipe's when empty.")
@click.option("--max-lr", type=OrNotGiven(click.FLOAT), help="0 = find it with find_lr; the recipe's when empty.")
@click.option("--aug", type=OrNotGiven(click.STRING), help="The recipe's when empty.")
@click.option("--time-budget", type=DURATION, default=0, show_default=True,
              help="Seconds for each training, or 90s, 15m, 1h: the epochs that fit are chosen; 0 = off.")
@click.option("--seed", type=WHOLE, default=PipelineConfig.seed, show_default=True)
@click.option("--train-limit", type=WHOLE, default=PipelineConfig.train_limit, show_default=True)
@click.option("--test-limit", type=WHOLE, default=PipelineConfig.test_limit, show_default=True)
@click.option("--val-size", type=WHOLE, default=PipelineConfig.val_size, show_default=True,
              help="Training images held out to choose and promote on (0 = none: the test set decides).")
@click.option("--registered-model", default=PipelineConfig.registered_model, show_default=True)
@click.option("--env-manager", default=PipelineConfig.env_manager, show_default=True)
@click.option("--nproc-per-node", type=WHOLE, default=PipelineConfig.nproc_per_node, show_default=True,
              help="train's processes on this machine, one per GPU; more than 1 trains data-parallel under torchrun.")
def cli(models: str | None, **kwargs) -> None:
    cfg = PipelineConfig(models=tuple(m.strip() for m in (models or "").split(",") if m.strip()), **kwargs)
    with step_command():
        run_pipeline(cfg)


if __name__ == "__main__":
    cli()
