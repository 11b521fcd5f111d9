"""train: a registry model trained on download_data's output, resumable after a crash.

Reads: the `data/` output of download_data (a path or runs:/<run_id>/data), and optionally a
find_lr run's `suggested_lr`. Writes: every TrainConfig field as a param, plus data_digest
(param and tag) and max_lr_used; per epoch (step = epoch, counted from 1) the metrics
train_loss, train_accuracy and lr, test_loss and test_accuracy after the epochs with a test pass
(every test_every-th and the last), and epoch_seconds (its training and test pass, if any; the
first epoch holds torch.compile's warm-up, so the others show the steady pace);
at the end weights/ (state_dict.pt and model_config.json), model_summary.txt, train_seconds
(the epochs' sum), the machine as the tag hardware, and the network as an MLflow LoggedModel
`model`, the pyfunc without calibration (its ID in the run's tag model_id; evaluate logs the
same weights again with the calibration it fits, and that model is the one main registers);
the training and test sets as dataset inputs.
With max_lr 0 and no lr_run, also find_lr's suggested_lr and plots/lr_range_test.png.

The config and the --recipe presets are steps.recipes'; recipe auto is chosen for the device
(steps.recipes.choose_recipe), and the log says which and why. The run logs the recipe name and
the resolved config as params; a parameter the run already holds as not given (`recipe`, logged
so by mlflow run) gets its value as <name>_resolved, and recipe auto its choice as
recipe_resolved.

Resuming: after an epoch that ends CIFAR10_CHECKPOINT_INTERVAL seconds (default 60; 0 = after
every epoch) or more after the last checkpoint, the full training state goes to a checkpoint
file named by a hash of the config, the data digest, the code version and the tracking store,
so a rerun never resumes another code's or another store's training. Running the same command again after a
crash or kill -9 picks it up, copies the finished epochs' metrics into the new run (so it holds
each epoch once), tags resumed_from_epoch and resumed_from_run, and carries on. A crash so loses
at most the interval and one epoch; a run of a few seconds, as the fast recipe's on a GPU, writes
none, where one per epoch would cost more than a short epoch (benchmarks/README.md, "Epoch
bookkeeping").

Data-parallel: with nproc_per_node > 1 (or nnodes > 1) this command runs itself again as that
many processes under torchrun and waits for them (launch_ranks, steps.distributed). Rank 0
trains under the run as above, with its share of each batch; the other ranks follow it (follow)
and log nothing; the epoch metrics are averaged over the ranks. nproc_per_node 1 is the single
process, no torchrun.
"""

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import click
import mlflow
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from torch import nn
from tqdm import tqdm

from cifar_models.inference import ModelSpec, save_network
from cifar_models.summary import summary
from steps import batches, budget, checkpoints, distributed, hardware, loop, lr_range, schedules
from steps.artifacts import MODEL_ID_TAG, SUGGESTED_LR_METRIC, SUMMARY, WEIGHTS_DIR
from steps.code_version import code_version
from steps.augment import POLICIES
from steps.data import CifarData, data_inputs, load_data, numpy_dataset
from steps.errors import StepError, first_line
from steps import find_lr as find_lr_step
from steps.find_lr import log_range_test, range_test
from steps.lifeline import stop_if_main_gone
from steps.options import DURATION, WHOLE, OrNotGiven, log_params, recipe_param
from steps.recipes import (AUTO, RECIPES, TrainConfig, choose_recipe, gpu_warning, resolve_config, tests_after,
                           validate)
from steps.runtime import ERROR_TAG, command_without_run, retry, step_command
from steps.training import EVAL_BATCH, Training, data_parallel, start_training, train_epoch, training_set

log = logging.getLogger(__name__)

EPOCH_METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")


# --- tracking that survives a hiccup --------------------------------------------------------------------

def retrying(what: str, fn: Callable[[], None], attempts: int = 4, delay_s: float = 1.0) -> None:
    """Call fn, retrying with backoff; if it keeps failing, warn and go on. Hours of training
    are not lost because the tracking store was briefly away (the checkpoint keeps the
    history, and a rerun of the command copies it into the new run)."""
    try:
        retry(fn, attempts, delay_s)  # any type: the tracking client raises many for one outage
    except Exception as exc:
        log.warning("could not log %s after %d attempts (%s); training continues", what, attempts, exc)


