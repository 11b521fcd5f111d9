"""A smoke run of benchmarks/epoch_bookkeeping.py on a few test images, two repeats."""

import json

import mlflow

from benchmarks import epoch_bookkeeping
from cifar_models import create_model


def test_epoch_bookkeeping_times_each_piece_of_a_full_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bookkeeping.json"
    try:
        result = epoch_bookkeeping.main(["--recipe", "cpu", "--test-images", "20", "--repeats", "2", "--device", "cpu",
                                         "--out", str(out)])
    finally:
        mlflow.set_tracking_uri(None)  # the benchmark's temporary store is gone
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["model"] == "fast_net_small" and saved["test_images"] == 20
    assert set(saved["median_ms"]) == {"test_pass", "checkpoint", "metrics_synchronous", "metrics_queued"}
    assert all(len(times) == 2 and min(times) > 0 for times in saved["seconds"].values())
    # The weights three times over (the model, its momentum buffers, the EMA's copy): the
    # checkpoint timed is train's whole state, not the model's alone.
    weights_mb = sum(p.numel() for p in create_model("fast_net_small").parameters()) * 4 / 1e6
    assert saved["checkpoint_mb"] > 2.9 * weights_mb
