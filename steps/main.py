"""main: the whole pipeline, raw data to a registered model with `champion` decided.

Runs download_data, then for each model find_lr (only when the recipe's max_lr, or the one
given, is 0), train and evaluate,
each as its own MLflow run nested under this one and started through the MLflow Projects API
with this run's environment manager. A step that already finished with the same parameters,
the same code and the same upstream runs is reused rather than run again. At the end the most
accurate candidate is registered as a new version of `registered_model` with the alias
`challenger`, and `champion` moves to it only if it beats the current champion on the same
test images.
"""

import hashlib
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import mlflow
from mlflow.tracking import MlflowClient

from cifar_models import list_models
from steps import registry
from steps.artifacts import DATA_DIR, TEST_ACCURACY_METRIC, WEIGHTS_DIR
from steps.data import load_data
from steps.errors import StepError
from steps.options import WHOLE, OrNotGiven, log_params
from steps.runtime import ERROR_TAG, step_command
from steps.recipes import TrainConfig, resolve_config, validate

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
CODE_TAG = "pipeline.code_version"


@dataclass(frozen=True)
class PipelineConfig:
    source: str = "cifar10"  # download_data's source: cifar10, synthetic, or a local copy
    models: tuple[str, ...] = ("custom_resnet",)  # architectures to train and compare
    recipe: str = "reference"  # train's preset (steps.recipes.RECIPES): 24 epochs of one-cycle, LR from find_lr
    # None = the recipe's value; one given here wins over the recipe, for every model.
    epochs: int | None = None
    batch_size: int | None = None
    max_lr: float | None = None  # 0 = run find_lr for each model and take its suggestion
    aug: str | None = None  # augmentation policy name, see steps.augment
    seed: int = 0
    train_limit: int = 0  # class-balanced subset sizes, 0 = all
    test_limit: int = 0
    registered_model: str = "cifar10-classifier"
    env_manager: str = "local"  # passed on to every step: children do not inherit it