def log_metrics_queued(values: dict[str, float], step: int) -> Callable[[], None]:
    """Hand an epoch's metrics to MLflow's background logging thread and return at once: a
    synchronous write waits on the tracking store (a database commit, or an HTTP round trip),
    and in a GPU epoch of a fraction of a second that wait is time the GPU sits idle. Returns
    a function that waits for the write and, if it failed, writes again in the foreground
    with retrying's backoff; train calls it once the epochs are done."""
    try:
        operation = mlflow.log_metrics(values, step=step, synchronous=False)
    except Exception as exc:  # the queue itself refused: settle writes them in the foreground
        log.debug("could not queue epoch %d metrics: %s", step, exc)
        operation = None

    def settle() -> None:
        if operation is not None:
            try:
                operation.wait()
                return
            except Exception as exc:  # MLflow has logged the failure; write them again below
                log.debug("queued epoch %d metrics failed: %s", step, exc)
        retrying(f"epoch {step} metrics", partial(mlflow.log_metrics, values, step=step))

    return settle


def relog_history(run_id: str, history: dict[int, dict[str, float]]) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, epoch) for epoch, values in history.items() for name, value in values.items()]
    client = MlflowClient()
    for start in range(0, len(metrics), 500):  # log_batch takes at most 1000 metrics
        retrying("resumed metric history", partial(client.log_batch, run_id, metrics=metrics[start:start + 500]))


def close_dead_run(run_id: str) -> None:
    """The run a kill -9 interrupted stays RUNNING forever; mark it KILLED now that it is known dead
    (the checkpoint lock shows nobody else is training this config)."""
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception as exc:  # another tracking store, a deleted run: nothing to tidy
        log.debug("could not mark run %s killed: %s", run_id, exc)


# --- the peak learning rate -------------------------------------------------------------------------

def resolve_max_lr(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, data: CifarData,
                   hw: hardware.Hardware) -> tuple[float, str, dict | None]:
    """(max_lr, where it came from, the range test as plain lists when run here)."""
    if cfg.max_lr > 0:
        return cfg.max_lr, "config", None
    if cfg.lr_run:
        try:
            metrics = MlflowClient().get_run(cfg.lr_run).data.metrics
        except Exception as exc:
            raise StepError(f"cannot read find_lr run {cfg.lr_run}: {exc}") from None
        if SUGGESTED_LR_METRIC not in metrics:
            raise StepError(f"run {cfg.lr_run} has no {SUGGESTED_LR_METRIC} metric; is it a find_lr run?")
        return metrics[SUGGESTED_LR_METRIC], f"find_lr run {cfg.lr_run}", None
    result = range_test(model, optimizer, data, batch_size=cfg.batch_size, aug=cfg.aug,
                        label_smoothing=cfg.label_smoothing, seed=cfg.seed, hw=hw,
                        start_lr=find_lr_step.START_LR, end_lr=find_lr_step.END_LR, num_iter=find_lr_step.NUM_ITER)
    return result.suggestion, "range test in this run", asdict(result)


# --- training ------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, data_uri: str, device: str = "auto", precision: str = "auto",
          recipe: str = "none", group: distributed.Group | None = None) -> dict[str, float]:
    """Train, or resume training, under the active MLflow run; log the model. Returns the
    last epoch's metrics. `recipe` is only recorded: cfg is already resolved (resolve_config).
    group: rank 0's place in a data-parallel training, whose other ranks run follow."""
    validate(cfg)
    interval = checkpoints.checkpoint_interval()
    hw = hardware.hardware(device, precision)
    if warning := gpu_warning(recipe, hw.device.type):
        log.warning(warning)
    data = load_data(data_uri)
    if group is not None:
        distributed.check_batches(len(data.train_y), cfg.batch_size)
    key = checkpoints.checkpoint_key(cfg, data.digest, code_version(), mlflow.get_tracking_uri())
    folder = checkpoints.checkpoint_root() / key
    run_id = mlflow.active_run().info.run_id
    # With a time budget the epochs and test_every are the run's to choose (steps.budget):
    # logged once chosen. The budget itself goes in seconds, beside the "15m" that mlflow run
    # may have logged.
    params = {k: v for k, v in asdict(cfg).items()
              if k != "time_budget" and not (cfg.time_budget and k in ("epochs", "test_every"))}
    log_params({**params, **recipe_param(recipe), "time_budget_seconds": cfg.time_budget, "data": data_uri,
                "data_digest": data.digest})
    mlflow.set_tags({"data_digest": data.digest, "device": str(hw.device), "hardware": hardware.describe(hw.device),
                     "checkpoint_key": key,
                     "precision": str(hw.autocast or torch.float32).removeprefix("torch.")})
    for name, x, y, context in data_inputs({"training": (data.train_x, data.train_y),
                                            "testing": (data.test_x, data.test_y)}):
        mlflow.log_input(numpy_dataset(name, x, y, data_uri), context=context)
    with checkpoints.exclusive(folder):
        metrics = _train_locked(cfg, data, hw, folder / checkpoints.CHECKPOINT_FILE, key, run_id, interval, group)
        # A finished run is the record of the training (metrics, weights); the checkpoint was
        # only there to get it finished, so it goes.
        shutil.rmtree(folder, ignore_errors=True)
    return metrics


