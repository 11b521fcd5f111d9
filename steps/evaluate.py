"""evaluate: a trained model measured on the test set, with the plots to judge it by.

Reads: a trained model (a train run ID, runs:/<run_id>/weights, a logged or registered model
such as models:/m-<id> or models:/cifar10-classifier@champion, any MLflow artifact URI or local
folder holding state_dict.pt and model_config.json) and the `data/` output of download_data.
Writes: params model_uri, data, train_run_id, model_id, data_digest, model; metrics val_accuracy
and val_loss (on the validation split, when the data has one: what main chooses and promotes
on), test_accuracy, test_loss, test_accuracy_flip_tta (mirror test-time augmentation) and
test_accuracy_tta (mirror and one-pixel shifts; both as cifar_models.inference.predict_logits
does them; accuracies are fractions in [0, 1], the loss is plain cross-entropy).

Calibration (cifar_models/calibration.py): one temperature fitted by NLL on the validation
split, images the network never trained on, and measured on the test set, which it was never
fitted on: test_nll and test_ece (15 bins) before, test_nll_calibrated and test_ece_calibrated
after, and temperature. Without a validation split (val_size 0) the test set is all there is:
the figures come from a two-fold cross-fit on it (each half scored by the other half's T) and
the served temperature is fitted on all of it; the tag calibration_split says which was done.
The `unknown` flag: the score (max calibrated probability or energy, whichever separates the
validation images from the synthetic foreign ones better; tag unknown_score) and the threshold
that accepts ACCEPT_SHARE of the validation images (unknown_threshold;
unknown_accept_rate_test is the share of test images it accepts), measured against each
foreign source of steps.ood: ood_auroc_<source> and ood_false_accept_<source> (the share
of its images not flagged), with both scores' figures in ood.csv.

The served model with that calibration is logged as this run's LoggedModel (its ID in the tag
calibrated_model_id: what main registers), and every metric is linked to it and to its data
set; the sets are dataset inputs. Artifacts: calibration.json, ood.csv, per_class_accuracy.csv;
under plots/: per_class_accuracy.png, confusion_matrix.png, misclassified.png, reliability.png
(before and after temperature scaling), ood_scores.png and, when the train run is known,
training_curves.png (its train and test loss and accuracy per epoch).
"""

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelInput
from mlflow.tracking import MlflowClient

from cifar_models.calibration import CALIBRATION_FILE, SCORES, Calibration, ood_scores
from cifar_models.inference import SPEC_FILE, load_network, predict_logits
from steps import calibration, hardware, loop
from steps.artifacts import (CALIBRATED_MODEL_TAG, MODEL_ID_TAG, OOD_CSV, PER_CLASS_CSV, PLOTS_DIR,
                             TEST_ACCURACY_METRIC, VAL_ACCURACY_METRIC, WEIGHTS_DIR)
from steps.data import CifarData, data_inputs, load_data, numpy_dataset
from steps.errors import StepError, first_line
from steps.options import WHOLE, log_params
from steps.registry import served_weights_dir
from steps.ood import SYNTHETIC, ood_sources
from steps.plots import (bar_chart, confusion_matrix_plot, image_grid, reliability_plot, score_histograms,
                         train_curves_plot)
from steps.runtime import step_command
from steps.train import EPOCH_METRICS

log = logging.getLogger(__name__)

# The share of in-distribution images the unknown threshold lets through: 1 in 20 genuine
# CIFAR-like images flagged is the price of catching foreign ones.
ACCEPT_SHARE = 0.95
MISCLASSIFIED_SHOWN = 32
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ModelSource:
    folder: Path  # local weights folder (state_dict.pt, model_config.json)
    train_run_id: str  # the run that trained it, "" when the URI names none
    model_id: str  # its LoggedModel (MLflow 3), "" when it is not one


def resolve_model(model_uri: str) -> ModelSource:
    """Where the weights are, and which run and logged model they come from."""
    if RUN_ID.fullmatch(model_uri):
        model_uri = f"runs:/{model_uri}/{WEIGHTS_DIR}"
    if model_uri.startswith("models:/"):
        return _registered_or_logged(model_uri)
    run_match = re.match(r"runs:/([0-9a-f]{32})(/|$)", model_uri)
    train_run_id = run_match.group(1) if run_match else ""
    local = Path(model_uri).expanduser()
    if "://" not in model_uri and ":/" not in model_uri and local.is_dir():
        folder = local
    else:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        except Exception as exc:
            raise StepError(f"cannot fetch the model from {model_uri}: {first_line(exc)}") from None
    if not (folder / SPEC_FILE).is_file():
        raise StepError(f"{model_uri}: no {SPEC_FILE}; give a train run ID, its {WEIGHTS_DIR}/ folder or a models:/ URI")
    model_id = MlflowClient().get_run(train_run_id).data.tags.get(MODEL_ID_TAG, "") if train_run_id else ""
    return ModelSource(folder, train_run_id, model_id)


