import pytest
import torch
from torch import nn

import cifar_models.fast_net  # noqa: F401
import cifar_models.resnet
import cifar_models.separable_net  # noqa: F401  (importing registers the architectures)
from cifar_models.registry import create_model, list_models, register_model
from cifar_models.separable_net import receptive_field
from cifar_models.summary import summary

MODELS = ["custom_resnet", "fast_net", "fast_net_small", "resnet18", "separable_net"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_the_five_architectures_sorted():
    assert list_models() == MODELS


def test_unknown_model_error_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'nope'; known models: " + ", ".join(MODELS)):
        create_model("nope")


def test_duplicate_registration_is_refused():
    def resnet18(num_classes: int = 10) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)
    assert isinstance(create_model("resnet18"), cifar_models.resnet.ResNet18)


@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward_are_finite(name):
    torch.manual_seed(0)
    model = create_model(name)
    assert all(p.device.type == "cpu" for p in model.parameters())
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name)
    # One training-mode pass so the BatchNorm running statistics differ from their defaults.
    model(torch.randn(2, 3, 32, 32))
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    restored = create_model(name)
    restored.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), restored.eval()(x))


@pytest.mark.parametrize("name", list_models())
def test_num_classes(name):
    with torch.no_grad():
        assert create_model(name, num_classes=100).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name, expected", [("resnet18", 11_173_962), ("custom_resnet", 6_573_130),
                                            ("fast_net", 1_972_792), ("fast_net_small", 498_104)])
def test_exact_parameter_counts(name, expected):
    assert n_params(create_model(name)) == expected


def test_separable_net_is_small_with_a_wide_receptive_field():
    model = create_model("separable_net")
    assert n_params(model) <= 200_000
    assert receptive_field(model.rf_layers()) >= 44
    # The list the RF is computed from is the one the convs were built from.
    spatial_convs = [
        (m.kernel_size[0], m.stride[0], m.dilation[0])
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
    ]
    assert spatial_convs == model.rf_layers()


@pytest.mark.parametrize("layers, expected", [
    ([], 1),
    ([(3, 1, 1), (3, 1, 1)], 5),
    ([(3, 2, 1), (3, 1, 1)], 7),
    ([(3, 1, 2)], 5),
    ([(3, 2, 1), (1, 1, 1), (3, 2, 1), (3, 1, 1)], 15),
])
def test_receptive_field(layers, expected):
    assert receptive_field(layers) == expected


def test_summary_reports_shapes_and_total_params():
    text = summary(create_model("custom_resnet"))
    assert "Total params: 6,573,130" in text
    assert "[1, 10]" in text


def test_preprocessed_batches_reach_the_model_in_channels_last():
    # The served and evaluated forward runs oneDNN's faster NHWC convolutions because to_nchw
    # is a view of NHWC images and normalize keeps its strides; a .contiguous() on the way
    # would silently make inference 1.6x-2x slower on a CPU.
    import numpy as np

    from cifar_models.preprocess import normalize, to_nchw

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = normalize(to_nchw(images), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
