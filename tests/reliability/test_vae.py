"""Tests of the VAE encoder: training lowers the negative ELBO, encoding is deterministic and batched, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bastion.data import load_digits
from bastion.errors import InputError, ModelError
from bastion.reliability.vae import VAE, train_vae

HIDDEN = (128,)


@pytest.fixture(scope="module")
def digits_x() -> tuple[torch.Tensor, torch.Tensor]:
    """600 training and 200 held-out digits images, (N, 1, 8, 8) in [0, 1]."""
    x = load_digits().x
    return x[:600], x[600:800]


@pytest.fixture(scope="module")
def vae(digits_x: tuple[torch.Tensor, torch.Tensor]) -> VAE:
    return train_vae(
        digits_x[0], latent_dim=4, hidden=HIDDEN, epochs=30, batch_size=64, lr=3e-3, seed=0, progress=False
    )


def held_out_loss(model: VAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model.negative_elbo(x, generator=torch.Generator().manual_seed(5)))


def test_training_lowers_the_negative_elbo(vae: VAE, digits_x: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, held_out = digits_x
    assert len(vae.history) == 30
    assert vae.history[-1] < 0.8 * vae.history[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = VAE((1, 8, 8), latent_dim=4, hidden=HIDDEN)  # train_vae's initial weights (same seed)
    before, after = held_out_loss(untrained, held_out), held_out_loss(vae, held_out)
    assert after < 0.8 * before, (before, after)  # generalises to unseen digits, not only the training set
    # the reconstruction through the posterior mean is closer to the input than a constant mean image
    recon = vae.reconstruct(held_out)
    assert recon.shape == held_out.shape and 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    baseline = (held_out - digits_x[0].mean(0)).pow(2).mean()
    assert float((recon - held_out).pow(2).mean()) < 0.8 * float(baseline)


def test_encode_is_deterministic_and_independent_of_batching(
    vae: VAE, digits_x: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x = digits_x[1]
    z = vae.encode(x)
    assert z.shape == (x.shape[0], 4) and z.dtype == torch.float32
    assert torch.equal(z, vae.encode(x))
    assert torch.allclose(vae.encode(x, batch_size=7), z, atol=1e-6)
    assert torch.allclose(torch.cat([vae.encode(x[i : i + 1]) for i in range(5)]), z[:5], atol=1e-6)
    assert torch.equal(vae(x), z)  # the instance is an encoder callable
    assert torch.allclose(vae.encode(x.reshape(x.shape[0], -1)), z)  # flattened inputs are accepted
    vae.train()
    assert torch.equal(vae.encode(x), z)  # the posterior mean, whatever the mode; the mode is restored
    assert vae.training
    vae.eval()
    assert vae.decode(z).shape == x.shape


def test_training_is_reproducible_with_a_seed(digits_x: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits_x[0][:128]
    a = train_vae(x, latent_dim=2, hidden=(16,), epochs=2, seed=3, progress=False)
    b = train_vae(x, latent_dim=2, hidden=(16,), epochs=2, seed=3, progress=False)
    c = train_vae(x, latent_dim=2, hidden=(16,), epochs=2, seed=4, progress=False)
    assert a.history == b.history and torch.equal(a.encode(x), b.encode(x))
    assert not torch.equal(a.encode(x), c.encode(x))


def test_save_and_load_round_trip(vae: VAE, digits_x: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "sub" / "vae.pt"
    vae.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "bastion-vae" and payload["config"] == vae.config
    loaded = VAE.load(path)
    assert loaded.config == vae.config and loaded.history == vae.history and not loaded.training
    x = digits_x[1]
    assert torch.equal(loaded.encode(x), vae.encode(x))
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(z), vae.decode(z))


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        VAE.load(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "bastion-model", "state_dict": {}}, other)
    with pytest.raises(ModelError, match="not a bastion VAE"):
        VAE.load(other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="readable"):
        VAE.load(junk)
    bad = tmp_path / "bad.pt"
    model = VAE((4,), latent_dim=2, hidden=(3,))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("dec")}
    torch.save({"format": "bastion-vae", "version": 1, "config": model.config, "state_dict": state}, bad)
    with pytest.raises(ModelError, match="do not fit"):
        VAE.load(bad)


def test_bad_inputs_raise_input_error(vae: VAE, digits_x: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits_x[0][:32]
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        train_vae(x * 255, epochs=1, progress=False)
    with pytest.raises(InputError, match="NaN"):
        train_vae(torch.full((4, 3), float("nan")), epochs=1, progress=False)
    with pytest.raises(InputError, match="at least 2"):
        train_vae(x[:1], epochs=1, progress=False)
    with pytest.raises(InputError, match="tensor"):
        train_vae([[0.0, 1.0]], epochs=1, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="latent_dim"):
        train_vae(x, latent_dim=0, epochs=1, progress=False)
    with pytest.raises(InputError, match="hidden"):
        train_vae(x, hidden="wide", epochs=1, progress=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="epochs"):
        train_vae(x, epochs=0, progress=False)
    with pytest.raises(InputError, match="lr"):
        train_vae(x, lr=-1.0, epochs=1, progress=False)
    with pytest.raises(InputError, match="device"):
        train_vae(x, device="gpu7", epochs=1, progress=False)
    with pytest.raises(InputError, match="shape"):
        vae.encode(torch.rand(3, 1, 7, 7))
    with pytest.raises(InputError, match="floating"):
        vae.encode(torch.ones(3, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(InputError, match="Tensor"):
        vae.encode([0.5] * 64)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch_size"):
        vae.encode(x, batch_size=0)
    with pytest.raises(InputError, match=r"\(N, 4\)"):
        vae.decode(torch.zeros(2, 3))
