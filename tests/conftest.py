"""Shared fixtures: a tiny trained digits model saved once per session, an isolated bastion cache, one torch thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

#: Architecture and configuration of the session model (tiny, so that attacks on it are fast).
DIGITS_MLP_CONFIG = {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [32]}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for every test.

    The tensors of the tiny test models are so small that several threads only wait on each other: on two busy
    cores a training step of the digits MLP takes about 20 ms with two threads and under 1 ms with one.
    """
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits_mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo ``mlp`` (one hidden layer of 32) trained on the digits data, saved with ``save_model``.

    Trained on the whole data set for a few epochs (about 97 % accuracy): enough for attacks to have something to
    break. The global RNG state is restored afterwards so other tests see no difference.
    """
    from bastion.data import load_digits
    from bastion.defenses.training import accuracy, train
    from bastion.models import build_model, save_model

    data = load_digits()
    with torch.random.fork_rng(), torch_threads(1):
        torch.manual_seed(0)
        model = build_model("mlp", data.feature_shape, data.num_classes, hidden=(32,))
        train(model, data, epochs=8, batch_size=64, lr=3e-3, seed=0, progress=False)
    acc = accuracy(model, data)
    assert acc >= 0.9, f"the session digits MLP reached only {acc:.3f} accuracy; the CLI tests need >= 0.9"
    path = tmp_path_factory.mktemp("models") / "digits-mlp.pt"
    save_model(model, path, arch="mlp", config=DIGITS_MLP_CONFIG)
    return path


@pytest.fixture
def bastion_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``BASTION_CACHE`` at a fresh temporary folder so the user's cache is never read or written."""
    cache = tmp_path / "bastion-cache"
    monkeypatch.setenv("BASTION_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def digits_mlp64() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A zoo ``mlp`` (one hidden layer of 64) trained on the 80 % digits split, with the 360 held-out images.

    Shared by the attack tests, which only read it (trained once per session; the global RNG is left untouched).
    """
    from bastion.data import load_digits
    from bastion.defenses.training import train
    from bastion.models import build_model

    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    with torch.random.fork_rng(), torch_threads(1):
        torch.manual_seed(0)
        model = build_model("mlp", train_set.feature_shape, 10, hidden=(64,))
        train(model, train_set, epochs=12, lr=3e-3, seed=0, progress=False)
    return model, test_set.x, test_set.y
