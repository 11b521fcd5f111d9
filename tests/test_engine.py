"""The training modules on synthetic data: schedules, the Muon optimizer, batches, augmentation,
one epoch of training, the LR range test, the NaN guard and atomic checkpoints. A tiny network
stands in for the registry's models wherever the architecture does not matter, to keep this fast."""

import math
import subprocess

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from steps import checkpoints, hardware, loop, lr_range, optim, schedules
from steps.augment import POLICIES, TensorPolicy, build_policy, pixel_mean
from steps.batches import iterate_batches, num_batches
from steps.data import channel_stats, synthetic

CPU = hardware.hardware("cpu")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture(scope="module")
def toy():
    train_x, train_y, test_x, test_y = synthetic(n_train=512, n_test=256)
    mean, std = channel_stats(train_x)
    return train_x, train_y, test_x, test_y, mean, std


# --- schedules -------------------------------------------------------------------------------------------

def test_one_cycle_exact_at_known_steps():
    lr = lambda step: schedules.one_cycle_lr(step, 100, max_lr=1.0, pct_start=0.25, div_factor=10, final_div_factor=100)
    assert lr(0) == pytest.approx(0.1)
    assert lr(12.5) == pytest.approx(0.55)  # half way up: (0.1 + 1) / 2
    assert lr(25) == pytest.approx(1.0)
    assert lr(62.5) == pytest.approx(0.505)  # half way down: (1 + 0.01) / 2
    assert lr(100) == pytest.approx(0.01)
    assert max(lr(s) for s in range(101)) == lr(25)


def test_one_cycle_reference_recipe_peaks_at_epoch_5_of_24():
    steps_per_epoch = 98  # 50,000 images at batch 512, last partial batch dropped
    total = 24 * steps_per_epoch
    lr = lambda step: schedules.one_cycle_lr(step, total, 0.4, 5 / 24, 25, 1e4)
    assert lr(5 * steps_per_epoch) == pytest.approx(0.4)
    assert lr(5 * steps_per_epoch - 1) < 0.4 and lr(5 * steps_per_epoch + 1) < 0.4
    assert lr(0) == pytest.approx(0.4 / 25)
    assert lr(total) == pytest.approx(0.4 / 1e4)


def test_warmup_linear_exact_at_known_steps():
    lr = lambda step: schedules.warmup_linear_lr(step, 200, max_lr=2.0, warmup_steps=50)
    assert [lr(s) for s in (0, 25, 50, 125, 200)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])
    lr = lambda step: schedules.warmup_linear_lr(step, 200, 2.0, 50, start_factor=0.5, end_factor=0.1)
    assert [lr(s) for s in (0, 50, 200)] == pytest.approx([1.0, 2.0, 0.2])


def test_scheduler_follows_the_pure_function_and_resumes_from_its_state(tmp_path):
    lr_at = lambda step: schedules.one_cycle_lr(step, 20, 0.5, 0.3, 10, 50)
    model = tiny_net()
    optimizer = optim.build_optimizer("sgd", model, 1.0, 0.0)
    scheduler = schedules.lambda_scheduler(optimizer, lr_at)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s) for s in range(8)])

    checkpoints.save_checkpoint(tmp_path / "c.pt", {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    state = checkpoints.load_checkpoint(tmp_path / "c.pt")
    optimizer2 = optim.build_optimizer("sgd", model, 1.0, 0.0)
    scheduler2 = schedules.lambda_scheduler(optimizer2, lr_at)
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr_at(8))
    optimizer2.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr_at(9))


# --- device and precision ----------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_is_bf16_exactly_where_bf16_is_native_and_always_channels_last(native, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    hw = hardware.hardware("cpu", "auto")
    assert (hw.autocast, hw.channels_last) == ((torch.bfloat16, True) if native else (None, True))
    assert hardware.hardware("cpu", "fp32") == hardware.Hardware(torch.device("cpu"), None, True)
    assert hardware.hardware("cpu", "bf16") == hardware.Hardware(torch.device("cpu"), torch.bfloat16, True)


