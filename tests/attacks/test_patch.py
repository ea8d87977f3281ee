"""Adversarial patch: placement is correct and the trained patch beats a random one on held-out images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks.patch import AdversarialPatch
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.models import build_model


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Dataset, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", train_set.feature_shape, 10, hidden=(64,))
    train(model, train_set, epochs=12, lr=3e-3, seed=0, progress=False)
    return model, train_set, test_set


def test_apply_pastes_only_inside_the_patch_region() -> None:
    attack = AdversarialPatch(size=3, scale=(1.0, 1.0), max_rotation=0.0)
    x = torch.zeros(16, 1, 8, 8)
    out = attack.apply(x, torch.ones(1, 3, 3), torch.Generator().manual_seed(0))
    area = out.flatten(1).sum(1)
    assert bool((area > 4).all()) and bool((area <= 9 + 1e-4).all())  # about the 9 patch pixels, nothing more
    assert bool((out >= 0).all()) and bool((out <= 1).all())
    spread = {tuple(o[0].nonzero()[0].tolist()) for o in out}
    assert len(spread) > 3  # random locations


def test_trained_patch_beats_a_random_patch_on_held_out_images(setup) -> None:
    model, train_set, test_set = setup
    # on 8x8 digits a patch needs a sizeable share of the image to work under random placement and rotation
    attack = AdversarialPatch(size=6, epochs=4, batch_size=64, lr=0.1)
    res = attack.fit(model, train_set, target=8, progress=False)
    assert res.losses[-1] <= res.losses[0]
    held_out = attack.success_rate(model, test_set, res.patch, 8)
    random_patch = torch.rand(res.patch.shape, generator=torch.Generator().manual_seed(1))
    baseline = attack.success_rate(model, test_set, random_patch, 8)
    assert held_out > baseline + 0.25
    assert res.patch.min() >= 0 and res.patch.max() <= 1


def test_bad_arguments(setup) -> None:
    model, train_set, _ = setup
    with pytest.raises(InputError, match="scale"):
        AdversarialPatch(scale=(2.0, 1.0))
    with pytest.raises(InputError, match="larger than the images"):
        AdversarialPatch(size=9).fit(model, train_set, 0, progress=False)
    with pytest.raises(InputError, match="target"):
        AdversarialPatch(size=3).fit(model, train_set, 12, progress=False)
