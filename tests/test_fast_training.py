"""The speed recipe's parts on tiny inputs: test-time augmentation, the EMA of the weights,
the whitening init of the first conv, progressive resizing, and how a recipe and explicit
options combine."""

import numpy as np
import pytest
import torch
from torch import nn

from cifar_models.inference import predict_logits
from cifar_models.registry import create_model
from steps.data import channel_stats, synthetic
from steps.errors import StepError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --- test-time augmentation ----------------------------------------------------------------------------

def test_tta_views_average_to_plain_on_a_flip_and_shift_symmetric_image():
    model = create_model("fast_net").eval()
    rng = np.random.default_rng(0)
    # A constant image is its own mirror and its own one-pixel translation (reflect padding).
    constant = np.broadcast_to(rng.integers(0, 256, (4, 1, 1, 3), dtype=np.uint8), (4, 32, 32, 3)).copy()
    plain = predict_logits(model, constant, MEAN, STD)
    for tta in ("flip", "flip_shift"):
        assert torch.allclose(predict_logits(model, constant, MEAN, STD, tta=tta), plain, atol=1e-5)
    # A mirror-symmetric image: flip TTA is plain, flip_shift in general is not.
    half = rng.integers(0, 256, (4, 32, 16, 3), dtype=np.uint8)
    mirrored = np.concatenate([half, half[:, :, ::-1]], axis=2)
    assert torch.allclose(predict_logits(model, mirrored, MEAN, STD, tta="flip"),
                          predict_logits(model, mirrored, MEAN, STD), atol=1e-5)


def test_tta_shapes_batches_and_unknown_mode():
    model = create_model("fast_net").eval()
    images = synthetic(n_train=5, n_test=0)[0]
    for tta in ("none", "flip", "flip_shift"):
        logits = predict_logits(model, images, MEAN, STD, batch_size=2, tta=tta)
        assert logits.shape == (5, 10) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert torch.allclose(logits, predict_logits(model, images, MEAN, STD, batch_size=5, tta=tta), atol=1e-5)
    assert not torch.allclose(predict_logits(model, images, MEAN, STD, tta="flip_shift"),
                              predict_logits(model, images, MEAN, STD, tta="flip"))
    with pytest.raises(ValueError, match="unknown tta 'rot'"):
        predict_logits(model, images, MEAN, STD, tta="rot")


# --- whitening init ----------------------------------------------------------------------------------

def test_whitening_decorrelates_patches_and_leaves_a_plain_loadable_conv():
    from steps import whiten
    from cifar_models.preprocess import normalize, to_nchw

    images = synthetic(n_train=300, n_test=0)[0]
    mean, std = channel_stats(images)
    model = create_model("fast_net")
    assert whiten.whiten_first_conv(model, images, mean, std, eps=1e-9)
    conv = model.whiten
    assert conv.weight.shape == (24, 3, 2, 2) and not conv.weight.requires_grad and conv.bias.requires_grad
    assert torch.equal(conv.weight[:12], -conv.weight[12:])
    with torch.no_grad():
        features = conv(normalize(to_nchw(images), mean, std))[:, :12]  # the positive half
    flat = features.permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert flat.mean(0).abs().max() < 1e-3  # the bias centres them
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)
    # Just weights: a fresh registry model takes the state_dict as it is.
    create_model("fast_net").load_state_dict(model.state_dict())


def test_whitening_skips_a_model_without_a_whitening_conv():
    from steps import whiten

    images = synthetic(n_train=20, n_test=0)[0]
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not whiten.whiten_first_conv(model, images, MEAN, STD)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_frozen_whitening_bias_stays_put_while_the_rest_trains():
    from cifar_models.preprocess import normalize, to_nchw
    from steps import hardware, loop, optim, whiten

    x, y, *_ = synthetic(n_train=32, n_test=0)
    hw = hardware.hardware("cpu", "fp32")
    model = create_model("fast_net_small")
    assert whiten.whiten_first_conv(model, x, MEAN, STD)
    optimizer = optim.build_optimizer("sgd", model, 0.1, 5e-4)
    images = normalize(to_nchw(x), MEAN, STD)
    labels = torch.as_tensor(y, dtype=torch.int64)

    def step():
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        loop.train_step(model, optimizer, nn.CrossEntropyLoss(), images, labels, hw)
        return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}

    whiten.train_whiten_bias(model, False)
    moved = step()
    assert "whiten.bias" not in moved and model.whiten.bias.grad is None and "head.weight" in moved
    whiten.train_whiten_bias(model, True)
    moved = step()
    assert "whiten.bias" in moved and "whiten.weight" not in moved


