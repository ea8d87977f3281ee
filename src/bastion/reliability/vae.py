"""A small variational auto-encoder, the encoder of an operational profile in a latent space.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014: a Gaussian encoder ``q(z | x) = N(mu(x),
diag(exp(logvar(x))))``, a standard normal prior ``p(z) = N(0, I)`` and a Bernoulli decoder ``p(x | z)`` over the
flattened input in [0, 1], trained by maximising the evidence lower bound (ELBO) with the reparametrisation
``z = mu + exp(logvar / 2) · eps``, one sample of ``eps ~ N(0, I)`` per input (the paper's ``L = 1``). The loss
minimised is the negative ELBO per sample, ``BCE(x, decoder(z))`` summed over the pixels plus the closed-form
``KL(q(z | x) || p(z)) = -1/2 sum_j (1 + logvar_j - mu_j² - exp(logvar_j))`` (the paper's Appendix B).

Encoder and decoder are fully connected ReLU networks (``hidden`` widths, mirrored in the decoder), trained with
Adam (the paper used Adagrad and one hidden layer of 500 units on MNIST; the widely used PyTorch example's 400
units and Adam at 1e-3 are the defaults here). The reliability code only needs :meth:`VAE.encode`, the posterior
mean ``mu(x)``: deterministic, so the profile of a data set is reproducible. A VAE instance is itself an encoder:
``vae(x)`` is ``vae.encode(x)``, so it can be passed wherever a ``Callable[[Tensor], Tensor]`` is expected.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bastion.attacks.base import positive_float, positive_int
from bastion.data import Dataset
from bastion.errors import InputError, ModelError
from bastion.models.checks import eval_mode, model_device

__all__ = ["VAE", "train_vae"]

FORMAT = "bastion-vae"
VERSION = 1


def _widths(hidden: object) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise InputError(f"hidden must be a sequence of positive layer widths, e.g. (400,), got {hidden!r}")
    return tuple(positive_int("hidden width", h) for h in hidden)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A fully connected VAE over inputs of shape ``input_shape`` with values in [0, 1].

    Calling the instance encodes: ``vae(x) == vae.encode(x)``.

    Args:
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 8, 8)``.
        latent_dim: dimension of the latent space.
        hidden: widths of the encoder's hidden layers (the decoder mirrors them).
    """

    def __init__(self, input_shape: Sequence[int], *, latent_dim: int = 8, hidden: Sequence[int] = (400,)) -> None:
        super().__init__()
        if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape:
            raise InputError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
        self.input_shape = tuple(positive_int("input_shape entry", d) for d in input_shape)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        self.hidden = _widths(hidden)
        self.input_dim = math.prod(self.input_shape)
        # the encoder's last layer gives mu and logvar side by side
        self.enc = _mlp((self.input_dim, *self.hidden, 2 * self.latent_dim))
        self.dec = _mlp((self.latent_dim, *reversed(self.hidden), self.input_dim))
        #: mean negative ELBO of each training epoch (filled by :func:`train_vae`)
        self.history: list[float] = []

    # ------------------------------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """What rebuilds the architecture: ``input_shape``, ``latent_dim`` and ``hidden``."""
        return {"input_shape": list(self.input_shape), "latent_dim": self.latent_dim, "hidden": list(self.hidden)}

    def __repr__(self) -> str:
        return f"VAE(input_shape={self.input_shape}, latent_dim={self.latent_dim}, hidden={self.hidden})"

    # ------------------------------------------------------------------------------------------ parts
    def _flat(self, x: object, what: str = "x") -> Tensor:
        """``x`` as (N, input_dim) on this model's device, after checking dtype, shape, finiteness and range."""
        if not isinstance(x, Tensor):
            raise InputError(f"{what} must be a torch.Tensor of shape (N, *{self.input_shape}), got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"{what} must be a floating tensor with values in [0, 1], got dtype {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape and not (x.dim() == 2 and x.shape[1] == self.input_dim):
            raise InputError(
                f"{what} has shape {tuple(x.shape)}; this VAE takes (N, *{self.input_shape}) or (N, {self.input_dim})"
            )
        flat = x.reshape(x.shape[0], self.input_dim)
        if flat.numel() and not bool(torch.isfinite(flat).all()):
            raise InputError(f"{what} holds NaN or infinite values")
        if flat.numel() and (float(flat.min()) < 0.0 or float(flat.max()) > 1.0):
            raise InputError(
                f"{what} has values in [{float(flat.min()):g}, {float(flat.max()):g}]; the Bernoulli decoder needs "
                "inputs in [0, 1] (rescale them first)"
            )
        p = next(self.parameters())
        return flat.to(device=p.device, dtype=p.dtype)

    def _posterior(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(flat).chunk(2, dim=1)
        return mu, logvar

    def negative_elbo(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Mean negative ELBO of the batch ``x`` (reconstruction BCE summed over pixels + KL), differentiable.

        Args:
            x: inputs (N, *input_shape) in [0, 1].
            generator: seeds the reparametrisation noise (a generator on this model's device).
        """
        return self._loss(self._flat(x), generator)

    def _loss(self, flat: Tensor, generator: torch.Generator | None) -> Tensor:
        mu, logvar = self._posterior(flat)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        recon = F.binary_cross_entropy_with_logits(self.dec(z), flat, reduction="sum")
        kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp())
        return (recon + kl) / flat.shape[0]

    # ------------------------------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, x: Tensor, *, batch_size: int = 4096) -> Tensor:
        """The posterior mean ``mu(x)`` of each input: deterministic, (N, latent_dim), on the device of ``x``.

        Args:
            x: inputs (N, *input_shape) or (N, input_dim), values in [0, 1].
            batch_size: inputs per forward pass (the result does not depend on it).
        """
        batch_size = positive_int("batch_size", batch_size)
        flat = self._flat(x)
        with eval_mode(self):
            parts = [self._posterior(flat[i : i + batch_size])[0] for i in range(0, flat.shape[0], batch_size)]
        out = torch.cat(parts) if parts else flat.new_zeros((0, self.latent_dim))
        return out.to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        """``encode(x)``: the VAE is an encoder ``Callable[[Tensor], Tensor]``."""
        return self.encode(x)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli means ``p(x | z)`` in [0, 1], shaped (N, *input_shape), on the device of ``z``.

        Args:
            z: latent codes (N, latent_dim).
        """
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise InputError(f"z must be a floating tensor of shape (N, {self.latent_dim}), got {got}")
        if not bool(torch.isfinite(z).all()):
            raise InputError("z holds NaN or infinite values")
        p = next(self.parameters())
        with eval_mode(self):
            out = torch.sigmoid(self.dec(z.to(device=p.device, dtype=p.dtype)))
        return out.reshape(z.shape[0], *self.input_shape).to(z.device)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: the reconstruction through the posterior mean."""
        return self.decode(self.encode(x))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the configuration, weights and training history (readable with ``torch.load(weights_only=True)``).

        Args:
            path: destination file; parent folders are created.
        """
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        payload = {"format": FORMAT, "version": VERSION, "config": self.config, "history": list(self.history),
                   "state_dict": state}  # fmt: skip
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> VAE:
        """Read a VAE written by :meth:`save` (safely: ``weights_only=True``), in eval mode.

        Args:
            path: the file.
            map_location: device to put the weights on.

        Raises:
            ModelError: missing, unreadable or malformed file.
        """
        where = f"VAE.load({os.fspath(path)!r})"
        if not Path(path).is_file():
            raise ModelError(f"{where}: no such file")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise ModelError(f"{where}: not a readable torch file ({type(exc).__name__}: {exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ModelError(f"{where}: not a bastion VAE file (write one with VAE.save)")
        if payload.get("version") != VERSION:
            raise ModelError(f"{where}: VAE file version {payload.get('version')!r}; this bastion reads {VERSION}")
        config = payload.get("config")
        if not isinstance(config, dict) or set(config) != {"input_shape", "latent_dim", "hidden"}:
            raise ModelError(f"{where}: the file's config is malformed")
        vae = cls(config["input_shape"], latent_dim=config["latent_dim"], hidden=config["hidden"])
        try:
            vae.load_state_dict(payload["state_dict"])
        except (KeyError, RuntimeError) as exc:
            raise ModelError(f"{where}: the weights do not fit the stored configuration ({exc})") from None
        vae.history = [float(v) for v in payload.get("history", [])]
        return vae.to(map_location).eval()


def train_vae(
    x: Tensor | Dataset,
    *,
    latent_dim: int = 8,
    hidden: Sequence[int] = (400,),
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> VAE:
    """Train a :class:`VAE` on ``x`` (Kingma & Welling, ICLR 2014) with Adam, and return it in eval mode.

    Args:
        x: the inputs (N, *feature_shape) with values in [0, 1], or a :class:`~bastion.data.Dataset` (its ``x``).
        latent_dim: dimension of the latent space.
        hidden: encoder hidden widths (decoder mirrored).
        epochs: passes over the data.
        batch_size: samples per step.
        lr: Adam learning rate.
        seed: seeds the initial weights, the shuffling and the reparametrisation noise (nothing global).
        device: where to train (default: the device of ``x``).
        progress: show a tqdm bar over the epochs.

    Returns:
        The trained VAE; ``vae.history`` holds the mean negative ELBO of each epoch.
    """
    if isinstance(x, Dataset):
        x = x.x
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"x must be a tensor of inputs (N, *feature_shape) or a Dataset, got {got}")
    if x.shape[0] < 2:
        raise InputError(f"x holds {x.shape[0]} input(s); training a VAE needs at least 2")
    epochs = positive_int("epochs", epochs)
    batch_size = positive_int("batch_size", batch_size)
    lr = positive_float("lr", lr)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    try:
        dev = torch.device(device) if device is not None else x.device
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = VAE(tuple(x.shape[1:]), latent_dim=latent_dim, hidden=hidden)
    vae = vae.to(dev)
    flat = vae._flat(x)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=model_device(vae)).manual_seed(seed + 1)
    n = flat.shape[0]
    vae.train()
    for _ in tqdm(range(epochs), desc="train VAE", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(n, generator=order_gen).to(flat.device)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for start in range(0, n, batch_size):
            batch = flat[order[start : start + batch_size]]
            loss = vae._loss(batch, noise_gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * batch.shape[0]
        vae.history.append(float(total) / n)
    return vae.eval()