def _train_locked(cfg: TrainConfig, data: CifarData, hw: hardware.Hardware, path: Path, key: str,
                  run_id: str, interval: float, group: distributed.Group | None = None) -> dict[str, float]:
    began = time.monotonic()
    training = start_training(cfg, data, hw)
    state = checkpoints.read_checkpoint(path, key) if path.is_file() else None
    train_set = training_set(data, training.policy, hw)

    if state is None:
        max_lr, lr_source, lr_test = resolve_max_lr(cfg, training.model, training.optimizer, data, hw)
        # epoch -> its metrics: all of EPOCH_METRICS after a test pass, the training ones alone otherwise
        history: dict[int, dict[str, float]] = {}
        start_epoch, seconds = 0, 0.0
    else:
        max_lr, lr_source, lr_test = state["max_lr"], state["lr_source"], state.get("range_test")
        history, start_epoch, seconds = state["history"], state["epoch"], state["seconds"]
    if group is not None:  # what follow starts from
        distributed.broadcast((state, max_lr), group)
    if lr_test is not None:
        log_range_test(lr_range.RangeTest(**lr_test), f"{cfg.model}, {cfg.optimizer}")
    log_params({"max_lr_used": max_lr, "max_lr_source": lr_source})
    if cfg.time_budget:
        cfg = budgeted(cfg, state, training, train_set, data, hw, time.monotonic() - began)

    steps_per_epoch = batches.num_batches(len(data.train_y), cfg.batch_size, drop_last=True)
    lr_at = schedules.SCHEDULES[cfg.schedule](cfg, max_lr, cfg.epochs * steps_per_epoch)
    scheduler = schedules.lambda_scheduler(training.optimizer, lr_at)
    if state is not None:
        load_training_state(training, scheduler, state)
        relog_history(run_id, history)
        mlflow.set_tags({"resumed_from_epoch": start_epoch, "resumed_from_run": state["run_id"]})
        close_dead_run(state["run_id"])
        log.info("resuming from %s: %d of %d epochs done (run %s)", path, start_epoch, cfg.epochs, state["run_id"])
    if group is not None:
        training = data_parallel(training, cfg, hw, group, start_epoch + 1)

    tty = sys.stderr.isatty()
    queued: list[Callable[[], None]] = []
    saved_at = time.monotonic()
    timed: list[float] = []  # this process's epochs, for the closing line
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.monotonic()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not tty)
        try:
            train_loss, train_acc = train_epoch(cfg, training, scheduler, epoch, train_set, data, hw, progress=bar)
        finally:
            bar.close()
        if group is not None:
            train_loss, train_acc = distributed.mean([train_loss, train_acc], group)
        # lr: the LR of the epoch's last optimizer step.
        values = {"train_loss": train_loss, "train_accuracy": train_acc, "lr": lr_at(epoch * steps_per_epoch - 1)}
        if tests_after(cfg, epoch):
            values["test_loss"], values["test_accuracy"], _ = loop.evaluate(
                training.result, data.test_x, data.test_y, data.mean, data.std, batch_size=EVAL_BATCH)
        epoch_seconds = time.monotonic() - started
        seconds += epoch_seconds
        timed.append(epoch_seconds)
        history[epoch] = values
        if time.monotonic() - saved_at >= interval:
            checkpoints.save_checkpoint(path, {
                "format": checkpoints.CHECKPOINT_FORMAT, "key": key, "config": asdict(cfg), "run_id": run_id,
                "epoch": epoch, "max_lr": max_lr, "lr_source": lr_source, "range_test": lr_test, "history": history,
                "seconds": seconds, **training_state(training, scheduler)})
            saved_at = time.monotonic()
        # epoch_seconds is this process's own figure, so it stays out of the history a resume copies.
        queued.append(log_metrics_queued({**values, "epoch_seconds": epoch_seconds}, epoch))
        tested = (f"test loss {values['test_loss']:.4f} acc {values['test_accuracy']:.4f}" if "test_loss" in values
                  else "no test pass")
        log.info("epoch %d/%d: train loss %.4f acc %.4f | %s | lr %.4g | %.2f s",
                 epoch, cfg.epochs, train_loss, train_acc, tested, values["lr"], epoch_seconds)

    if cfg.time_budget:  # what the budget covered in this process: set-up, timing, epochs and test passes
        queued.append(log_metrics_queued({"budget_used_seconds": time.monotonic() - began}, cfg.epochs))
    for settle in queued:
        settle()
    if timed:
        # The first epoch holds torch.compile's warm-up, if any: said apart so it can be read off.
        log.info("train_seconds %.2f: this process's first epoch %.2f s, its other %d %.2f s (test passes included)",
                 seconds, timed[0], len(timed) - 1, sum(timed[1:]))
    log_model(training.result, cfg.model, data)
    mlflow.log_metric("train_seconds", seconds)
    return history[cfg.epochs]  # tests_after: the last epoch always has its test pass


