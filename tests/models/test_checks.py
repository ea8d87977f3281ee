from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bastion.errors import BastionWarning, ModelError
from bastion.models import channels_last, check_logits, cnn, eval_mode, mlp, model_device, model_fingerprint, resnet

# Tiny tensors: extra intra-op threads only wait on each other (see tests/conftest.py).

PINNED = "b46fbfe6238f6affcf3db36c2e9912aab4bf64a220f2e951dc00bcf07252777d"


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_restores_mixed_flags() -> None:
    model = resnet((1, 8, 8), 3, width=4)
    model.train()
    # A frozen batch norm inside a training network: model.train() afterwards would lose this.
    model[2].eval()  # type: ignore[index]
    before = _flags(model)
    with eval_mode(model) as inner:
        assert inner is model
        assert not any(_flags(model))
    assert _flags(model) == before


def test_eval_mode_restores_after_an_exception() -> None:
    model = cnn((1, 8, 8), 10).train()
    model[1].eval()  # type: ignore[index]
    before = _flags(model)
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        raise RuntimeError("inside")
    assert _flags(model) == before


def test_eval_mode_changes_batchnorm_behaviour() -> None:
    model = resnet((1, 8, 8), 3, width=4).train()
    x = torch.rand(4, 1, 8, 8)
    with eval_mode(model), torch.no_grad():
        a = model(x)
        b = model(x[:1])
    # In eval mode a sample's output does not depend on the rest of the batch.
    torch.testing.assert_close(a[:1], b)


def test_model_device() -> None:
    assert model_device(mlp((3,), 2)) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    only_buffers = nn.BatchNorm2d(3, affine=False)
    assert model_device(only_buffers) == torch.device("cpu")


def test_check_logits_accepts_logits() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_logits(torch.randn(5, 10), 5) == 10
        assert check_logits(torch.randn(0, 3), 0) == 3


@pytest.mark.parametrize(
    ("out", "match"),
    [
        (torch.randn(4), r"got shape \(4,\).*\(N, K\) logits"),
        (torch.randn(4, 3, 1), r"got shape \(4, 3, 1\)"),
        (torch.randn(3, 3), r"got shape \(3, 3\)"),
        (torch.randn(4, 1), r"K >= 2"),
        (torch.ones(4, 3, dtype=torch.long), "dtype"),
        ([[0.0, 1.0]] * 4, "list"),
    ],
)
def test_check_logits_errors(out: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        check_logits(out, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_logits_non_finite(bad: float) -> None:
    out = torch.randn(4, 3)
    out[2, 1] = bad
    with pytest.raises(ModelError, match="1 of 4 rows contain NaN or Inf"):
        check_logits(out, 4, where="my model")


def test_check_logits_warns_on_probabilities() -> None:
    probs = torch.softmax(torch.randn(6, 10), dim=1)
    with pytest.warns(BastionWarning, match="softmax"):
        assert check_logits(probs, 6) == 10
    # Non-negative rows that do not sum to one are fine (e.g. ReLU logits).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_logits(torch.rand(6, 10) + 0.5, 6)


def test_fingerprint_is_stable_and_sensitive() -> None:
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 10)
    fp = model_fingerprint(model)
    assert len(fp) == 64 and fp == model_fingerprint(model)
    torch.manual_seed(0)
    assert model_fingerprint(cnn((1, 8, 8), 10)) == fp
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] += 1e-6  # type: ignore[index]
    assert model_fingerprint(model) != fp
    # Buffers count too: batch-norm statistics change the function.
    bn = resnet((1, 8, 8), 3, width=4)
    before = model_fingerprint(bn)
    bn.train()(torch.rand(4, 1, 8, 8))
    assert model_fingerprint(bn) != before


def test_fingerprint_is_pinned() -> None:
    # Fingerprints are stored with results and compared across runs, processes and machines, so the hashing
    # scheme must not drift: weights set to fixed values must always give this digest.
    model = mlp((3,), 2, hidden=(4,))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / (i + 1))
    assert model_fingerprint(model) == PINNED


def test_eval_mode_accepts_raw_exported_modules() -> None:
    # torch.export modules refuse train()/eval(); eval_mode must still work and restore the flags.
    program = torch.export.export(mlp((3,), 2, hidden=(4,)).eval(), (torch.rand(2, 3),)).module()
    before = _flags(program)
    with eval_mode(program):
        assert not any(_flags(program))
        assert program(torch.rand(2, 3)).shape == (2, 2)
    assert _flags(program) == before


def test_channels_last_converts_and_restores_weights_bitwise() -> None:
    model = cnn((1, 12, 12), 10, channels=(4, 6))  # the first conv has one input channel
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [(c.weight, c.weight.data.clone(), c.weight.stride(), c.weight.data_ptr()) for c in convs]
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        reference = model(x)
    with channels_last(model) as inner, torch.no_grad():
        assert inner is model
        for c in convs:
            assert c.weight.is_contiguous(memory_format=torch.channels_last)
            # NHWC strides even for C_in = 1, whose NCHW strides would pass the check above too
            assert c.weight.stride()[1] == 1
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    for c, (param, values, stride, ptr) in zip(convs, before, strict=True):
        assert c.weight is param
        assert c.weight.stride() == stride and c.weight.data_ptr() == ptr
        assert torch.equal(c.weight.data, values)


def test_channels_last_restores_after_an_exception_and_can_be_disabled() -> None:
    model = cnn((3, 8, 8), 4, channels=(4, 4))
    strides = [m.weight.stride() for m in model.modules() if isinstance(m, nn.Conv2d)]
    with pytest.raises(RuntimeError, match="inside"), channels_last(model):
        raise RuntimeError("inside")
    assert [m.weight.stride() for m in model.modules() if isinstance(m, nn.Conv2d)] == strides
    with channels_last(model, False):
        assert [m.weight.stride() for m in model.modules() if isinstance(m, nn.Conv2d)] == strides
