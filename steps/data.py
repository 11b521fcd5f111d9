"""Reading CIFAR-10 archives, and the checked on-disk format every later step reads.

`download_data` turns a source (the official archive, a local copy, or a synthetic set) into
.npy arrays (train, test and a validation split carved from the training images) and a manifest holding their SHA-256 sums, the per-channel statistics and the
class names. `load_data` verifies those sums before it hands the arrays on, so a truncated copy
or a flipped byte is refused with a message instead of being trained on.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cifar_models.preprocess import CLASSES
from steps.artifacts import ARRAY_NAMES, DATA_DIR, MANIFEST, VAL_ARRAY_NAMES
from steps.errors import StepError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
ROW_BYTES = 3 * 32 * 32
FORMAT_VERSION = 2  # 2: an optional validation split (val_x, val_y)


class DataError(StepError):
    """A data source or a stored data set that cannot be used; the message says why."""


@dataclass(frozen=True)
class CifarData:
    train_x: np.ndarray  # (N, 32, 32, 3) uint8, channels last as decoded images are
    train_y: np.ndarray  # (N,) int64 class ids
    test_x: np.ndarray
    test_y: np.ndarray
    mean: tuple[float, float, float]  # per channel of train_x, pixels scaled to [0, 1]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    digest: str  # identifies the exact arrays: a hash over their SHA-256 sums
    test_digest: str  # the same for the test arrays alone
    source: str  # where they came from, as given to download_data
    # Held-out training images for choosing models and promotion; empty when none were carved.
    val_x: np.ndarray = field(default_factory=lambda: np.zeros((0, 32, 32, 3), np.uint8))
    val_y: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    val_digest: str = ""  # the validation arrays alone, "" when there are none


# --- reading the python-version batches ------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles. This unpickler resolves only what a batch holds (numpy arrays
    of plain dtypes), so a tampered file cannot make it import and call arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def parse_batch(name: str, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch to ((n, 32, 32, 3) uint8, (n,) int64), validating its structure."""
    try:
        batch = _BatchUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except Exception as exc:  # a garbled pickle raises any of a dozen types
        raise DataError(f"{name}: not a readable CIFAR batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name}: not a CIFAR batch (no 'data' and 'labels' entries)")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        raise DataError(f"{name}: expected uint8 rows of {ROW_BYTES} bytes, got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{name}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{name}: labels outside 0..{len(CLASSES) - 1}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_members(source: Path) -> dict[str, bytes]:
    """The raw bytes of the six batches, from a .tar.gz or an extracted folder."""
    wanted = (*TRAIN_BATCHES, TEST_BATCH)
    if source.is_dir():
        folder = source / BATCH_FOLDER if (source / BATCH_FOLDER).is_dir() else source
        missing = [n for n in wanted if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder}: missing batch files {', '.join(missing)}")
        return {n: (folder / n).read_bytes() for n in wanted}
    try:
        with tarfile.open(source, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in wanted if n not in members]
            if missing:
                raise DataError(f"{source}: archive lacks {', '.join(missing)}")
            return {n: tar.extractfile(members[n]).read() for n in wanted}
    except tarfile.ReadError:
        raise DataError(f"{source}: not a tar archive (or not a complete one)") from None
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise DataError(f"{source}: unreadable archive, probably truncated ({type(exc).__name__}: {exc})") from None


def read_cifar(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """train_x, train_y, test_x, test_y from a python-version archive or folder."""
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    raw = _read_members(source)
    train = [parse_batch(n, raw[n]) for n in TRAIN_BATCHES]
    test_x, test_y = parse_batch(TEST_BATCH, raw[TEST_BATCH])
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_official(cache_dir: Path, url: str = OFFICIAL_URL, md5: str = OFFICIAL_MD5) -> Path:
    """The official archive, downloaded once into cache_dir and MD5-verified before any use.

    torchvision does the download into a temporary name; only a file that passes the MD5 check
    is renamed into place, so a download cut short is never mistaken for the archive.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    archive = cache_dir / ARCHIVE_NAME
    if check_integrity(str(archive), md5):
        return archive
    partial = f".{ARCHIVE_NAME}.{os.getpid()}.part"
    try:
        download_url(url, str(cache_dir), partial)
    except (urllib.error.URLError, OSError) as exc:
        (cache_dir / partial).unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download CIFAR-10 from {url} ({reason}); without network access, "
            f"pass a local copy with -P source=/path/to/{ARCHIVE_NAME} (or an extracted {BATCH_FOLDER} folder)"
        ) from None
    if not check_integrity(str(cache_dir / partial), md5):
        (cache_dir / partial).unlink(missing_ok=True)
        raise DataError(f"download from {url}: MD5 does not match the official {md5}; refusing to unpickle it")
    os.replace(cache_dir / partial, archive)
    return archive


def local_path(source: str) -> Path:
    """A path or file:// URL to a Path."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise DataError(f"unsupported source {source!r}: use cifar10, synthetic, a local path or a file:// URL")
    return Path(source).expanduser()


# --- the synthetic set ---------------------------------------------------------------------

def synthetic(n_train: int = 2000, n_test: int = 500, seed: int = 0):
    """A small, deterministic, learnable CIFAR-shaped set: each class is a colour and a stripe
    frequency under heavy noise, so a net learns it in a few steps but not in zero."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(len(CLASSES), 3))

    def make(n: int):
        y = np.arange(n) % len(CLASSES)
        rng.shuffle(y)
        rows = np.arange(32)[None, :, None, None]
        stripes = np.sin(rows * (y[:, None, None, None] + 1) * np.pi / 16) * 30
        x = palette[y][:, None, None, :] + stripes + rng.normal(0, 40, size=(n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return (*make(n_train), *make(n_test))


# --- subsets and statistics --------------------------------------------------------------------

def balanced_subset(x: np.ndarray, y: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` images in stored order, taken round-robin over classes so every class
    keeps an equal share (to within one). limit 0 keeps everything."""
    if limit <= 0 or limit >= len(y):
        return x, y
    per_class = [np.flatnonzero(y == c) for c in range(len(CLASSES))]
    # Rank each image within its class, then keep the lowest ranks: a class-balanced prefix.
    rank = np.empty(len(y), dtype=np.int64)
    for idx in per_class:
        rank[idx] = np.arange(len(idx))
    keep = np.sort(np.lexsort((y, rank))[:limit])
    return x[keep], y[keep]


def validation_split(x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """(train_x, train_y, val_x, val_y): `size` images held out, class-balanced, taken from the end
    of each class in stored order, so that train_limit's class-balanced prefix never reaches them."""
    if size <= 0:
        return x, y, x[:0], y[:0]
    if size >= len(y):
        raise DataError(f"a validation split of {size} images leaves none of the {len(y)} to train on")
    backwards = np.arange(len(y))[::-1]
    picked, _ = balanced_subset(backwards, y[backwards], size)  # indices, balanced over the reversed order
    held = np.zeros(len(y), dtype=bool)
    held[picked] = True
    return x[~held], y[~held], x[held], y[held]


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images, in [0, 1] units, from 256-bin histograms
    (no float copy of the data set is made)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(3):
        counts = np.bincount(x[..., c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var ** 0.5)
    return tuple(means), tuple(stds)


# --- the stored format ---------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_data(out_dir: Path, train_x, train_y, test_x, test_y, source: str,
               val: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Write the arrays (and the validation split, when given) and their manifest to out_dir,
    all or nothing: everything goes to a temporary sibling folder first, which is renamed into
    place once complete."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir}: already exists; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        arrays = dict(zip(ARRAY_NAMES, (train_x, train_y, test_x, test_y)))
        if val is not None:
            arrays.update(zip(VAL_ARRAY_NAMES, val))
        sums = {}
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            sums[name] = sha256_file(tmp / f"{name}.npy")
        mean, std = channel_stats(train_x)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "classes": list(CLASSES),
            "mean": list(mean),
            "std": list(std),
            "sizes": {"train": int(len(train_y)), "test": int(len(test_y)),
                      "val": int(len(val[1])) if val is not None else 0},
            "sha256": sums,
            "digest": hashlib.sha256("".join(sums.values()).encode()).hexdigest()[:16],
            # The test images alone: a report is comparable only on the same test set.
            "test_digest": hashlib.sha256((sums["test_x"] + sums["test_y"]).encode()).hexdigest()[:16],
            # Likewise the validation images, which models are chosen and promoted on.
            "val_digest": (hashlib.sha256((sums["val_x"] + sums["val_y"]).encode()).hexdigest()[:16]
                           if val is not None else ""),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def resolve_data_dir(uri: str) -> Path:
    """A local folder holding the data: the path itself, or the local copy of an MLflow
    artifact URI such as runs:/<run_id>/data (read in place when the store is local)."""
    parsed = urllib.parse.urlparse(uri)
    if not parsed.scheme or len(parsed.scheme) == 1 or parsed.scheme == "file":
        return local_path(uri)
    import mlflow

    if parsed.scheme == "runs":
        from mlflow.tracking.artifact_utils import get_artifact_uri

        run_id, _, path = parsed.path.lstrip("/").partition("/")
        artifact_uri = get_artifact_uri(run_id=run_id, artifact_path=path or DATA_DIR)
        if urllib.parse.urlparse(artifact_uri).scheme in ("", "file"):
            return local_path(artifact_uri)
        uri = artifact_uri
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:
        raise DataError(f"cannot fetch data from {uri}: {exc}") from None


# The MLflow dataset name of each set, by the context it is logged under.
DATASET_NAMES = {"training": "cifar10-train", "validation": "cifar10-val", "testing": "cifar10-test"}


def data_inputs(sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(name, x, y, context) of each non-empty set of `sets` (context -> (x, y)), as the steps
    log them with mlflow.log_input."""
    return [(DATASET_NAMES[context], x, y, context) for context, (x, y) in sets.items() if len(y)]


def numpy_dataset(name: str, x: np.ndarray, y: np.ndarray, uri):
    """An MLflow dataset of these arrays, its source the URI they were read from (as a URI MLflow
    can show: a runs:/ URI becomes its artifact location; one it cannot type is kept as a tag),
    or an MLflow DatasetSource as it is."""
    import warnings

    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if isinstance(uri, str) and uri.startswith("runs:/"):
        from mlflow.tracking.artifact_utils import get_artifact_uri

        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        uri = get_artifact_uri(run_id=run_id, artifact_path=path or DATA_DIR)
    with warnings.catch_warnings():
        # A local path matches two equivalent source types in MLflow's registry; it picks one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        try:
            return mlflow.data.from_numpy(features=x, targets=y, source=uri, name=name)
        except mlflow.exceptions.MlflowException:
            return mlflow.data.from_numpy(features=x, targets=y, source=CodeDatasetSource(tags={"uri": uri}), name=name)


def load_data(uri: str) -> CifarData:
    """The data set that download_data wrote, after checking every array against the manifest."""
    folder = resolve_data_dir(uri)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{folder}: no {MANIFEST}; point at the '{DATA_DIR}' output of download_data")
    try:
        manifest = json.loads(manifest_path.read_text())
        sums = manifest["sha256"]
    except (ValueError, KeyError) as exc:
        raise DataError(f"{manifest_path}: unreadable manifest ({exc})") from None
    arrays = {}
    names = ARRAY_NAMES + (VAL_ARRAY_NAMES if "val_x" in sums else ())
    for name in names:
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing")
        if sha256_file(path) != sums.get(name):
            raise DataError(f"{path}: checksum mismatch, the file is corrupt or was changed; run download_data again")
        arrays[name] = np.load(path, allow_pickle=False)
    return CifarData(
        **arrays,
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
        classes=tuple(manifest["classes"]),
        digest=manifest["digest"],
        test_digest=manifest["test_digest"],
        source=manifest["source"],
        val_digest=manifest.get("val_digest", ""),
    )