def _registered_or_logged(model_uri: str) -> ModelSource:
    """A models:/ URI (a logged model's ID, or a registered name with a version or alias)."""
    try:
        info = mlflow.models.get_model_info(model_uri)
        folder = served_weights_dir(model_uri, Path(tempfile.mkdtemp(prefix="evaluate-model-")))
    except StepError:
        raise
    except Exception as exc:
        raise StepError(f"cannot fetch the model from {model_uri}: {first_line(exc)}") from None
    # A registered version is evaluate's calibrated model: its training run is the one that
    # evaluate run names.
    run_id = info.run_id or ""
    trained_by = MlflowClient().get_run(run_id).data.params.get("train_run_id") if run_id else None
    return ModelSource(folder, trained_by or run_id, info.model_id or "")


def per_class_table(labels: np.ndarray, predictions: np.ndarray, classes: tuple[str, ...]) -> pd.DataFrame:
    total = np.bincount(labels, minlength=len(classes))
    correct = np.bincount(labels[predictions == labels], minlength=len(classes))
    return pd.DataFrame({"class": classes, "correct": correct, "total": total,
                         "accuracy": correct / np.maximum(total, 1)})


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n: int) -> np.ndarray:
    """Counts, rows the true class and columns the predicted one."""
    return np.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)


def training_curves(train_run_id: str) -> dict[str, tuple[list[int], list[float]]]:
    client = MlflowClient()
    curves = {}
    for name in EPOCH_METRICS:
        if name == "lr":
            continue
        history = sorted(client.get_metric_history(train_run_id, name), key=lambda m: m.step)
        if history:
            curves[name] = ([m.step for m in history], [m.value for m in history])
    return curves


@dataclass(frozen=True)
class CalibrationFit:
    temperature: float  # the served one
    split: str  # what T was fitted on: "validation", or "test_cross_fit" when there is no validation split
    test_probabilities: np.ndarray  # calibrated, each image by a temperature not fitted on it
    reference_logits: np.ndarray  # in-distribution images the threshold is set on
    metrics: dict[str, float]


def fit_calibration(test_logits: np.ndarray, test_y: np.ndarray, val_logits: np.ndarray,
                    val_y: np.ndarray) -> CalibrationFit:
    """The temperature from the validation split, figures on the test set; a two-fold cross-fit
    on the test set when there is no validation split (see the module's docstring)."""
    if len(val_y):
        temperature = calibration.fit_temperature(val_logits, val_y)
        per_image, reference = temperature, val_logits
        split = "validation"
    else:
        temperature = calibration.fit_temperature(test_logits, test_y)
        per_image, reference = calibration.cross_fit_temperatures(test_logits, test_y), test_logits
        split = "test_cross_fit"
        log.warning("no validation split: calibration figures from a two-fold cross-fit on the test set; the "
                    "served temperature and the unknown threshold are fitted on the whole test set, so "
                    "unknown_accept_rate_test is in-sample")
    raw = calibration.softmax_per_row(test_logits, 1.0)
    calibrated = calibration.softmax_per_row(test_logits, per_image)
    picked = calibrated[np.arange(len(test_y)), test_y]
    metrics = {"test_nll": calibration.nll(test_logits, test_y), "test_ece": calibration.ece(raw, test_y),
               "test_nll_calibrated": float(-np.log(np.maximum(picked, 1e-300)).mean()),
               "test_ece_calibrated": calibration.ece(calibrated, test_y), "temperature": temperature}
    return CalibrationFit(temperature, split, calibrated, reference, metrics)


def scores(logits: np.ndarray, temperature: float, score: str) -> np.ndarray:
    return ood_scores(torch.as_tensor(logits), temperature, score).numpy()


