"""benchmarks/train_flops.py: its counts against an independent count from the layers' shapes, and
its totals against its own rows."""

import json
import math

import pytest
import torch
from torch import nn

from benchmarks import train_flops
from steps import hardware
from steps.data import load_data, synthetic, write_data
from steps.recipes import TrainConfig
from steps.training import start_training

CPU = hardware.Hardware(torch.device("cpu"), None, False)


def shape_flops(model: nn.Module, side: int) -> dict[nn.Module, int]:
    """2 x output elements x fan-in for each conv and linear layer of one forward of one image."""
    flops, hooks = {}, []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            fan_in = module.in_features
        else:
            continue
        hooks.append(module.register_forward_hook(
            lambda m, _, out, fan_in=fan_in: flops.__setitem__(m, 2 * out.numel() * fan_in)))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, side, side))
    for hook in hooks:
        hook.remove()
    return flops


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flops") / "data"
    write_data(folder, *synthetic(n_train=64, n_test=10), source="synthetic")
    return load_data(str(folder))


def test_forward_and_backward_counts_match_the_layers_shapes(data):
    cfg = TrainConfig(model="fast_net_small", epochs=2, batch_size=8, whiten=True, whiten_bias_epochs=1)
    training = start_training(cfg, data, CPU)
    by_layer = shape_flops(training.model, 32)
    assert train_flops.forward_flops(training) == sum(by_layer.values())

    row = train_flops.recipe_flops(cfg, training, train_images=64, batch=4)
    trains, frozen = row["by_epoch_kind"]
    assert (trains["epochs"], trains["whiten_bias_trains"], frozen["epochs"], frozen["whiten_bias_trains"]) == \
        ([1], True, [2], False)
    # A step is about three forwards (the input and the weight gradients); the frozen whitening
    # filters need neither, and its bias only the gradient at its output.
    forward = sum(by_layer.values()) / 1e9
    assert 2.9 * forward < trains["gflop_per_image"] <= 3 * forward
    # With the bias frozen too, nothing before the first block trains, so the backward stops at
    # that block's conv: what is saved is its input gradient, as many FLOPs as its forward.
    first_block_conv = training.model.blocks[0][0][0]
    assert (trains["gflop_per_image"] - frozen["gflop_per_image"]) * 1e9 == pytest.approx(by_layer[first_block_conv])


def test_recipe_totals_add_up_from_their_epochs(tmp_path):
    out = tmp_path / "flops.json"
    result = train_flops.main(["--recipes", "cpu,fast", "--train-images", "2048", "--batch", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cpu, fast = result["rows"]
    assert (cpu["recipe"], cpu["model"], fast["recipe"], fast["model"]) == ("cpu", "fast_net_small", "fast", "fast_net")
    assert (cpu["steps_per_epoch"], fast["steps_per_epoch"]) == (16, 2)  # 2048 // 128, 2048 // 1024
    low, full = cpu["by_epoch_kind"]
    assert (low["side"], low["epochs"], full["side"], full["epochs"]) == (24, [1, 2, 3, 4, 5], 32, [6, 7, 8, 9])
    assert low["gflop_per_image"] < 0.7 * full["gflop_per_image"]
    # Muon orthogonalises the filters with matrix products each step; SGD's update has none.
    assert low["gflop_per_optimizer_step"] > 0 and fast["by_epoch_kind"][0]["gflop_per_optimizer_step"] == 0
    for row in (cpu, fast):
        total = sum(len(k["epochs"]) * row["steps_per_epoch"]
                    * (row["batch_size"] * k["gflop_per_image"] + k["gflop_per_optimizer_step"])
                    for k in row["by_epoch_kind"]) / 1e6
        assert row["total_pflop"] == pytest.approx(total)
    assert cpu["vs_first"] == 1 and fast["vs_first"] == pytest.approx(fast["total_pflop"] / cpu["total_pflop"])
    assert result["command"] == f"python benchmarks/train_flops.py --recipes cpu,fast --train-images 2048 --batch 4 " \
                                f"--out {out}"


def test_an_unknown_recipe_or_model_is_one_line_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="^error: unknown model 'nonet'"):
        train_flops.main(["--recipes", "cpu,fast:nonet", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_epochs_after_a_second_colon_count_a_budget_s_choice(tmp_path):
    # Twice the cpu recipe's 9 epochs keep its share at low resolution (10 of 18): exactly twice the arithmetic.
    result = train_flops.main(["--recipes", "cpu,cpu::18", "--train-images", "512", "--batch", "4",
                               "--out", str(tmp_path / "flops.json")])
    nine, eighteen = result["rows"]
    assert (nine["epochs"], eighteen["epochs"]) == (9, 18) and eighteen["model"] == nine["model"]
    assert [len(k["epochs"]) for k in eighteen["by_epoch_kind"]] == [10, 8]
    assert eighteen["vs_first"] == pytest.approx(2.0)
    with pytest.raises(SystemExit, match="^error: 'cpu::x': epochs after the second colon are a whole number"):
        train_flops.main(["--recipes", "cpu::x", "--out", str(tmp_path / "x.json")])
