"""The version of the pipeline's code, as steps reuse and checkpoints are keyed to it."""

import hashlib
from functools import cache
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
CODE_TAG = "pipeline.code_version"  # the run tag main sets on every step it starts


@cache
def code_version(root: Path = PROJECT_DIR) -> str:
    """A hash of the code the steps run. Unlike the git commit MLflow records, it also changes
    with uncommitted edits, so a reused step or a resumed checkpoint really ran this code."""
    digest = hashlib.sha256()
    files = [root / "MLproject", *sorted((root / "steps").rglob("*.py")), *sorted((root / "cifar_models").rglob("*.py"))]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
