from __future__ import annotations

import pytest
import torch

from bastion.errors import ModelError
from bastion.models import Normalize

# Tiny tensors: extra intra-op threads only wait on each other (see tests/conftest.py).


def test_scalar_mean_std_on_images_and_vectors() -> None:
    layer = Normalize(0.5, 0.25)
    img = torch.rand(3, 2, 4, 4)
    vec = torch.rand(5, 7)
    torch.testing.assert_close(layer(img), (img - 0.5) / 0.25)
    torch.testing.assert_close(layer(vec), (vec - 0.5) / 0.25)


def test_per_channel_images() -> None:
    mean = [0.1, 0.2, 0.3]
    std = [0.5, 0.25, 2.0]
    layer = Normalize(mean, std)
    x = torch.rand(4, 3, 5, 6)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert layer.channels == 3
    assert layer.mean.shape == (3,) and layer.std.shape == (3,)


def test_per_feature_vectors() -> None:
    layer = Normalize([1.0, 2.0], [2.0, 4.0])
    x = torch.tensor([[3.0, 6.0], [1.0, 2.0]])
    torch.testing.assert_close(layer(x), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_gradient_flows_and_is_one_over_std() -> None:
    layer = Normalize([0.0, 0.0], [2.0, 4.0])
    x = torch.rand(1, 2, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad[0, 0], torch.full((3, 3), 0.5))
    torch.testing.assert_close(x.grad[0, 1], torch.full((3, 3), 0.25))


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        (0.0, 0.0),
        (0.0, -1.0),
        (0.0, [1.0, 0.0]),
        (float("nan"), 1.0),
        ([], 1.0),
        ("a", 1.0),
        ([0, 0], [1, 1, 1]),
    ],
)
def test_invalid_parameters(mean: object, std: object) -> None:
    with pytest.raises(ModelError):
        Normalize(mean, std)  # type: ignore[arg-type]


def test_channel_mismatch_at_call_time() -> None:
    layer = Normalize([0.1, 0.2, 0.3], 1.0)
    with pytest.raises(ModelError, match="3 values"):
        layer(torch.rand(2, 1, 4, 4))


def test_buffers_are_in_the_state_dict_and_follow_the_device() -> None:
    layer = Normalize([0.1, 0.2], [1.0, 2.0])
    assert set(layer.state_dict()) == {"mean", "std"}
    assert layer.to(torch.float64).mean.dtype == torch.float64


def test_loading_per_channel_values_into_a_scalar_layer() -> None:
    src = Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    dst = Normalize()
    dst.load_state_dict(src.state_dict())
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(dst(x), src(x))


def test_loading_a_zero_std_is_refused() -> None:
    with pytest.raises(RuntimeError, match="std must be > 0"):
        Normalize().load_state_dict({"mean": torch.zeros(1), "std": torch.zeros(1)})