def test_native_bf16_probe_agrees_with_onednn():
    assert hardware.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_a_bf16_channels_last_step_keeps_float_batchnorm_and_loss(toy):
    train_x, train_y, _, _, mean, std = toy
    hw = hardware.hardware("cpu", "bf16")
    model = hardware.prepare_model(tiny_net(), hw)
    optimizer = optim.build_optimizer("sgd", model, 0.05, 0.0)
    images, labels = next(iterate_batches(train_x, train_y, 64))
    x = loop.model_input(images, mean, std, hw, None, None)
    assert x.is_contiguous(memory_format=torch.channels_last)
    loss, _ = loop.train_step(model, optimizer, nn.CrossEntropyLoss(), x, labels, hw)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model[1].running_mean.dtype == torch.float32


# --- optimizers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 216), (216, 32), (128, 1152)])
def test_orthogonalize_keeps_the_singular_vectors_and_brings_the_values_near_one(shape):
    g = 1e3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    out = optim.orthogonalize(g)
    assert out.shape == shape
    values = torch.linalg.svdvals(out)
    assert 0.6 < values.min() and values.max() < 1.25
    # Same singular vectors: U^T out V is diagonal, its diagonal the new singular values.
    core = u.T @ out @ vh.T
    assert torch.allclose(core, torch.diag(torch.diagonal(core)), atol=1e-3)


def test_orthogonalize_lifts_small_singular_values_without_reaching_one():
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(200, 64, generator=torch.Generator().manual_seed(2)))
    values = torch.logspace(0, -3, 64)
    out = torch.linalg.svdvals(optim.orthogonalize(u @ torch.diag(values) @ v.T))
    assert out.max() < 1.25 and 10 * values.min() < out.min() < 0.1  # 3 steps stop short of 1