def test_the_whitening_bias_trains_for_the_first_epochs_only_when_whitened():
    from steps.recipes import TrainConfig, whiten_bias_trains

    def trains(**kw):
        return [whiten_bias_trains(TrainConfig(epochs=4, **kw), epoch) for epoch in range(1, 5)]

    assert trains(whiten=True, whiten_bias_epochs=1) == [True, False, False, False]
    assert trains(whiten=True, whiten_bias_epochs=0) == [True] * 4
    assert trains(whiten=False, whiten_bias_epochs=1) == [True] * 4  # an ordinary conv trains as it is


def test_dirac_starts_each_block_conv_as_the_identity_and_whitening_still_sets_the_first(tmp_path):
    from dataclasses import replace
    from steps import hardware
    from steps.data import load_data, write_data
    from steps.recipes import RECIPES, TrainConfig
    from steps.training import start_training

    write_data(tmp_path / "data", *synthetic(n_train=256, n_test=16), source="synthetic")
    data = load_data(str(tmp_path / "data"))
    cpu = hardware.hardware("cpu", "fp32")
    cfg = TrainConfig(**{**RECIPES["cpu"], "epochs": 1})
    plain, dirac = (start_training(replace(cfg, dirac=on), data, cpu).model for on in (False, True))
    convs = [m for m in dirac.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    x = torch.randn(2, 128, 8, 8)
    for conv in convs:
        out = nn.functional.conv2d(x[:, :conv.in_channels], conv.weight, padding=1)
        assert torch.allclose(out[:, :conv.in_channels], x[:, :conv.in_channels])  # passed through
    # The same seed's whitening, head and filters beyond the first in_channels (block 2's first
    # conv: 32 in, 128 out) as without dirac.
    assert torch.equal(dirac.whiten.weight, plain.whiten.weight) and torch.equal(dirac.head.weight, plain.head.weight)
    plain_convs = [m for m in plain.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert torch.equal(convs[2].weight[32:], plain_convs[2].weight[32:])
    assert not torch.allclose(plain_convs[1].weight, convs[1].weight)


def test_train_tests_after_every_nth_epoch_and_always_after_the_last():
    from steps.errors import StepError
    from steps.recipes import RECIPES, TrainConfig, tests_after, validate

    def tested(epochs, every):
        return [e for e in range(1, epochs + 1) if tests_after(TrainConfig(epochs=epochs, test_every=every), e)]

    assert tested(4, 1) == [1, 2, 3, 4]
    assert tested(5, 2) == [2, 4, 5]
    assert tested(15, RECIPES["fast"]["test_every"]) == [5, 10, 15]
    assert tested(3, 7) == [3]  # longer than the run: the last epoch alone
    with pytest.raises(StepError, match="test_every is a number of epochs >= 1"):
        validate(TrainConfig(test_every=0))


# --- the weight average ------------------------------------------------------------------------------

def test_ema_follows_the_weights_at_its_warmed_up_decay_and_averages_batchnorm_stats():
    from steps import averaging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = averaging.WeightAverage(model, decay=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    ema.update_parameters(model)  # the first update copies
    assert all(torch.equal(a, p) for a, p in zip(ema.module.parameters(), start))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model(torch.randn(8, 4) * 3 + 5)  # moves the running statistics
    ema.update_parameters(model)  # the first average: decay (1 + 1) / (10 + 1), not 0.9 yet
    d = 2 / 11
    for a, p0, p in zip(ema.module.parameters(), start, model.parameters()):
        assert torch.allclose(a, d * p0 + (1 - d) * p)
    bn, bn_ema = model[1], ema.module[1]
    assert torch.allclose(bn_ema.running_mean, (1 - d) * bn.running_mean)  # the average started at 0
    assert bn_ema.num_batches_tracked == bn.num_batches_tracked
    assert ema.module is not model and not torch.equal(ema.module[0].weight, model[0].weight)
    for _ in range(200):  # past the warm-up the decay is the one asked for
        ema.update_parameters(model)
    before = [a.clone() for a in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for a, b, p in zip(ema.module.parameters(), before, model.parameters()):
        assert torch.allclose(a, 0.9 * b + 0.1 * p)


def test_ema_decay_warms_up_to_its_cap():
    from steps.averaging import ema_decay_at

    assert float(ema_decay_at(0.99, 1)) == 2 / 11 and float(ema_decay_at(0.99, 80)) == 81 / 90
    assert float(ema_decay_at(0.99, 10_000)) == 0.99 and float(ema_decay_at(0.5, 20)) == 0.5


def test_ema_state_dict_round_trips_into_a_fresh_average():
    from steps import averaging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = averaging.WeightAverage(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update_parameters(model)
    state = ema.state_dict()
    assert set(state) == {"n_averaged", *(f"module.{k}" for k in model.state_dict())}
    fresh = averaging.WeightAverage(model, decay=0.9)
    fresh.load_state_dict(state)
    assert int(fresh.n_averaged) == 3 and torch.equal(fresh.module[0].weight, ema.module[0].weight)


def test_bn_biases_get_their_lr_multiple_and_the_same_decay_per_step():
    from steps import optim, schedules

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9, 2))
    optimizer = optim.build_optimizer("sgd", model, 1.0, 5e-4, bn_bias_lr=64.0)
    scheduler = schedules.lambda_scheduler(optimizer, lambda step: 0.1 * (step + 1))
    rest, biases = optimizer.param_groups
    assert biases["params"] == [model[1].bias] and len(rest["params"]) == len(list(model.parameters())) - 1
    assert scheduler.get_last_lr() == pytest.approx([0.1, 6.4])
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.2, 12.8])  # the multiple holds all along the schedule
    assert rest["lr"] * rest["weight_decay"] == pytest.approx(biases["lr"] * biases["weight_decay"])
    plain = optim.build_optimizer("sgd", model, 1.0, 5e-4)
    assert len(plain.param_groups) == 1
    with pytest.raises(StepError, match="needs optimizer sgd"):
        optim.build_optimizer("muon", model, 1.0, 5e-4, bn_bias_lr=64.0)


def test_frozen_bn_scales_stay_at_one_while_their_biases_train():
    from steps import optim
    from steps.recipes import TrainConfig, validate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    optim.freeze_bn_scales(model)
    optimizer = optim.build_optimizer("sgd", model, 0.1, 5e-4, bn_bias_lr=8.0)
    bias = model[1].bias.detach().clone()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 8, 8)), torch.randint(0, 2, (8,)))
    loss.backward()
    optimizer.step()
    assert torch.equal(model[1].weight, torch.ones(4)) and not torch.equal(model[1].bias, bias)
    with pytest.raises(StepError, match="needs optimizer sgd"):
        validate(TrainConfig(optimizer="muon", bn_bias_lr=64.0))
    with pytest.raises(StepError, match="positive"):
        validate(TrainConfig(bn_bias_lr=0.0))