def code_version(root: Path = PROJECT_DIR) -> str:
    """A hash of the code the steps run. Unlike the git commit MLflow records, it also changes
    with uncommitted edits, so a reused step really ran this code."""
    digest = hashlib.sha256()
    files = [root / "MLproject", *sorted((root / "steps").rglob("*.py")), *sorted((root / "cifar_models").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def find_finished(client: MlflowClient, experiment_id: str, entry_point: str, params: dict[str, str], code: str):
    """A finished run of this entry point with these parameters and this code, or None.

    MLflow stores parameters as strings, so the comparison is on strings, exactly as logged."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`mlflow.project.entryPoint` = '{entry_point}' and tags.`{CODE_TAG}` = '{code}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if all(run.data.params.get(k) == v for k, v in params.items()):
            return run
    return None


def run_step(entry_point: str, params: dict, cfg: PipelineConfig, code: str) -> str:
    """Run one entry point as a child of the active run, or reuse an identical finished one.
    Returns the run ID; a failed step raises StepError with that step's own message first.
    Stopping main stops the step too, and leaves its run KILLED (steps.lifeline)."""
    from steps.lifeline import name_main, wait_or_stop

    client = MlflowClient()
    experiment_id = mlflow.active_run().info.experiment_id
    params = {k: str(v) for k, v in params.items()}
    done = find_finished(client, experiment_id, entry_point, params, code)
    if done is not None:
        log.info("%s: reusing finished run %s (same parameters, code %s and inputs)", entry_point, done.info.run_id, code)
        return done.info.run_id
    log.info("%s: starting with %s", entry_point, params)
    name_main()
    submitted = mlflow.projects.run(str(PROJECT_DIR), entry_point=entry_point, parameters=params,
                                    env_manager=cfg.env_manager, experiment_id=experiment_id, synchronous=False)
    client.set_tag(submitted.run_id, CODE_TAG, code)
    if not wait_or_stop(submitted, entry_point):
        tags = client.get_run(submitted.run_id).data.tags
        reason = tags.get(ERROR_TAG, "see the step's output above")
        raise StepError(f"{entry_point} failed: {reason} (run {submitted.run_id}); run main again to resume from this step")
    return submitted.run_id


def main_options(cfg: PipelineConfig) -> dict[str, object]:
    """The train options main passes on; None = not given, the recipe's."""
    return {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_lr": cfg.max_lr, "aug": cfg.aug}


def train_config(model: str, cfg: PipelineConfig) -> TrainConfig:
    """The config train will resolve for this model from the recipe and main's options."""
    return resolve_config(cfg.recipe, {"model": model, **main_options(cfg)})


def step_params(model: str, data_uri: str, cfg: PipelineConfig) -> tuple[dict, dict | None]:
    """(train's parameters, find_lr's or None when the resolved recipe has a fixed max_lr).

    train gets the recipe and only the options given to main, so that train resolves them as
    it would from the command line. Options not given are not passed at all: MLflow stores an
    empty parameter as its shell quoting (''), which would never compare equal to "" when
    looking for a run to reuse. find_lr sees the batches training will see: the resolved
    batch size and augmentation."""
    given = main_options(cfg)
    resolved = train_config(model, cfg)
    train_params = {"data": data_uri, "recipe": cfg.recipe, "model": model, "seed": cfg.seed,
                    **{k: v for k, v in given.items() if v is not None}}
    if resolved.max_lr > 0:
        return train_params, None
    return train_params, {"data": data_uri, "model": model, "batch_size": resolved.batch_size,
                          "aug": resolved.aug, "seed": cfg.seed}


def train_and_evaluate(model: str, data_run: str, cfg: PipelineConfig, code: str) -> registry.Candidate:
    data_uri = f"runs:/{data_run}/{DATA_DIR}"
    train_params, find_lr_params = step_params(model, data_uri, cfg)
    if find_lr_params is not None:
        train_params["lr_run"] = run_step("find_lr", find_lr_params, cfg, code)
    train_run = run_step("train", train_params, cfg, code)
    eval_run = run_step("evaluate", {"model_uri": train_run, "data": data_uri}, cfg, code)
    accuracy = MlflowClient().get_run(eval_run).data.metrics[TEST_ACCURACY_METRIC]
    log.info("%s: test accuracy %.4f (train run %s, evaluate run %s)", model, accuracy, train_run, eval_run)
    return registry.Candidate(model, accuracy, train_run, eval_run)


def register(best: registry.Candidate, data_run: str, cfg: PipelineConfig) -> tuple[str, bool]:
    """Log the best candidate as a servable pyfunc model in this run, register it as a new
    version with `challenger`, and decide on `champion`. Returns (version, became champion)."""
    from steps.package import log_pyfunc_model

    client = MlflowClient()
    data = load_data(f"runs:/{data_run}/{DATA_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(client.download_artifacts(best.train_run_id, WEIGHTS_DIR, tmp))
        info = log_pyfunc_model(weights, registered_model_name=cfg.registered_model)
    version = client.get_model_version(cfg.registered_model, str(info.registered_model_version))
    tags = {"test_accuracy": repr(best.test_accuracy), "model": best.model, "data_digest": data.digest,
            "test_digest": data.test_digest, "train_run_id": best.train_run_id, "eval_run_id": best.eval_run_id,
            "data_run_id": data_run, "pipeline_run_id": mlflow.active_run().info.run_id}
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registered_model, version.version, key, value)
    registry.set_alias(client, cfg.registered_model, registry.CHALLENGER, version.version)
    log.info("registered %s v%s (%s, test accuracy %.4f) as %s", cfg.registered_model, version.version,
             best.model, best.test_accuracy, registry.CHALLENGER)
    version = client.get_model_version(cfg.registered_model, version.version)
    moved = registry.decide_champion(client, cfg.registered_model, version, best.test_accuracy,
                                     data.test_digest, data.test_x, data.test_y)
    return version.version, moved


def run_pipeline(cfg: PipelineConfig) -> tuple[str, bool]:
    unknown = [m for m in cfg.models if m not in list_models()]
    if unknown or not cfg.models:
        raise StepError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(list_models())}")
    for model in cfg.models:  # an unknown recipe, or a config train would refuse, stops here, before any step
        validate(train_config(model, cfg))
    # None (not given) is logged as "", as mlflow run logged the empty parameter.
    log_params({k: ",".join(v) if isinstance(v, tuple) else "" if v is None else v for k, v in asdict(cfg).items()})
    code = code_version()
    mlflow.set_tag(CODE_TAG, code)
    data_run = run_step("download_data", {"source": cfg.source, "train_limit": cfg.train_limit,
                                          "test_limit": cfg.test_limit}, cfg, code)
    candidates = [train_and_evaluate(model, data_run, cfg, code) for model in cfg.models]
    best = max(candidates, key=lambda c: c.test_accuracy)
    version, moved = register(best, data_run, cfg)
    mlflow.log_metric("best_test_accuracy", best.test_accuracy)
    mlflow.set_tags({"registered_version": version, "champion_moved": str(moved).lower()})
    return version, moved


@click.command(help=__doc__)
@click.option("--source", default=PipelineConfig.source, show_default=True)
@click.option("--models", default=",".join(PipelineConfig.models), show_default=True, help="Comma-separated model names.")
@click.option("--recipe", default=PipelineConfig.recipe, show_default=True, help="train's preset: reference, cpu, fast or custom.")
# Empty = not given: the recipe's value.
@click.option("--epochs", type=OrNotGiven(WHOLE), help="The recipe's when empty.")
@click.option("--batch-size", type=OrNotGiven(WHOLE), help="The recipe's when empty.")
@click.option("--max-lr", type=OrNotGiven(click.FLOAT), help="0 = find it with find_lr; the recipe's when empty.")
@click.option("--aug", type=OrNotGiven(click.STRING), help="The recipe's when empty.")
@click.option("--seed", type=WHOLE, default=PipelineConfig.seed, show_default=True)
@click.option("--train-limit", type=WHOLE, default=PipelineConfig.train_limit, show_default=True)
@click.option("--test-limit", type=WHOLE, default=PipelineConfig.test_limit, show_default=True)
@click.option("--registered-model", default=PipelineConfig.registered_model, show_default=True)
@click.option("--env-manager", default=PipelineConfig.env_manager, show_default=True)
def cli(models: str, **kwargs) -> None:
    cfg = PipelineConfig(models=tuple(m.strip() for m in models.split(",") if m.strip()), **kwargs)
    with step_command():
        run_pipeline(cfg)


if __name__ == "__main__":
    cli()