def fit_unknown(fit: CalibrationFit, test_logits: np.ndarray,
                ood_logits: dict[str, np.ndarray]) -> tuple[Calibration, dict[str, float], pd.DataFrame]:
    """The score that best separates the reference images from the synthetic foreign ones (AUROC),
    its threshold accepting ACCEPT_SHARE of the reference images, and the figures on the test set
    against each foreign source: (calibration, metrics, a table with both scores' figures)."""
    synthetic = np.concatenate([ood_logits[name] for name in SYNTHETIC])
    separation = {score: calibration.auroc(scores(fit.reference_logits, fit.temperature, score),
                                           scores(synthetic, fit.temperature, score)) for score in SCORES}
    chosen = max(SCORES, key=lambda score: separation[score])  # ties: the first, max_probability
    rows, thresholds = [], {}
    for score in SCORES:
        thresholds[score] = calibration.accept_threshold(scores(fit.reference_logits, fit.temperature, score),
                                                         ACCEPT_SHARE)
        inside = scores(test_logits, fit.temperature, score)
        rows.append({"source": "cifar10_test", "score": score, "images": len(inside), "auroc": float("nan"),
                     "accept_rate": calibration.accept_rate(inside, thresholds[score])})
        for name, logits in ood_logits.items():
            outside = scores(logits, fit.temperature, score)
            rows.append({"source": name, "score": score, "images": len(outside),
                         "auroc": calibration.auroc(inside, outside),
                         "accept_rate": calibration.accept_rate(outside, thresholds[score])})
    table = pd.DataFrame(rows)
    mine = table[table["score"] == chosen].set_index("source")
    metrics = {"unknown_threshold": thresholds[chosen],
               "unknown_accept_rate_test": float(mine.loc["cifar10_test", "accept_rate"])}
    for name in ood_logits:
        metrics[f"ood_auroc_{name}"] = float(mine.loc[name, "auroc"])
        metrics[f"ood_false_accept_{name}"] = float(mine.loc[name, "accept_rate"])
    return Calibration(fit.temperature, chosen, thresholds[chosen], ACCEPT_SHARE), metrics, table


def evaluate(model_uri: str, data_uri: str, *, batch_size: int = 1024, device: str = "auto") -> dict[str, float]:
    """Evaluate and log to the active MLflow run. Returns the logged metrics."""
    from steps.package import log_pyfunc_model  # PIL and the pyfunc: only once there is a model

    hw = hardware.hardware(device)
    source = resolve_model(model_uri)
    folder, train_run_id = source.folder, source.train_run_id
    data = load_data(data_uri)
    model, spec = load_network(folder, hw.device)
    log_params({"model_uri": model_uri, "data": data_uri, "train_run_id": train_run_id, "model_id": source.model_id,
                "data_digest": data.digest, "model": spec.model})
    mlflow.set_tag("data_digest", data.digest)
    if train_run_id:
        trained_on = MlflowClient().get_run(train_run_id).data.params.get("data_digest")
        if trained_on and trained_on != data.digest:
            log.warning("model %s was trained on data %s, evaluated here on data %s", train_run_id, trained_on, data.digest)

    # The network's own normalisation (stored with its weights), not this data set's.
    loss, accuracy, logits = loop.evaluate(model, data.test_x, data.test_y, spec.mean, spec.std, batch_size=batch_size)
    # Test-time augmentation is measured here only: the served model keeps one forward per image.
    _, flip_accuracy, _ = loop.evaluate(model, data.test_x, data.test_y, spec.mean, spec.std,
                                          batch_size=batch_size, tta="flip")
    _, tta_accuracy, _ = loop.evaluate(model, data.test_x, data.test_y, spec.mean, spec.std,
                                         batch_size=batch_size, tta="flip_shift")
    metrics = {TEST_ACCURACY_METRIC: accuracy, "test_loss": loss, "test_accuracy_flip_tta": flip_accuracy,
               "test_accuracy_tta": tta_accuracy}
    log.info("test accuracy %.4f (flip TTA %.4f, flip+shift TTA %.4f), loss %.4f on %d images", accuracy,
             flip_accuracy, tta_accuracy, loss, len(data.test_y))
    val_metrics = {}
    val_loss, val_accuracy, val_logits = loop.evaluate(model, data.val_x, data.val_y, spec.mean, spec.std,
                                                        batch_size=batch_size)
    if len(data.val_y):
        val_metrics = {VAL_ACCURACY_METRIC: val_accuracy, "val_loss": val_loss}
        log.info("validation accuracy %.4f, loss %.4f on %d images", val_accuracy, val_loss, len(data.val_y))

    fit = fit_calibration(logits.numpy(), data.test_y, val_logits.numpy(), data.val_y)
    foreign = ood_sources()
    ood_logits = {name: predict_logits(model, images, spec.mean, spec.std, batch_size=batch_size).numpy()
                  for name, images in foreign.items()}
    served, unknown_metrics, ood_table = fit_unknown(fit, logits.numpy(), ood_logits)
    calibration_metrics = {**fit.metrics, **unknown_metrics}
    mlflow.set_tags({"calibration_split": fit.split, "unknown_score": served.score})
    log.info("temperature %.3f (fitted on: %s): test NLL %.4f -> %.4f, ECE %.4f -> %.4f", served.temperature, fit.split,
             fit.metrics["test_nll"], fit.metrics["test_nll_calibrated"], fit.metrics["test_ece"],
             fit.metrics["test_ece_calibrated"])
    log.info("unknown: %s below %.4g; accepts %.4f of test images; %s", served.score, served.threshold,
             unknown_metrics["unknown_accept_rate_test"],
             ", ".join(f"{name} AUROC {unknown_metrics[f'ood_auroc_{name}']:.3f} false accept "
                       f"{unknown_metrics[f'ood_false_accept_{name}']:.3f}" for name in ood_logits))

    predictions = logits.argmax(1).numpy()
    labels = data.test_y
    classes = spec.classes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / CALIBRATION_FILE).write_text(served.to_json())
        mlflow.log_artifact(str(tmp / CALIBRATION_FILE))
        model_id = log_pyfunc_model(folder, calibration_file=tmp / CALIBRATION_FILE).model_id
        mlflow.set_tag(CALIBRATED_MODEL_TAG, model_id)
        datasets = log_data_inputs(data, data_uri, model_id)
        log_linked(metrics, model_id, datasets.get("testing"))
        if val_metrics:
            log_linked(val_metrics, model_id, datasets.get("validation"))
        on_test = {k: v for k, v in calibration_metrics.items() if k.startswith("test_") or k.endswith("_test")}
        log_linked(on_test, model_id, datasets.get("testing"))
        log_linked({k: v for k, v in calibration_metrics.items() if k not in on_test}, model_id, None)
        metrics.update(val_metrics)
        metrics.update(calibration_metrics)

        ood_table.to_csv(tmp / OOD_CSV, index=False)
        mlflow.log_artifact(str(tmp / OOD_CSV))
        plots = tmp / PLOTS_DIR
        plots.mkdir()
        table = per_class_table(labels, predictions, classes)
        table.to_csv(tmp / PER_CLASS_CSV, index=False)
        mlflow.log_artifact(str(tmp / PER_CLASS_CSV))
        bar_chart(list(classes), table["accuracy"].round(3).tolist(), plots / "per_class_accuracy.png",
                  f"Per-class test accuracy (overall {accuracy:.4f})", "accuracy")
        confusion_matrix_plot(confusion_matrix(labels, predictions, len(classes)), classes,
                              plots / "confusion_matrix.png", f"Confusion matrix, {len(labels)} test images")
        raw = calibration.softmax_per_row(logits.numpy(), 1.0)
        reliability_plot([("softmax", calibration.reliability(raw, labels), fit.metrics["test_ece"]),
                          (f"temperature {served.temperature:.3f}", calibration.reliability(fit.test_probabilities, labels),
                           fit.metrics["test_ece_calibrated"])],
                         plots / "reliability.png", f"Reliability on {len(labels)} test images (temperature fitted on: {fit.split})")
        score_histograms({"cifar10 test": scores(logits.numpy(), served.temperature, served.score),
                          **{name: scores(l, served.temperature, served.score) for name, l in ood_logits.items()}},
                         served.threshold, plots / "ood_scores.png",
                         f"{served.score} score: test images vs foreign ones (threshold accepts "
                         f"{ACCEPT_SHARE:.0%} of reference images)")
        wrong = np.flatnonzero(predictions != labels)[:MISCLASSIFIED_SHOWN]
        if len(wrong):
            image_grid(data.test_x[wrong], [f"{classes[labels[i]]} → {classes[predictions[i]]}" for i in wrong],
                       plots / "misclassified.png", title="Misclassified test images (true → predicted)")
        if train_run_id:
            curves = training_curves(train_run_id)
            if curves:
                train_curves_plot(curves, plots / "training_curves.png",
                                  f"Training run {train_run_id[:8]}: train vs test (train loss includes label smoothing)")
        mlflow.log_artifacts(str(plots), PLOTS_DIR)
    return metrics


