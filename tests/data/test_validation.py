"""validate_arrays: the one routine every loader and Dataset relies on."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bastion.data import validate_arrays
from bastion.errors import DataError, InputError


def test_uint8_is_scaled_and_float64_converted() -> None:
    x8 = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    x, y, k = validate_arrays(x8, np.array([0, 2]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and k == 3
    assert torch.allclose(x, torch.tensor([[0.0, 1.0], [0.2, 0.4]]))

    x64, _, _ = validate_arrays(np.full((3, 2), 0.5), [0, 1, 1])
    assert x64.dtype == torch.float32


def test_torch_input_and_integer_features() -> None:
    x, y, k = validate_arrays(torch.ones(4, 3, dtype=torch.int32), torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and k == 2


def test_read_only_buffer_does_not_warn() -> None:
    x = np.frombuffer(bytes(range(12)), dtype=np.uint8).reshape(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_arrays(x, np.zeros(3, dtype=np.int64))


def test_nan_and_inf_are_reported_with_source_and_sample() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[2, 1] = np.nan
    x[3, 0] = np.inf
    with pytest.raises(DataError, match=r"^my\.npz: x contains 1 NaN and 1 infinite .*sample 2.*remove"):
        validate_arrays(x, np.zeros(4, dtype=int), source="my.npz")


def test_out_of_domain_values_name_range_and_fix() -> None:
    x = np.zeros((3, 2))
    x[1, 1] = 255.0
    with pytest.raises(DataError, match=r"range over \[0, 255\].*value 255 in sample 1.*divide by 255") as info:
        validate_arrays(x, [0, 0, 0], source="f.csv")
    assert str(info.value).startswith("f.csv:")


def test_custom_domain() -> None:
    x, _, _ = validate_arrays(np.full((2, 2), -0.5), [0, 1], domain=(-1.0, 1.0))
    assert float(x.min()) == -0.5
    with pytest.raises(DataError, match=r"input domain \[-1, 1\]"):
        validate_arrays(np.full((2, 2), -2.0), [0, 1], domain=(-1.0, 1.0))


@pytest.mark.parametrize("domain", [(1.0, 0.0), (0.0, float("inf")), ("a", "b"), (0.0,)])
def test_bad_domain(domain: object) -> None:
    with pytest.raises(DataError, match="domain"):
        validate_arrays(np.zeros((2, 2)), [0, 1], domain=domain)  # type: ignore[arg-type]


def test_label_problems() -> None:
    x = np.zeros((3, 2))
    with pytest.raises(DataError, match=r"y\[1\] = -1"):
        validate_arrays(x, [0, -1, 1])
    with pytest.raises(DataError, match=r"label y\[2\] = 5 is outside the 3 classes \[0, 3\)"):
        validate_arrays(x, [0, 1, 5], num_classes=3)
    with pytest.raises(DataError, match=r"whole class numbers, but y\[0\] = 0.5"):
        validate_arrays(x, [0.5, 1.0, 1.0])
    with pytest.raises(DataError, match="whole class numbers"):
        validate_arrays(x, [np.nan, 1.0, 1.0])
    with pytest.raises(DataError, match="x holds 3 samples but y holds 2 labels"):
        validate_arrays(x, [0, 1])
    with pytest.raises(DataError, match="one-hot"):
        validate_arrays(x, np.eye(3))
    with pytest.raises(DataError, match="num_classes must be a positive integer"):
        validate_arrays(x, [0, 1, 1], num_classes=0)


def test_label_forms_accepted() -> None:
    x = np.zeros((3, 2))
    _, y, k = validate_arrays(x, np.array([[0.0], [2.0], [1.0]]))
    assert y.tolist() == [0, 2, 1] and k == 3
    _, _, k = validate_arrays(x, np.array([0, 1, 1], dtype=np.uint16), num_classes=10)
    assert k == 10


def test_shape_and_dtype_problems() -> None:
    with pytest.raises(DataError, match="at least 2 axes"):
        validate_arrays(np.zeros(3), [0, 1, 2])
    with pytest.raises(DataError, match="expected real numbers"):
        validate_arrays(np.array([["a", "b"]]), [0])
    with pytest.raises(DataError, match=r"dtype torch\.bool"):
        validate_arrays(torch.zeros(2, 2, dtype=torch.bool), [0, 1])
    with pytest.raises(DataError, match="no samples"):
        validate_arrays(np.zeros((0, 2)), np.zeros(0, dtype=int))
    x, y, k = validate_arrays(np.zeros((0, 2)), np.zeros(0, dtype=int), num_classes=4)
    assert x.shape == (0, 2) and y.shape == (0,) and k == 4


def test_data_error_is_an_input_error() -> None:
    with pytest.raises(InputError):
        validate_arrays(np.zeros(3), [0, 1, 2])
    with pytest.raises(ValueError):
        validate_arrays(np.zeros(3), [0, 1, 2])
