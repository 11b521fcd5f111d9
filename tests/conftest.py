"""Fixtures shared across the suite. Every test that touches MLflow gets its own SQLite
tracking store under tmp_path, so nothing lands in the repository."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store and registry for this test (in-process and subprocesses).

    The test runs in tmp_path: with a SQLite store, MLflow puts artifacts in ./mlruns."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def synthetic_data_dir(tmp_path) -> Path:
    """A small synthetic data set in download_data's on-disk format."""
    from steps.data import synthetic, write_data

    out = tmp_path / "data"
    write_data(out, *synthetic(n_train=200, n_test=100), source="synthetic")
    return out


def mlflow_run_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment for an `mlflow run` subprocess: this venv first on PATH, the test's store."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