def test_the_training_step_is_compiled_as_cuda_graphs_on_a_gpu_only():
    from steps.hardware import Hardware
    from steps.training import compile_mode

    assert compile_mode(Hardware(torch.device("cuda"), torch.bfloat16, True)) == "reduce-overhead"
    assert compile_mode(Hardware(torch.device("cpu"), None, True)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_epoch_on_a_gpu_does_not_wait_for_it_step_by_step():
    """The host only queues work on the GPU during an epoch: the number of points where it
    waits for the GPU (torch's sync debug mode warns at each) is the same for 2 steps as for
    8, i.e. the batches, the device-side augmentation, the optimizer and the EMA add none.
    Loss checks are put out of reach (check_every) so only the epoch's end reads back."""
    import warnings

    from steps import averaging, hardware, loop, optim, schedules
    from steps.batches import iterate_batches
    from steps.augment import build_policy

    hw = hardware.hardware("cuda")
    device = hw.device
    x = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (512,), device=device)
    model = hardware.build_model("fast_net_small", 0, hw)
    optimizer = optim.build_optimizer("sgd", model, 1.0, 5e-4)
    scheduler = schedules.lambda_scheduler(optimizer, lambda step: 0.01)
    ema = averaging.WeightAverage(model, 0.99)
    policy = build_policy("flip_translate", (0.5, 0.5, 0.5))
    generator = torch.Generator().manual_seed(0)

    def waits(steps: int) -> int:
        batches = iterate_batches(x[:64 * steps], y[:64 * steps], 64, generator=generator, drop_last=True,
                                         augment=policy)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.train_one_epoch(model, optimizer, scheduler, batches, mean=(0.5,) * 3, std=(0.25,) * 3,
                                       loss_fn=nn.CrossEntropyLoss(), hw=hw, augment=policy, generator=generator,
                                       ema=ema, check_every=10**6)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    waits(2)  # first calls: cuDNN's algorithm search, the allocators' first blocks
    assert waits(8) == waits(2)


