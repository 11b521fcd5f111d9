"""A step fails in seconds, with one clear line, when its tracking server is unreachable."""

import subprocess
import sys
import time

from tests.conftest import mlflow_run_env


def test_unreachable_tracking_server_fails_fast(tmp_path):
    uri = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback there
    env = mlflow_run_env(uri)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "steps.download_data", "--source", "synthetic"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: MLflow tracking server {uri} is unreachable")
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f} s to notice"
    assert list(tmp_path.iterdir()) == []  # nothing written locally either
