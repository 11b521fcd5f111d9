"""evaluate: a trained model measured on the test set, with the plots to judge it by.

Reads: a train run's weights (its run ID, runs:/<run_id>/weights, any MLflow artifact URI or
local folder holding state_dict.pt and model_config.json) and the `data/` output of
download_data. Writes: params model_uri, data, train_run_id, data_digest, model; metrics test_accuracy,
test_loss, test_accuracy_flip_tta (mirror test-time augmentation) and test_accuracy_tta (mirror
and one-pixel shifts; both as cifar_models.inference.predict_logits does them; accuracies are
fractions in [0, 1], the loss is plain cross-entropy); per_class_accuracy.csv; under plots/: per_class_accuracy.png,
confusion_matrix.png, misclassified.png and, when the train run is known, training_curves.png
(its train and test loss and accuracy per epoch).
"""

import logging
import re
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from cifar_models.inference import SPEC_FILE, load_network
from steps import hardware, loop
from steps.artifacts import PLOTS_DIR, TEST_ACCURACY_METRIC, WEIGHTS_DIR
from steps.data import load_data
from steps.errors import StepError
from steps.options import WHOLE, log_params
from steps.plots import bar_chart, confusion_matrix_plot, image_grid, train_curves_plot
from steps.runtime import step_command
from steps.train import EPOCH_METRICS

log = logging.getLogger(__name__)

PER_CLASS_CSV = "per_class_accuracy.csv"
MISCLASSIFIED_SHOWN = 32
RUN_ID = re.compile(r"[0-9a-f]{32}")


def resolve_model(model_uri: str) -> tuple[Path, str]:
    """(local weights folder, train run ID or "" when the URI names no run)."""
    if RUN_ID.fullmatch(model_uri):
        model_uri = f"runs:/{model_uri}/{WEIGHTS_DIR}"
    run_match = re.match(r"runs:/([0-9a-f]{32})(/|$)", model_uri)
    train_run_id = run_match.group(1) if run_match else ""
    local = Path(model_uri).expanduser()
    if "://" not in model_uri and ":/" not in model_uri and local.is_dir():
        folder = local
    else:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
        except Exception as exc:
            raise StepError(f"cannot fetch the model from {model_uri}: {exc}") from None
    if not (folder / SPEC_FILE).is_file():
        raise StepError(f"{model_uri}: no {SPEC_FILE}; give a train run ID or its {WEIGHTS_DIR}/ folder")
    return folder, train_run_id


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


def evaluate(model_uri: str, data_uri: str, *, batch_size: int = 1024, device: str = "auto") -> dict[str, float]:
    """Evaluate and log to the active MLflow run. Returns the logged metrics."""
    hw = hardware.hardware(device)
    folder, train_run_id = resolve_model(model_uri)
    data = load_data(data_uri)
    model, spec = load_network(folder, hw.device)
    log_params({"model_uri": model_uri, "data": data_uri, "train_run_id": train_run_id, "data_digest": data.digest,
                       "model": spec.model})
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
    mlflow.log_metrics(metrics)
    log.info("test accuracy %.4f (flip TTA %.4f, flip+shift TTA %.4f), loss %.4f on %d images", accuracy,
             flip_accuracy, tta_accuracy, loss, len(data.test_y))

    predictions = logits.argmax(1).numpy()
    labels = data.test_y
    classes = spec.classes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots = tmp / PLOTS_DIR
        plots.mkdir()
        table = per_class_table(labels, predictions, classes)
        table.to_csv(tmp / PER_CLASS_CSV, index=False)
        mlflow.log_artifact(str(tmp / PER_CLASS_CSV))
        bar_chart(list(classes), table["accuracy"].round(3).tolist(), plots / "per_class_accuracy.png",
                  f"Per-class test accuracy (overall {accuracy:.4f})", "accuracy")
        confusion_matrix_plot(confusion_matrix(labels, predictions, len(classes)), classes,
                              plots / "confusion_matrix.png", f"Confusion matrix, {len(labels)} test images")
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


@click.command(help=__doc__)
@click.option("--model-uri", required=True, help="A train run ID, runs:/<run_id>/weights, an artifact URI or a local folder.")
@click.option("--data", "data_uri", required=True, help="download_data's output: a folder or runs:/<run_id>/data.")
@click.option("--batch-size", default=1024, type=WHOLE, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def cli(model_uri: str, data_uri: str, batch_size: int, device: str) -> None:
    with step_command():
        evaluate(model_uri, data_uri, batch_size=batch_size, device=device)


if __name__ == "__main__":
    cli()
