"""download_data: a CIFAR-10 source to checked arrays in this run's `data/` artifacts.

Reads: the official archive (downloaded, MD5-verified), a local archive or batch folder, or
nothing (synthetic). Writes: data/{train_x,train_y,test_x,test_y}.npy and data/manifest.json;
params mean_*/std_* and source; plots/class_distribution.png and plots/samples.png; the
training and test sets as MLflow dataset inputs, so their digest shows in the UI.

A local source is trusted input: its batches are pickles, read with an unpickler that resolves
only numpy arrays, but its MD5 cannot be checked against anything.
"""

import logging
import os
import tempfile
import warnings
from pathlib import Path

import click
import mlflow
import numpy as np

from cifar_models.preprocess import CLASSES
from steps import data as D
from steps.artifacts import DATA_DIR, PLOTS_DIR
from steps.plots import bar_chart, image_grid
from steps.runtime import step_command

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CIFAR10_CACHE", Path.home() / ".cache" / "cifar10-mlflow"))


def load_source(source: str, cache_dir: Path):
    """The four arrays from `source`: cifar10, synthetic, or a local path / file:// URL."""
    if source == "synthetic":
        return D.synthetic()
    if source == "cifar10":
        return D.read_cifar(D.fetch_official(cache_dir))
    path = D.local_path(source)
    if path.is_file():
        md5 = D.file_md5(path)
        same = "matches" if md5 == D.OFFICIAL_MD5 else "differs from"
        log.info("local archive %s: MD5 %s %s the official %s (accepted; local sources are trusted)",
                 path, md5, same, D.OFFICIAL_MD5)
    return D.read_cifar(path)


def dataset_source(source: str):
    """Where the data came from, in a form MLflow can show."""
    if source == "cifar10":
        return D.OFFICIAL_URL
    if source == "synthetic":
        from mlflow.data.code_dataset_source import CodeDatasetSource

        return CodeDatasetSource(tags={"generator": "steps.data.synthetic"})
    return D.local_path(source).resolve().as_uri()


def download_data(source: str = "cifar10", train_limit: int = 0, test_limit: int = 0,
                  cache_dir: Path | None = None) -> dict:
    """Prepare the data set and log it to the active MLflow run. Returns the manifest."""
    train_x, train_y, test_x, test_y = load_source(source, cache_dir or default_cache_dir())
    train_x, train_y = D.balanced_subset(train_x, train_y, train_limit)
    test_x, test_y = D.balanced_subset(test_x, test_y, test_limit)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = D.write_data(Path(tmp) / DATA_DIR, train_x, train_y, test_x, test_y, source)
        mlflow.log_artifacts(str(Path(tmp) / DATA_DIR), DATA_DIR)
        plots = Path(tmp) / PLOTS_DIR
        plots.mkdir()
        counts = np.bincount(train_y, minlength=len(CLASSES))
        bar_chart(CLASSES, counts.tolist(), plots / "class_distribution.png",
                  f"Training images per class ({len(train_y)} in all)", "images")
        first = [int(np.flatnonzero(train_y == c)[i]) for i in range(min(4, counts.min())) for c in range(len(CLASSES))]
        image_grid(train_x[first], [CLASSES[train_y[i]] for i in first], plots / "samples.png", ncols=len(CLASSES))
        mlflow.log_artifacts(str(plots), PLOTS_DIR)

    mlflow.log_params({"source": source, "train_size": len(train_y), "test_size": len(test_y),
                       "data_digest": manifest["digest"]})
    mlflow.log_params({f"{k}_{c}": round(v, 6) for k in ("mean", "std") for c, v in zip("rgb", manifest[k])})
    for name, x, y, context in (("cifar10-train", train_x, train_y, "training"), ("cifar10-test", test_x, test_y, "testing")):
        with warnings.catch_warnings():
            # A local path matches two equivalent source types in MLflow's registry; it picks one.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(features=x, targets=y, source=dataset_source(source), name=name)
        mlflow.log_input(dataset, context=context)
    log.info("data: %d train / %d test images, mean %s, std %s, digest %s", len(train_y), len(test_y),
             [round(v, 4) for v in manifest["mean"]], [round(v, 4) for v in manifest["std"]], manifest["digest"])
    return manifest


@click.command(help=__doc__)
@click.option("--source", default="cifar10", show_default=True,
              help="cifar10 (official download), synthetic, or a path / file:// URL to a local copy.")
@click.option("--train-limit", default=0, show_default=True, help="Keep a class-balanced subset of this many training images (0 = all).")
@click.option("--test-limit", default=0, show_default=True, help="Likewise for the test images.")
def cli(source: str, train_limit: int, test_limit: int) -> None:
    with step_command():
        download_data(source, train_limit, test_limit)


if __name__ == "__main__":
    cli()
