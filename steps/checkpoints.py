"""Checkpoints: where a config's checkpoint lives, how often and under what lock it is written;
written atomically, loaded without running code; and the random state they hold."""

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from steps.errors import StepError
from steps.recipes import TrainConfig

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 3  # 2: holds the EMA's state ("ema", None when off); 3: history by epoch (test_every)
CHECKPOINT_INTERVAL_S = 60.0  # default of CIFAR10_CHECKPOINT_INTERVAL


def checkpoint_root() -> Path:
    return Path(os.environ.get("CIFAR10_CHECKPOINTS", Path.home() / ".cache" / "cifar10-mlflow" / "checkpoints"))


def checkpoint_interval() -> float:
    """Seconds of training between checkpoints, from CIFAR10_CHECKPOINT_INTERVAL."""
    value = os.environ.get("CIFAR10_CHECKPOINT_INTERVAL", "").strip()
    if not value:
        return CHECKPOINT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StepError(f"CIFAR10_CHECKPOINT_INTERVAL is a number of seconds >= 0 (0 = every epoch); got {value!r}")
    return seconds


def checkpoint_key(cfg: TrainConfig, data_digest: str, code: str, tracking_uri: str) -> str:
    """Same config on the same data with the same code and tracking store, same key: the rerun
    of a command finds its checkpoint, and nothing else does (weights of older code, or a run of
    another store, which could not hold the resumed run's history). Device and precision are
    left out, so a run may resume on other hardware."""
    blob = json.dumps({"config": asdict(cfg), "data_digest": data_digest, "code": code,
                       "store": store_identity(tracking_uri)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def store_identity(tracking_uri: str) -> str:
    """The tracking URI with a relative local path made absolute: `sqlite:///mlflow.db` in two
    folders is two stores."""
    if tracking_uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(tracking_uri.removeprefix("sqlite:///")).resolve())
    if "://" not in tracking_uri and tracking_uri != "databricks":  # a plain folder of runs
        return str(Path(tracking_uri).resolve())
    return tracking_uri


def read_checkpoint(path: Path, key: str) -> dict:
    try:
        state = load_checkpoint(path)
    except Exception as exc:  # unpickling errors come in many types
        raise StepError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); delete it to start over") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
        raise StepError(f"{path}: a checkpoint of another format or config; delete it to start over")
    return state


@contextmanager
def exclusive(folder: Path):
    """Hold a lock on folder for the duration, so two runs of one config never write the same
    checkpoint. The kernel drops the lock when the process dies, kill -9 included."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StepError(f"another train with the same config and data is running (checkpoint folder {folder})") from None
        yield


def save_checkpoint(path: Path, state: dict) -> None:
    """Write state to path atomically: to a temporary file in the same folder, flushed and
    fsynced, then renamed over the old one. A crash at any point leaves either the previous
    checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the folder's entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint, loaded on the CPU with weights_only=True (so it
    holds only tensors and plain Python values, and loading it can never run code)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def rng_state(generator: torch.Generator) -> dict:
    """Every random state training draws from, as tensors a weights_only load accepts."""
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
