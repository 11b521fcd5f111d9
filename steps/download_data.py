"""download_data: a CIFAR-10 source to checked arrays in this run's `data/` artifacts.

Reads: the official archive (downloaded, MD5-verified), a local archive or batch folder, or
nothing (synthetic). Writes: data/{train,val,test}_{x,y}.npy and data/manifest.json; params
mean_*/std_* (of the training images left after the validation split), source and sizes;
plots/class_distribution.png and plots/samples.png; the three sets as MLflow dataset inputs, so
their digests show in the UI.

The validation split (val_size images, class-balanced, from the end of each class) is what main
chooses models and promotes on, so that the test set only reports. It is at most a tenth of the
training images, so a small source keeps nine tenths to train on; 0 keeps all of them.

A local source is trusted input: its batches are pickles, read with an unpickler that resolves
only numpy arrays, but its MD5 cannot be checked against anything.
"""

import logging
import os
import tempfile
from pathlib import Path

import click
import mlflow
import numpy as np

from cifar_models.preprocess import CLASSES
from steps import data as D
from steps.artifacts import DATA_DIR, PLOTS_DIR
from steps.plots import bar_chart, image_grid
from steps.options import WHOLE, log_params
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


VAL_SIZE = 5000  # images held out for validation by default: 10% of CIFAR-10's training set
MAX_VAL_SHARE = 10  # the split takes at most 1/MAX_VAL_SHARE of the training images


def download_data(source: str = "cifar10", train_limit: int = 0, test_limit: int = 0,
                  cache_dir: Path | None = None, val_size: int = VAL_SIZE) -> dict:
    """Prepare the data set and log it to the active MLflow run. Returns the manifest."""
    if min(train_limit, test_limit, val_size) < 0:
        raise D.DataError(f"train_limit, test_limit and val_size are counts >= 0 (0 = all / none); "
                          f"got {train_limit}, {test_limit}, {val_size}")
    train_x, train_y, test_x, test_y = load_source(source, cache_dir or default_cache_dir())
    held = min(val_size, len(train_y) // MAX_VAL_SHARE)
    if held < val_size:
        log.info("val_size %d is more than a tenth of the %d training images; holding out %d",
                 val_size, len(train_y), held)
    train_x, train_y, val_x, val_y = D.validation_split(train_x, train_y, held)
    train_x, train_y = D.balanced_subset(train_x, train_y, train_limit)
    test_x, test_y = D.balanced_subset(test_x, test_y, test_limit)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = D.write_data(Path(tmp) / DATA_DIR, train_x, train_y, test_x, test_y, source,
                                val=(val_x, val_y) if held else None)
        mlflow.log_artifacts(str(Path(tmp) / DATA_DIR), DATA_DIR)
        plots = Path(tmp) / PLOTS_DIR
        plots.mkdir()
        counts = np.bincount(train_y, minlength=len(CLASSES))
        bar_chart(CLASSES, counts.tolist(), plots / "class_distribution.png",
                  f"Training images per class ({len(train_y)} in all)", "images")
        first = [int(np.flatnonzero(train_y == c)[i]) for i in range(min(4, counts.min())) for c in range(len(CLASSES))]
        image_grid(train_x[first], [CLASSES[train_y[i]] for i in first], plots / "samples.png", ncols=len(CLASSES))
        mlflow.log_artifacts(str(plots), PLOTS_DIR)

    log_params({"source": source, "train_size": len(train_y), "test_size": len(test_y), "validation_size": held,
                "data_digest": manifest["digest"]})
    mlflow.log_params({f"{k}_{c}": round(v, 6) for k in ("mean", "std") for c, v in zip("rgb", manifest[k])})
    sets = {"training": (train_x, train_y), "validation": (val_x, val_y), "testing": (test_x, test_y)}
    for name, x, y, context in D.data_inputs(sets):
        mlflow.log_input(D.numpy_dataset(name, x, y, dataset_source(source)), context=context)
    log.info("data: %d train / %d validation / %d test images, mean %s, std %s, digest %s",
             len(train_y), held, len(test_y),
             [round(v, 4) for v in manifest["mean"]], [round(v, 4) for v in manifest["std"]], manifest["digest"])
    return manifest


@click.command(help=__doc__)
@click.option("--source", default="cifar10", show_default=True,
              help="cifar10 (official download), synthetic, or a path / file:// URL to a local copy.")
@click.option("--train-limit", default=0, type=WHOLE, show_default=True,
              help="Keep a class-balanced subset of this many training images (0 = all).")
@click.option("--test-limit", default=0, type=WHOLE, show_default=True, help="Likewise for the test images.")
@click.option("--val-size", default=VAL_SIZE, type=WHOLE, show_default=True,
              help="Training images held out for validation, class-balanced (at most a tenth; 0 = none).")
def cli(source: str, train_limit: int, test_limit: int, val_size: int) -> None:
    with step_command():
        download_data(source, train_limit, test_limit, val_size=val_size)


if __name__ == "__main__":
    cli()