def budgeted(cfg: TrainConfig, state: dict | None, training: Training, train_set: tuple, data: CifarData,
             hw: hardware.Hardware, spent: float) -> TrainConfig:
    """cfg with the epochs (and test_every) its time budget fits, measured here (steps.budget),
    or, on a resume, the ones the interrupted run chose: its schedule is the one being resumed."""
    if state is not None:
        epochs, every = state["config"]["epochs"], state["config"]["test_every"]
        log.info("time budget: resuming the %d epochs the interrupted run chose", epochs)
        log_params({"epochs": epochs, "test_every": every})
        return replace(cfg, epochs=epochs, test_every=every)
    fitted, fit = budget.fit_budget(cfg, training, train_set, data, hw, spent)
    # test_every also as budget_test_every: a test_every given on the command line stays the
    # run's param even where the budget raised it.
    log_params({"epochs": fitted.epochs, "test_every": fitted.test_every, "budget_test_every": fit.test_every,
                "budget_low_res_epochs": fit.low_res_epochs,
                "budget_step_seconds": fit.pace.step_seconds, "budget_low_res_step_seconds": fit.pace.low_res_step_seconds,
                "budget_test_seconds": fit.pace.test_seconds, "budget_probe_seconds": fit.pace.probe_seconds,
                "budget_predicted_seconds": fit.predicted_seconds})
    mlflow.set_tag("budget_choice", fit.reason(cfg.time_budget))
    return fitted


def follow(cfg: TrainConfig, data_uri: str, device: str, precision: str, group: distributed.Group) -> None:
    """A data-parallel rank other than 0: rank 0's training (train, _train_locked) step for step,
    with the same collectives in the same order, on its own part of each batch. It starts from
    the checkpoint and peak LR rank 0 sends, and tests, checkpoints and logs nothing; nor does it
    keep the EMA, as only rank 0's average is tested and saved."""
    validate(cfg)
    hw = hardware.hardware(device, precision)
    data = load_data(data_uri)
    distributed.check_batches(len(data.train_y), cfg.batch_size)
    training = replace(start_training(cfg, data, hw), ema=None)
    state, max_lr = distributed.broadcast(None, group)
    steps_per_epoch = batches.num_batches(len(data.train_y), cfg.batch_size, drop_last=True)
    lr_at = schedules.SCHEDULES[cfg.schedule](cfg, max_lr, cfg.epochs * steps_per_epoch)
    scheduler = schedules.lambda_scheduler(training.optimizer, lr_at)
    start_epoch = 0
    if state is not None:
        load_training_state(training, scheduler, state)
        start_epoch = state["epoch"]
    training = data_parallel(training, cfg, hw, group, start_epoch + 1)
    train_set = training_set(data, training.policy, hw)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        distributed.mean(list(train_epoch(cfg, training, scheduler, epoch, train_set, data, hw)), group)


