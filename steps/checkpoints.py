"""Checkpoints: written atomically, loaded without running code, and the random state they hold."""

import os
import tempfile
from pathlib import Path

import torch


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
