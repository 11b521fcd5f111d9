"""A smoke run of benchmarks/train_speed.py: one seed, one epoch, 200 synthetic images."""

import json

from benchmarks import train_speed


def test_train_speed_smoke_on_cpu(synthetic_data_dir, tmp_path):
    out = tmp_path / "speed.json"
    result = train_speed.main(["--data", str(synthetic_data_dir), "--recipe", "cpu", "--seeds", "1",
                               "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    (row,) = saved["seeds"]
    assert row["train_seconds"] > 0 and 0 <= row["test_accuracy_tta"] <= 1
    assert saved["config"]["epochs"] == 1 and saved["config"]["whiten"] and saved["compile_warmup_seconds"] is None
    assert saved["summary"]["test_accuracy"]["median"] == row["test_accuracy"]
    assert saved["command"].startswith("python benchmarks/train_speed.py --data")
