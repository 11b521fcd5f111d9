"""Smoke runs of benchmarks/step_time.py: its modes, on one small batch, one timed step each."""

import json

import pytest
import torch

from benchmarks import step_time


def test_step_time_rows_per_model_and_layout(tmp_path):
    out = tmp_path / "step_time.json"
    result = step_time.main(["--models", "fast_net_small,separable_net", "--batch-sizes", "4", "--repeats", "1",
                             "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    rows = saved["rows"]
    layouts = 4 if saved["machine"]["native_bf16"] else 2
    assert [r["model"] for r in rows] == ["fast_net_small"] * layouts + ["separable_net"] * layouts
    for model in ("fast_net_small", "separable_net"):
        first, *rest = [r for r in rows if r["model"] == model]
        assert (first["autocast"], first["channels_last"], first["vs_fp32_nchw"]) == ("None", False, 1.0)
        for r in rest:
            assert r["median_ms"] > 0 and r["vs_fp32_nchw"] == pytest.approx(r["median_ms"] / first["median_ms"])
    assert saved["command"] == "python benchmarks/step_time.py --models fast_net_small,separable_net " \
                               f"--batch-sizes 4 --repeats 1 --device cpu --out {out}"


def test_step_time_forward_mode_times_inference_at_the_threads_asked(tmp_path):
    out = tmp_path / "forward.json"
    threads = torch.get_num_threads()
    try:
        saved = step_time.main(["--forward", "--threads", "1", "--models", "fast_net_small", "--batch-sizes", "2",
                                "--repeats", "1", "--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # process-wide: the tests after this one keep their threads
    assert saved["timed"] == "inference forward" and saved["machine"]["threads"] == 1
    assert [r["channels_last"] for r in saved["rows"]][:2] == [False, True]
    assert all(r["median_ms"] > 0 for r in saved["rows"])


def test_step_time_whiten_bias_rows_compare_a_trainable_and_a_frozen_bias(tmp_path):
    saved = step_time.main(["--whiten-bias", "--models", "fast_net_small", "--batch-sizes", "2", "--repeats", "1",
                            "--device", "cpu", "--out", str(tmp_path / "whiten.json")])
    trains, frozen = saved["rows"]
    assert (trains["whiten_bias"], frozen["whiten_bias"]) == ("trains", "frozen")
    assert trains["vs_bias_trains"] == 1.0
    assert frozen["vs_bias_trains"] == pytest.approx(frozen["median_ms"] / trains["median_ms"])


def test_step_time_muon_rows_time_the_recipe_step_with_sgd_then_muon(tmp_path, monkeypatch):
    from steps import optim

    built = []
    real_build = optim.build_optimizer

    def spy(name, model, lr, weight_decay):
        optimizer = real_build(name, model, lr, weight_decay)
        built.append((type(optimizer).__name__, model.whiten.weight.requires_grad, model.whiten.bias.requires_grad))
        return optimizer

    monkeypatch.setattr(optim, "build_optimizer", spy)
    saved = step_time.main(["--muon", "--models", "fast_net_small", "--batch-sizes", "2", "--repeats", "1",
                            "--device", "cpu", "--out", str(tmp_path / "muon.json")])
    sgd, muon = saved["rows"]
    assert (sgd["optimizer"], muon["optimizer"], sgd["vs_sgd"]) == ("sgd", "muon", 1.0)
    assert muon["vs_sgd"] == pytest.approx(muon["median_ms"] / sgd["median_ms"])
    # as in the cpu recipe: the whitening filters frozen, their bias training
    assert built == [("SGD", False, True), ("MuonSGD", False, True)]