def load_training_state(training: Training, scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """A checkpoint's training state (training_state's) loaded back."""
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoints.set_rng_state(training.generator, state["rng"])
    if training.ema is not None:
        training.ema.load_state_dict(state["ema"])


def training_state(training: Training, scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """What a checkpoint holds of the training itself: every state a resume loads back."""
    return {"model": training.model.state_dict(), "optimizer": training.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": checkpoints.rng_state(training.generator),
            "ema": training.ema.state_dict() if training.ema is not None else None}


def log_model(model: nn.Module, name: str, data: CifarData) -> str:
    """weights/ (the state_dict and the spec that rebuilds the network), the summary text, and
    the served pyfunc as this run's LoggedModel. Returns the LoggedModel's ID."""
    from steps.package import log_pyfunc_model  # PIL and the pyfunc: only once there is a model

    model = model.to(memory_format=torch.contiguous_format)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_network(model, ModelSpec(model=name, mean=data.mean, std=data.std, classes=data.classes),
                              Path(tmp) / WEIGHTS_DIR)
        mlflow.log_artifacts(str(folder), WEIGHTS_DIR)
        info = log_pyfunc_model(folder)
    mlflow.log_text(summary(model), SUMMARY)
    mlflow.set_tag(MODEL_ID_TAG, info.model_id)
    return info.model_id


def _default(name: str) -> str:
    return f"the recipe's when not given (TrainConfig's default {getattr(TrainConfig, name)!r})"


@click.command(help=__doc__)
@click.option("--data", "data_uri", required=True, help="download_data's output: a folder or runs:/<run_id>/data.")
@click.option("--recipe", default=AUTO, show_default=True,
              help=f"Preset: {', '.join((AUTO, *RECIPES))}; auto = fast where CUDA trains, cpu elsewhere.")
# The options below default to None, "not given": the recipe's value.
@click.option("--model", type=OrNotGiven(click.STRING), help=f"Architecture name in cifar_models; {_default('model')}.")
@click.option("--epochs", type=OrNotGiven(WHOLE), help=_default("epochs"))
@click.option("--batch-size", type=OrNotGiven(WHOLE), help=_default("batch_size"))
@click.option("--max-lr", type=OrNotGiven(click.FLOAT), help=f"Peak LR, 0 = from --lr-run or a range test; {_default('max_lr')}.")
@click.option("--lr-run", type=OrNotGiven(click.STRING), callback=lambda ctx, param, value: None if value == "none" else value,
              help="A find_lr run ID whose suggested_lr to use when max-lr is 0; none = a range test in this run.")
@click.option("--optimizer", type=OrNotGiven(click.STRING), help=f"sgd, adam, adamw or muon; {_default('optimizer')}.")
@click.option("--weight-decay", type=OrNotGiven(click.FLOAT), help=_default("weight_decay"))
@click.option("--label-smoothing", type=OrNotGiven(click.FLOAT), help=_default("label_smoothing"))
@click.option("--aug", type=OrNotGiven(click.STRING), help=f"Augmentation policy: {', '.join(POLICIES)}; {_default('aug')}.")
@click.option("--schedule", type=OrNotGiven(click.STRING), help=f"{', '.join(schedules.SCHEDULES)}; {_default('schedule')}.")
@click.option("--pct-start", type=OrNotGiven(click.FLOAT), help=_default("pct_start"))
@click.option("--div-factor", type=OrNotGiven(click.FLOAT), help=_default("div_factor"))
@click.option("--final-div-factor", type=OrNotGiven(click.FLOAT), help=_default("final_div_factor"))
@click.option("--whiten", type=OrNotGiven(click.BOOL), help=f"true/false; {_default('whiten')}.")
@click.option("--dirac", type=OrNotGiven(click.BOOL), help=f"true/false: conv filters start as the identity; {_default('dirac')}.")
@click.option("--ema", type=OrNotGiven(click.FLOAT), help=f"Per-step EMA decay, 0 = off; {_default('ema')}.")
@click.option("--compile", type=OrNotGiven(click.BOOL), help=f"true/false; {_default('compile')}.")
@click.option("--low-res", type=OrNotGiven(WHOLE), help=f"Side in pixels of the first epochs' images, 0 = full size; {_default('low_res')}.")
@click.option("--low-res-pct", type=OrNotGiven(click.FLOAT), help=f"Fraction of the epochs at low-res; {_default('low_res_pct')}.")
@click.option("--whiten-bias-epochs", type=OrNotGiven(WHOLE), help=f"Epochs the whitening bias trains, 0 = all; {_default('whiten_bias_epochs')}.")
@click.option("--freeze-bn-scale", type=OrNotGiven(click.BOOL), help=f"true/false: BatchNorm scales fixed at 1; {_default('freeze_bn_scale')}.")
@click.option("--bn-bias-lr", type=OrNotGiven(click.FLOAT), help=f"BatchNorm biases' LR as a multiple of the rest's (sgd); {_default('bn_bias_lr')}.")
@click.option("--test-every", type=OrNotGiven(WHOLE), help=f"A test pass after every n-th epoch and the last; {_default('test_every')}.")
@click.option("--time-budget", type=OrNotGiven(DURATION),
              help="Seconds for the training, or 90s, 15m, 1h: the epochs that fit are chosen on this machine; 0 = off.")
@click.option("--seed", default=TrainConfig.seed, type=WHOLE, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu or cuda.")
@click.option("--precision", default="auto", show_default=True, help="auto (bf16 autocast on CUDA and on CPUs with native bf16, else fp32), bf16 or fp32; channels_last always.")
@click.option("--nproc-per-node", default=1, type=WHOLE, show_default=True,
              help="Processes on this machine, one per GPU; more than 1 trains with DistributedDataParallel under "
                   "torchrun, batch-size staying the global batch.")
@click.option("--nnodes", default=1, type=WHOLE, show_default=True,
              help="Machines; start train on each with the same options and its own --node-rank.")
@click.option("--node-rank", default=0, type=WHOLE, show_default=True,
              help="This machine's number, 0 to nnodes-1; machine 0 holds rank 0, which logs to MLflow.")
@click.option("--rdzv-endpoint", default="", help="host:port on machine 0 where several machines meet.")
def cli(data_uri: str, recipe: str, device: str, precision: str, nproc_per_node: int, nnodes: int, node_rank: int,
        rdzv_endpoint: str, **given) -> None:
    launch = distributed.Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    if distributed.is_worker():
        train_rank(data_uri, recipe, device, precision, given)
    elif launch.parallel:
        launch_ranks(launch, recipe, device, given)
    else:
        with step_command():
            chosen, _ = choose_recipe(recipe, device)
            train(resolve_config(chosen, given), data_uri, device, precision, chosen)


def launch_ranks(launch: distributed.Launch, recipe: str, device: str, given: dict) -> None:
    """More than one process asked for: the options checked once, here, then this command run
    again as torchrun's ranks. The launcher logs nothing to MLflow but, when the training
    fails, its one line as the run's error if rank 0 gave none (as when another rank was lost)."""
    with command_without_run():
        chosen, _ = choose_recipe(recipe, device)
        cfg = resolve_config(chosen, given)
        validate(cfg)
        distributed.check_launch(launch, cfg.batch_size, cfg.time_budget)
        try:
            distributed.launch(launch, "steps.train", sys.argv[1:])
        except distributed.JobFailed as exc:
            if launch.node_rank == 0 and (run_id := os.environ.get("MLFLOW_RUN_ID")):
                record_error(run_id, str(exc), keep_rank0s=exc.rank == 0)
                stop_if_main_gone(run_id)
            raise


def record_error(run_id: str, line: str, keep_rank0s: bool) -> None:
    """line as the run's error (the reason main reports); but when rank 0 failed first and gave
    its own reason, that one stays."""
    client = MlflowClient()

    def tag() -> None:
        if not (keep_rank0s and ERROR_TAG in client.get_run(run_id).data.tags):
            client.set_tag(run_id, ERROR_TAG, line)

    retrying("the error", tag)


def train_rank(data_uri: str, recipe: str, device: str, precision: str, given: dict) -> None:
    """One of torchrun's ranks: rank 0 trains under the MLflow run as a single process does, the
    others follow it without MLflow. When torchrun stops the ranks (SIGTERM, as another rank
    failed), rank 0's run ends FAILED, and the ranks leave the telling to the launcher."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt, as SIGINT
    rank = int(os.environ["RANK"])
    lead = rank == 0
    try:
        with step_command() if lead else command_without_run():
            if not lead:
                logging.getLogger().setLevel(logging.WARNING)  # one log, rank 0's
            group = distributed.join(device)
            try:
                chosen, _ = choose_recipe(recipe, device)
                cfg = resolve_config(chosen, given)
                if group.lead:
                    train(cfg, data_uri, group.device, precision, chosen, group)
                else:
                    follow(cfg, data_uri, group.device, precision, group)
            except BaseException:
                # Failing already (torchrun's SIGTERM soon follows): that SIGTERM must not cut
                # short rank 0's ending its run FAILED with the reason.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                raise
            finally:
                distributed.leave()
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGTERM)
    except Exception as exc:
        if not distributed.lost_peer(exc):
            raise
        log.warning("rank %d stops: another rank is gone (%s)", rank, first_line(exc))
        sys.exit(distributed.LOST_PEER_EXIT)


if __name__ == "__main__":
    cli()