@pytest.mark.parametrize("optimizer, aug", [("sgd", "tensor"), ("muon", "altflip_translate")])
def test_resume_with_ema_and_whitening_is_exact(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch, optimizer,
                                                aug):
    """As test_resume's crash test, with the EMA and the frozen whitening conv in the state,
    and a first epoch at low resolution, with the whitening bias training, that the resumed
    run must not repeat; and with Muon's state (its momentum buffers) in the checkpoint, and
    the second epoch's half of an alternating flip."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from steps import checkpoints
    from steps.recipes import TrainConfig
    from steps.train import train

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("CIFAR10_CHECKPOINT_INTERVAL", "0")
    cfg = TrainConfig(epochs=2, batch_size=50, max_lr=0.05, aug=aug, schedule="warmup_linear",
                      whiten=True, ema=0.9, low_res=24, low_res_pct=0.5, whiten_bias_epochs=1, optimizer=optimizer)
    real_save = checkpoints.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        raise RuntimeError("killed after epoch 1")

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError), mlflow.start_run():
        train(cfg, str(synthetic_data_dir), device="cpu")
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    with mlflow.start_run() as resumed:
        train(cfg, str(synthetic_data_dir), device="cpu")
    with mlflow.start_run() as straight:
        train(cfg, str(synthetic_data_dir), device="cpu")

    client = MlflowClient()
    assert client.get_run(resumed.info.run_id).data.tags["resumed_from_epoch"] == "1"
    a, b = (torch.load(client.download_artifacts(run.info.run_id, "weights/state_dict.pt", str(tmp_path / name)),
                       weights_only=True) for run, name in ((resumed, "a"), (straight, "b")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "n_averaged" not in a  # the saved weights are the averaged network's own state_dict
    create_model("fast_net").load_state_dict(a)
    metrics = [client.get_run(r.info.run_id).data.metrics["test_accuracy"] for r in (resumed, straight)]
    assert metrics[0] == metrics[1]


# --- alternating flip ----------------------------------------------------------------------------------


def test_alternating_flips_show_every_image_both_ways_every_two_epochs():
    from steps.augment import alternating_flips

    first = alternating_flips(1000, seed=3, epoch=1)
    assert 400 < int(first.sum()) < 600
    assert torch.equal(alternating_flips(1000, 3, 2), ~first) and torch.equal(alternating_flips(1000, 3, 5), first)
    assert not torch.equal(alternating_flips(1000, 4, 1), first)  # another seed, another half


@pytest.mark.parametrize("stored_as", ["numpy", "tensor"])
def test_batches_mirror_the_images_an_alternating_flip_names_and_the_policy_adds_no_coin(stored_as):
    from steps.augment import TensorPolicy, alternating_flips
    from steps.batches import iterate_batches

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64)  # labels that name each image's stored index
    flips = alternating_flips(64, seed=0, epoch=2)
    stored = (torch.from_numpy(x), torch.from_numpy(y)) if stored_as == "tensor" else (x, y)
    seen = []
    for images, labels in iterate_batches(*stored, 16, generator=torch.Generator().manual_seed(1), flips=flips):
        want = torch.from_numpy(x[labels.numpy()]).permute(0, 3, 1, 2)
        want = torch.where(flips[labels].view(-1, 1, 1, 1), want.flip(-1), want)
        assert torch.equal(images, want)
        seen += labels.tolist()
    assert sorted(seen) == list(range(64))
    # The policy then shifts (not here: max_shift 0) but does not flip again at random.
    batch = torch.from_numpy(x).permute(0, 3, 1, 2)
    still = TensorPolicy((0.5,) * 3, max_shift=0, cutout=0, alternate_flip=True)
    assert torch.equal(still(batch, torch.Generator().manual_seed(0)), batch)
    coin = TensorPolicy((0.5,) * 3, max_shift=0, cutout=0)
    assert not torch.equal(coin(batch, torch.Generator().manual_seed(0)), batch)


# --- progressive resizing ----------------------------------------------------------------------------

def test_the_first_fraction_of_the_epochs_is_low_res_and_never_the_last():
    from steps.recipes import TrainConfig, epoch_size

    def sizes(epochs, **kw):
        cfg = TrainConfig(epochs=epochs, **kw)
        return [epoch_size(cfg, epoch) for epoch in range(1, epochs + 1)]

    assert sizes(9, low_res=24, low_res_pct=5 / 9) == [24] * 5 + [None] * 4
    assert sizes(2, low_res=24, low_res_pct=5 / 9) == [24, None]  # a short smoke run keeps a full-size epoch
    assert sizes(1, low_res=24, low_res_pct=5 / 9) == [None]
    assert sizes(4, low_res=0, low_res_pct=0.5) == [None] * 4
    assert sizes(4, low_res=20, low_res_pct=0.0) == [None] * 4


@pytest.mark.parametrize("field, value", [("low_res", -1), ("low_res", 40), ("low_res_pct", 1.0), ("low_res_pct", -0.1)])
def test_low_res_settings_out_of_range_are_refused(field, value):
    from steps.errors import StepError
    from steps.recipes import TrainConfig, validate

    with pytest.raises(StepError, match=field):
        validate(TrainConfig(**{field: value}))


def test_a_low_res_the_model_cannot_take_is_refused_before_any_work():
    from steps.errors import StepError
    from steps.recipes import TrainConfig, validate

    validate(TrainConfig(model="fast_net_small", low_res=16))  # 16 -> 15 -> 7 -> 3 -> 1
    with pytest.raises(StepError, match="custom_resnet cannot take 16x16 images"):
        validate(TrainConfig(model="custom_resnet", low_res=16))  # its last 4x4 pool would get 2x2


def test_a_low_res_epoch_feeds_the_model_downscaled_channels_last_images():
    from steps import hardware, loop, optim, schedules
    from steps.batches import iterate_batches

    x, y, *_ = synthetic(n_train=64, n_test=0)
    hw = hardware.hardware("cpu", "fp32")
    model = hardware.prepare_model(create_model("fast_net_small"), hw)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    optimizer = optim.build_optimizer("sgd", model, 0.05, 0.0)
    scheduler = schedules.lambda_scheduler(optimizer, lambda step: 0.05)
    for size in (16, None):
        loop.train_one_epoch(model, optimizer, scheduler, iterate_batches(x, y, 32), mean=MEAN, std=STD,
                               loss_fn=nn.CrossEntropyLoss(), hw=hw, size=size)
    assert [tuple(t.shape[-2:]) for t in seen] == [(16, 16)] * 2 + [(32, 32)] * 2
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
    # The whole picture, smaller (not a crop of it): a left-to-right ramp keeps its ends.
    ramp = torch.linspace(-1, 1, 32).expand(1, 3, 32, 32)
    small = loop.downscale(ramp, 16)
    assert small[..., 0].max() < -0.85 and small[..., -1].min() > 0.85


# --- recipes -----------------------------------------------------------------------------------------

def test_recipe_beats_default_and_an_explicit_option_beats_the_recipe():
    from steps.recipes import RECIPES, TrainConfig, resolve_config

    cpu = resolve_config("cpu", {"epochs": None, "whiten": None})
    assert (cpu.model, cpu.epochs, cpu.batch_size, cpu.aug, cpu.whiten, cpu.ema, cpu.low_res) == (
        "fast_net_small", 9, 128, "altflip_translate", True, 0.99, 24)
    # Explicit wins even where it equals TrainConfig's default.
    mixed = resolve_config("cpu", {"epochs": 3, "batch_size": TrainConfig.batch_size, "whiten": False})
    assert (mixed.epochs, mixed.whiten, mixed.ema) == (3, False, 0.99)
    # TrainConfig's defaults are the reference recipe's, spelled out, for its own model.
    assert resolve_config("reference", {}) == TrainConfig(model="custom_resnet")
    for name in RECIPES:  # every recipe is a valid config
        from steps.recipes import validate
        validate(resolve_config(name, {}))


def test_cli_treats_the_empty_string_as_not_given(monkeypatch):
    from click.testing import CliRunner
    from steps import train as train_step

    seen = {}
    monkeypatch.setattr(train_step, "train", lambda cfg, data, device, precision, recipe: seen.update(
        cfg=cfg, recipe=recipe))
    args = ["--data", "d", "--recipe", "cpu", "--epochs", "", "--batch-size", "256", "--whiten", "",
            "--compile", "false", "--ema", "0.0", "--low-res", "", "--low-res-pct", "0.4", "--whiten-bias-epochs", "2",
            "--test-every", "3"]
    result = CliRunner().invoke(train_step.cli, args)
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.batch_size, cfg.whiten, cfg.compile, cfg.ema, cfg.low_res, cfg.low_res_pct,
            cfg.whiten_bias_epochs, cfg.test_every, seen["recipe"]) == (9, 256, True, False, 0.0, 24, 0.4, 2, 3, "cpu")
    result = CliRunner().invoke(train_step.cli, ["--data", "d", "--recipe", "turbo"])
    assert result.exit_code != 0 and "unknown recipe 'turbo'; known: auto, reference, fast, cpu" in result.output
    # auto: the recipe that fits the device train will use, logged with the reason.
    result = CliRunner().invoke(train_step.cli, ["--data", "d", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["recipe"] == "cpu" and seen["cfg"].model == "fast_net_small"


def test_each_recipe_names_its_model_and_auto_fits_the_device(monkeypatch):
    from steps.recipes import choose_recipe, gpu_warning, recipe_model

    assert [recipe_model(r) for r in ("reference", "fast", "cpu")] == ["custom_resnet", "fast_net", "fast_net_small"]
    assert choose_recipe("auto", "cuda:0") == ("fast", "device cuda:0")
    assert choose_recipe("auto", "cpu") == ("cpu", "device cpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert choose_recipe("auto") == ("cpu", "no CUDA device: torch.cuda.is_available() is False")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert choose_recipe("auto") == ("fast", "a CUDA device is present")
    assert choose_recipe("reference", "cpu") == ("reference", "named: reference")
    # A GPU recipe on a CPU warns; the CPU recipe, or any recipe on CUDA, does not.
    assert "made for a GPU" in gpu_warning("fast", "cpu") and "made for a GPU" in gpu_warning("reference", "cpu")
    assert gpu_warning("cpu", "cpu") is None and gpu_warning("fast", "cuda") is None


def test_mlproject_train_entry_passes_every_config_field():
    """A TrainConfig field the MLproject entry does not pass is unreachable through `mlflow run`."""
    from dataclasses import fields

    import yaml

    from steps.recipes import TrainConfig
    from tests.conftest import REPO

    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["train"]
    for field in fields(TrainConfig):
        assert field.name in entry["parameters"], field.name
        assert f"--{field.name.replace('_', '-')} {{{field.name}}}" in entry["command"], field.name