def log_data_inputs(data: CifarData, data_uri: str, model_id: str) -> dict[str, object]:
    """Log the validation and test sets as this run's inputs (linked to the model, when it is a
    logged one); returns them by context, for the metrics measured on them."""
    model = LoggedModelInput(model_id) if model_id else None
    datasets = {}
    for name, x, y, context in data_inputs({"validation": (data.val_x, data.val_y),
                                            "testing": (data.test_x, data.test_y)}):
        datasets[context] = numpy_dataset(name, x, y, data_uri)
        mlflow.log_input(datasets[context], context=context, model=model)
    return datasets


def log_linked(metrics: dict[str, float], model_id: str, dataset) -> None:
    """The metrics in this run, and against the logged model and the data set when known."""
    if model_id:
        mlflow.log_metrics(metrics, model_id=model_id, dataset=dataset)
    else:
        mlflow.log_metrics(metrics)


@click.command(help=__doc__)
@click.option("--model-uri", required=True,
              help="A train run ID, runs:/<run_id>/weights, models:/<name>@<alias> or models:/<id>, an artifact URI or a local folder.")
@click.option("--data", "data_uri", required=True, help="download_data's output: a folder or runs:/<run_id>/data.")
@click.option("--batch-size", default=1024, type=WHOLE, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def cli(model_uri: str, data_uri: str, batch_size: int, device: str) -> None:
    with step_command():
        evaluate(model_uri, data_uri, batch_size=batch_size, device=device)


if __name__ == "__main__":
    cli()
