"""A smoke run of benchmarks/augment_time.py on a few images."""

import json

import pytest

from benchmarks import augment_time


def test_augment_time_rows_per_worker_count(tmp_path):
    out = tmp_path / "augment.json"
    result = augment_time.main(["--images", "64", "--batch-size", "16", "--workers", "0,2", "--repeats", "2",
                                "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    base, pooled = saved["rows"]
    assert (base["workers"], pooled["workers"]) == (0, 2) and base["vs_0_workers"] == 1.0
    assert len(pooled["seconds"]) == 2 and pooled["median_s"] > 0 and pooled["vs_0_workers"] > 0


def test_augment_time_refuses_a_batched_policy(tmp_path):
    with pytest.raises(SystemExit, match="not a per-image CPU policy"):
        augment_time.main(["--policy", "tensor", "--images", "16", "--out", str(tmp_path / "a.json")])
