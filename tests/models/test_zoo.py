from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.errors import ModelError
from bastion.models import ZOO, Normalize, build_model, cnn, mlp, resnet
from bastion.models.zoo import BasicBlock, LastStep, Rows

# Tiny tensors: extra intra-op threads only wait on each other (see tests/conftest.py).

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
#: The image architectures; the point-cloud and waveform ones take other inputs (tested below).
IMAGE_ZOO = sorted(set(ZOO) - {"pointnet", "audiocnn"})
#: One input shape per non-image architecture: a 64-point cloud, a 0.1 s clip at 8 kHz.
OTHER_SHAPES = {"pointnet": (64, 3), "audiocnn": (1, 800)}
ALLOWED = (
    Normalize,
    nn.Sequential,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.Flatten,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    BasicBlock,
)


@pytest.mark.parametrize("name", IMAGE_ZOO)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_model_returns_logits(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert isinstance(model[0], Normalize)  # type: ignore[index]
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    # Only operators the verifiers will support (the recurrent model is for testing, not verification).
    allowed = (*ALLOWED, nn.LSTM, nn.GRU, Rows, LastStep) if name == "lstm" else ALLOWED
    assert all(isinstance(m, allowed) for m in model.modules()), [type(m) for m in model.modules()]


def test_mlp_on_flat_inputs_and_hidden_widths() -> None:
    model = mlp((20,), 3, hidden=(8,))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 8), (8, 3)]
    assert model(torch.rand(4, 20)).shape == (4, 3)
    assert mlp((20,), 3, hidden=()).__len__() == 3  # Normalize, Flatten, Linear


def test_per_channel_normalisation_is_the_first_layer() -> None:
    model = cnn((3, 32, 32), 10, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    norm = model[0]
    assert isinstance(norm, Normalize)
    torch.testing.assert_close(norm.mean, torch.tensor([0.49, 0.48, 0.45]))


def test_cnn_architecture_and_options() -> None:
    model = cnn((1, 8, 8), 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)),
        (32, 64, (3, 3)),
    ]
    assert model[8].in_features == 64 * 2 * 2  # type: ignore[union-attr]
    wide = cnn((1, 28, 28), 10, channels=(8, 16), hidden=32, kernel_size=5)
    assert wide(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_has_residual_blocks_and_width() -> None:
    model = resnet((3, 32, 32), 10, width=8, blocks=(2, 1, 1))
    blocks = [m for m in model if isinstance(m, BasicBlock)]
    assert len(blocks) == 4
    assert blocks[-1].conv2.out_channels == 32
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_factories_record_their_config() -> None:
    model = resnet((3, 32, 32), 10, width=8)
    spec = model.bastion_spec  # type: ignore[attr-defined]
    assert spec["arch"] == "resnet"
    assert spec["config"] == {
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "mean": 0.0,
        "std": 1.0,
        "width": 8,
        "blocks": [1, 1, 1],
    }


def test_unknown_name_lists_the_zoo() -> None:
    with pytest.raises(ModelError, match="available: audiocnn, cnn, lstm, mlp, pointnet, resnet"):
        build_model("vgg", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn", (8, 8)),
        ("cnn", (1, 2, 2)),
        ("cnn", (1, 0, 8)),
        ("resnet", (64,)),
        ("mlp", ()),
        ("mlp", "1x8x8"),
        ("mlp", (1.5, 8)),
        ("cnn", None),
    ],
)
def test_bad_input_shapes(name: str, shape: object) -> None:
    with pytest.raises(ModelError, match="input_shape"):
        build_model(name, shape, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 3},
        {"channels": (8,)},
        {"kernel_size": 4},
        {"hidden": 0},
        {"mean": [0.1, 0.2]},
    ],
)
def test_bad_architecture_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ModelError):
        build_model("cnn", (1, 8, 8), 10, **kwargs)


@pytest.mark.parametrize("k", [1, 0, True, 2.0])
def test_bad_num_classes(k: object) -> None:
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", (4,), k)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(OTHER_SHAPES))
def test_point_cloud_and_waveform_models_return_logits_and_refuse_images(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, OTHER_SHAPES[name], 10)
    out = model(torch.rand(3, *OTHER_SHAPES[name]))
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    with pytest.raises(ModelError):
        build_model(name, (1, 8, 8), 10)


@pytest.mark.parametrize("name", IMAGE_ZOO)
def test_models_are_fx_traceable(name: str) -> None:
    # Verifiers may read the network through torch.fx; Normalize must not break symbolic tracing.
    model = build_model(name, (3, 8, 8), 4, mean=[0.1, 0.2, 0.3], std=0.5).eval()
    graph = torch.fx.symbolic_trace(model)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(graph(x), model(x))