def test_muon_sgd_steps_the_other_weights_as_nesterov_sgd_and_skips_frozen_filters():
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    nets = [tiny_net(), tiny_net()]
    for net in nets:
        net[0].weight.requires_grad_(False)  # as train freezes a whitened first conv
    frozen = nets[0][0].weight.clone()
    muon = optim.build_optimizer("muon", nets[0], 0.1, 5e-4)
    sgd = torch.optim.SGD(nets[1].parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for _ in range(3):
        for net, optimizer in zip(nets, (muon, sgd)):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(nets[0][0].weight, frozen)


def test_muon_sgd_rescales_a_filter_bank_then_takes_an_orthogonal_step_of_a_sixth_of_the_lr():
    net = tiny_net()
    conv = net[0].weight  # (16, 3, 3, 3), followed by BatchNorm
    optimizer = optim.build_optimizer("muon", net, 0.3, 5e-4)
    nn.functional.cross_entropy(net(torch.randn(8, 3, 8, 8)), torch.arange(8)).backward()
    before = conv.detach().clone()
    optimizer.step()
    rescaled = before * (16 ** 0.5 / before.norm())
    step = (rescaled - conv.detach()).flatten(1) / (0.3 / 6)
    values = torch.linalg.svdvals(step)
    assert 0.6 < values.min() and values.max() < 1.25
    # A descent step: what was taken off the weights points along their gradient.
    assert (step * conv.grad.flatten(1)).sum() > 0


def test_muon_sgd_resumes_from_its_state_dict():
    x, y = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(8)

    def train(net, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()

    straight = tiny_net()
    train(straight, optim.build_optimizer("muon", straight, 0.1, 5e-4), 4)
    first = tiny_net()
    optimizer = optim.build_optimizer("muon", first, 0.1, 5e-4)
    train(first, optimizer, 2)
    second = tiny_net()
    second.load_state_dict(first.state_dict())
    resumed = optim.build_optimizer("muon", second, 0.1, 5e-4)
    resumed.load_state_dict(optimizer.state_dict())
    train(second, resumed, 2)
    for a, b in zip(straight.parameters(), second.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# --- batches and augmentation -------------------------------------------------------------------------

def test_batches_cover_the_set_once_stay_uint8_and_replay_from_the_seed():
    x, y, *_ = synthetic(n_train=70, n_test=0)
    batches = list(iterate_batches(x, y, 32, generator=torch.Generator().manual_seed(1)))
    assert [len(b[1]) for b in batches] == [32, 32, 6]
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (32, 3, 32, 32) and labels.dtype == torch.int64
    # Every image exactly once, each still with its own label.
    flat = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).numpy()
    order = [int(np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0]) for img in flat]
    assert sorted(order) == list(range(70))
    assert torch.cat([b[1] for b in batches]).tolist() == y[order].tolist()
    again = list(iterate_batches(x, y, 32, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # The set may also live on the device as a uint8 tensor; the batches are the same.
    on_device = list(iterate_batches(torch.from_numpy(x), torch.from_numpy(y), 32,
                                            generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, on_device))

    assert [len(b[1]) for b in iterate_batches(x, y, 32, generator=torch.Generator(), drop_last=True)] == [32, 32]
    assert [len(b[1]) for b in iterate_batches(x[:10], y[:10], 32, drop_last=True)] == [10]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_keep_uint8_and_shape(name):
    x, y, *_ = synthetic(n_train=16, n_test=0)
    mean = (0.5, 0.4, 0.3)
    policy = build_policy(name, mean)
    generator = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(x, y, 8, generator=generator, augment=policy))
    for images, _ in batches:
        if policy is not None and policy.on_device:
            images = policy(images, generator)
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    if policy is not None:  # an augmentation changes some images; the same seed replays it
        first = torch.cat([b[0] for b in batches])
        again = list(iterate_batches(x, y, 8, generator=torch.Generator().manual_seed(0), augment=policy))
        assert torch.equal(first, torch.cat([b[0] for b in again]))


@pytest.mark.parametrize("name", ["reference", "separable"])
def test_cpu_policies_give_the_same_batches_in_worker_processes_and_end_their_pool(name):
    """The per-image policies run in a pool of processes when a GPU trains; each batch is
    reseeded on its own, so the images do not depend on how many processes made them or in
    what order they finished."""
    import multiprocessing

    x, y, *_ = synthetic(n_train=200, n_test=0)
    policy = build_policy(name, (0.5, 0.4, 0.3))

    def epoch(workers: int) -> list:
        return list(iterate_batches(x, y, 16, generator=torch.Generator().manual_seed(3), augment=policy,
                                           workers=workers))

    here = epoch(0)
    for workers in (1, 3):
        pooled = epoch(workers)
        assert len(pooled) == len(here) == 13
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(here, pooled))
    # ... and they were augmented: the same order of images, not the same pixels.
    plain = list(iterate_batches(x, y, 16, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(a[1], p[1]) for a, p in zip(here, plain))
    assert not all(torch.equal(a[0], p[0]) for a, p in zip(here, plain))
    assert multiprocessing.active_children() == []


ABANDON_POOLS = """
import multiprocessing, torch
from steps.augment import build_policy
from steps.batches import iterate_batches
from steps.data import synthetic
x, y, *_ = synthetic(n_train=200, n_test=0)
policy = build_policy("reference", (0.5, 0.4, 0.3))
for _ in range(100):
    batches = iterate_batches(x, y, 16, generator=torch.Generator(), augment=policy, workers=2)
    next(batches)
    assert len(multiprocessing.active_children()) == 2
    batches.close()
    assert multiprocessing.active_children() == [], multiprocessing.active_children()
print("ended", flush=True)
"""


KILL_A_WORKER = """
import multiprocessing, os, signal, torch
from steps.augment import build_policy
from steps.batches import iterate_batches
from steps.data import synthetic
from steps.errors import StepError
x, y, *_ = synthetic(n_train=2000, n_test=0)
policy = build_policy("reference", (0.5, 0.4, 0.3))
batches = iterate_batches(x, y, 16, generator=torch.Generator(), augment=policy, workers=2)
next(batches)
os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
try:
    for _ in batches:
        pass
except StepError as exc:
    print(exc)
print("no workers left:", multiprocessing.active_children() == [], flush=True)
"""


# Only the hang is excused, and only that: a worker killed while it writes a result leaves the
# result pipe mid-message and its lock taken, and CPython 3.11's ProcessPoolExecutor then waits
# on that pipe for ever instead of seeing the worker gone (about 1 run in 10 on a 2-core Intel
# host, 2026-12-02; never seen before on the EPYC hosts). A wrong message still fails.
@pytest.mark.xfail(raises=subprocess.TimeoutExpired, strict=False,
                   reason="CPython's ProcessPoolExecutor can hang when a worker dies mid-write of its result")
def test_an_augmentation_worker_killed_mid_epoch_ends_training_with_one_line():
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", KILL_A_WORKER], cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "an augmentation worker process died (killed, or out of memory?); run the same command again to resume",
        "no workers left: True"]


def test_a_loop_that_stops_early_ends_the_augmentation_pool():
    """find_lr's range test, or a crash, leaves an epoch's batches unfinished with batches in
    flight. Killing the workers then can hang for ever on the locks they held (it did, once in
    a few hundred stops), so this runs 100 early stops in a subprocess with a time limit."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", ABANDON_POOLS], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ended", done.stderr[-2000:]


def test_augment_workers_use_the_cores_but_one_when_a_gpu_trains(monkeypatch):
    from steps.training import MAX_AUGMENT_WORKERS, augment_workers

    cuda = hardware.Hardware(torch.device("cuda"), torch.bfloat16, True)
    for cores, expected in ((1, 0), (3, 2), (64, MAX_AUGMENT_WORKERS)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cores=cores: set(range(cores)))
        assert augment_workers(cuda) == expected
        assert augment_workers(hardware.Hardware(torch.device("cpu"), None, True)) == 0


def test_unknown_policy_lists_the_known():
    with pytest.raises(ValueError, match="known: reference, separable, tensor, flip_translate, altflip_translate, none"):
        build_policy("mixup", (0.5, 0.5, 0.5))


def test_tensor_policy_flips_shifts_and_cuts_out_on_cpu():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    # Flip only: every output is its input or its mirror image, and both occur.
    flipped = TensorPolicy((0.5,) * 3, max_shift=0, cutout=0)(images, generator)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    # Shift only: an interior window of the output is a shifted window of the input or its mirror.
    shifted = TensorPolicy((0.5,) * 3, max_shift=2, cutout=0)(images, generator)
    for out, src in zip(shifted, images):
        windows = [s[:, 2 + dy:30 + dy, 2 + dx:30 + dx] for s in (src, src.flip(-1))
                   for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[:, 2:30, 2:30], w) for w in windows)
    # Cutout: on flat images (so a flip changes nothing), the changed pixels are one rectangle
    # of at most 8x8 per image, all of the mean colour.
    mean = (0.2, 0.5, 0.8)
    flat = torch.full((64, 3, 32, 32), 7, dtype=torch.uint8)
    cut = TensorPolicy(mean, max_shift=2, cutout=8)(flat, torch.Generator().manual_seed(3))
    fill = torch.tensor(pixel_mean(mean), dtype=torch.uint8)
    holes = (cut != 7).any(1)
    assert torch.equal(cut.permute(0, 2, 3, 1)[holes], fill.expand(int(holes.sum()), 3))
    sizes = holes.sum((1, 2))
    assert int(sizes.max()) == 64 and bool((sizes <= 64).all())
    for hole in holes:
        rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
        if len(rows):
            assert int(hole.sum()) == len(rows) * len(cols)  # a rectangle, clipped at the border
    # flip_translate is the same policy without the hole: a flat image comes back unchanged.
    light = build_policy("flip_translate", mean)
    assert light.name == "flip_translate" and light.on_device
    assert torch.equal(light(flat, torch.Generator().manual_seed(3)), flat)


# --- one epoch, evaluation, the NaN guard ------------------------------------------------------------------

def run_epochs(model, toy, epochs: int, max_lr: float, batch_size: int = 64, optimizer: str = "sgd"):
    train_x, train_y, test_x, test_y, mean, std = toy
    optimizer = optim.build_optimizer(optimizer, model, 1.0, 5e-4)
    steps = num_batches(len(train_y), batch_size, drop_last=True)
    scheduler = schedules.lambda_scheduler(optimizer, lambda s: schedules.one_cycle_lr(s, epochs * steps, max_lr, 0.25, 10, 100))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        batches = iterate_batches(train_x, train_y, batch_size, generator=generator, drop_last=True)
        losses.append(loop.train_one_epoch(model, optimizer, scheduler, batches, mean=mean, std=std,
                                             loss_fn=nn.CrossEntropyLoss(), hw=CPU, check_every=3))
    return losses, loop.evaluate(model, test_x, test_y, mean, std, batch_size=100)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_loss_falls_on_the_learnable_toy_set(toy, optimizer):
    losses, (test_loss, test_accuracy, logits) = run_epochs(tiny_net(), toy, epochs=4, max_lr=0.2, optimizer=optimizer)
    assert losses[-1][0] < 0.7 * losses[0][0]
    assert losses[-1][1] > losses[0][1]
    assert test_accuracy > 0.4  # chance is 0.1
    assert logits.shape == (256, 10) and logits.dtype == torch.float32
    assert test_loss == pytest.approx(nn.functional.cross_entropy(logits, torch.as_tensor(toy[3])).item())


class NaNAfter(nn.Module):
    """A network whose output turns NaN from its n-th forward pass on."""

    def __init__(self, n: int):
        super().__init__()
        self.net, self.calls, self.n = tiny_net(), 0, n

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.calls >= self.n else out


def test_non_finite_loss_raises_a_clear_error(toy):
    with pytest.raises(loop.NonFiniteLoss, match=r"training loss became nan by batch 3 .*lower max_lr"):
        run_epochs(NaNAfter(2), toy, epochs=1, max_lr=0.1)
    # The check also runs at the end of an epoch, whatever check_every is.
    with pytest.raises(loop.NonFiniteLoss, match="by batch 8"):
        run_epochs(NaNAfter(8), toy, epochs=1, max_lr=0.1)


def test_huge_lr_fails_the_train_run_and_logs_no_weights(synthetic_data_dir, tracking_uri, tmp_path, monkeypatch):
    from steps.recipes import TrainConfig
    from steps.train import train

    monkeypatch.setenv("CIFAR10_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.chdir(tmp_path)  # the SQLite store's artifacts go to ./mlruns
    # 20 steps at batch 10, so the loss overflows within the first epoch: at batch 50 (4 steps)
    # it did on an AVX512-BF16 CPU but stayed finite on an AVX2 one
    cfg = TrainConfig(epochs=1, batch_size=10, max_lr=1e6, aug="none")
    with pytest.raises(loop.NonFiniteLoss):
        with mlflow.start_run() as run:
            train(cfg, str(synthetic_data_dir), device="cpu")
    client = MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.list_artifacts(run.info.run_id, "weights") == []
    assert list((tmp_path / "checkpoints").glob("*/last.pt")) == []


# --- the LR range test ---------------------------------------------------------------------------------------

def test_range_test_finds_a_sensible_lr_and_restores_everything(toy):
    train_x, train_y, _, _, mean, std = toy
    model = tiny_net()
    optimizer = optim.build_optimizer("sgd", model, 0.01, 5e-4)
    run_epochs(model, toy, epochs=1, max_lr=0.05)  # trained BatchNorm statistics to restore
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    groups_before = [dict(g) for g in optimizer.state_dict()["param_groups"]]
    generator = torch.Generator().manual_seed(0)

    result = lr_range.lr_range_test(
        model, optimizer, lambda: iterate_batches(train_x, train_y, 32, generator=generator, drop_last=True),
        mean=mean, std=std, loss_fn=nn.CrossEntropyLoss(), hw=CPU, start_lr=1e-5, end_lr=100, num_iter=60)

    assert 1e-4 <= result.suggestion <= 1
    assert result.lrs[0] == pytest.approx(1e-5) and result.lrs[0] <= result.suggestion <= result.lrs[-1]
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(1e7) / 59)  # exponential steps
    assert result.diverged and len(result.lrs) < 60  # an LR of 100 blows up SGD; the test stops early
    assert len(result.losses) == len(result.lrs) and all(map(math.isfinite, result.losses))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights_before.items())
    assert optimizer.state_dict()["param_groups"] == groups_before


def test_range_test_keeps_the_bn_biases_lr_multiple(toy):
    train_x, train_y, _, _, mean, std = toy
    model = tiny_net()
    optimizer = optim.build_optimizer("sgd", model, 0.01, 5e-4, bn_bias_lr=64.0)
    seen = []
    step = optimizer.step

    def record_lrs(*args, **kwargs):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return step(*args, **kwargs)

    optimizer.step = record_lrs
    lr_range.lr_range_test(model, optimizer, lambda: iterate_batches(train_x, train_y, 32, drop_last=True),
                         mean=mean, std=std, loss_fn=nn.CrossEntropyLoss(), hw=CPU, start_lr=1e-5, end_lr=1e-3,
                         num_iter=5)
    assert len(seen) == 5 and all(biases == pytest.approx(64 * rest) for rest, biases in seen)


def test_range_test_restores_momentum_buffers(toy):
    train_x, train_y, _, _, mean, std = toy
    model = tiny_net()
    optimizer = optim.build_optimizer("sgd", model, 0.01, 0.0)
    x = loop.model_input(next(iterate_batches(train_x, train_y, 16))[0], mean, std, CPU, None, None)
    loop.train_step(model, optimizer, nn.CrossEntropyLoss(), x, torch.as_tensor(train_y[:16]), CPU)
    buffers = {k: v["momentum_buffer"].clone() for k, v in optimizer.state_dict()["state"].items()}
    lr_range.lr_range_test(model, optimizer, lambda: iterate_batches(train_x, train_y, 32),
                         mean=mean, std=std, loss_fn=nn.CrossEntropyLoss(), hw=CPU, num_iter=10)
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["momentum_buffer"], v) for k, v in buffers.items())


def test_steepest_descent_picks_the_fastest_fall():
    lrs = list(np.logspace(-5, 0, 40))
    losses = [2.3 - 2 / (1 + math.exp(-(math.log10(lr) + 2) * 3)) for lr in lrs]  # falls fastest at 1e-2
    assert lr_range.steepest_descent(lrs, losses) == pytest.approx(1e-2, rel=0.35)


# --- checkpoints ---------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_holds_rng_and_plain_values(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = {"epoch": 3, "history": {"lr": [0.1, 0.2]}, "rng": checkpoints.rng_state(generator),
             "model": tiny_net().state_dict(), "note": None}
    checkpoints.save_checkpoint(tmp_path / "ck" / "last.pt", state)
    loaded = checkpoints.load_checkpoint(tmp_path / "ck" / "last.pt")
    assert loaded["epoch"] == 3 and loaded["history"] == {"lr": [0.1, 0.2]} and loaded["note"] is None
    expected = torch.rand(3, generator=generator)
    fresh = torch.Generator()
    checkpoints.set_rng_state(fresh, loaded["rng"])
    assert torch.equal(torch.rand(3, generator=fresh), expected)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint(path, {"epoch": 1, "weights": torch.ones(1000)})
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    loaded = checkpoints.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
