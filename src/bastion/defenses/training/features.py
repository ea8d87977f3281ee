"""Latent features of a classifier: split a model into a feature extractor (body) and a linear head.

Several training objectives work on a model's latent representation rather than on its logits: shift-consistency
regularisation (:mod:`~bastion.defenses.training.at_scr`) penalises how adversarial perturbations move the
penultimate features, and the latent-manifold objective (:mod:`~bastion.defenses.training.latent_manifold`) and
feature scattering (:mod:`~bastion.defenses.training.feature_scattering`) compare feature distributions. They get
the features through :func:`split_model`, which returns ``(body, head)`` with ``model(x) == head(body(x))``.

How a model is split, in order of precedence:

1. ``head=`` given explicitly: the given ``nn.Linear`` must be a submodule of the model whose output is the model's
   output (the last operation of ``forward``). The body runs the whole model and captures the input of that layer
   with a forward hook, so any architecture works (residual networks, custom ``forward`` methods).
2. A model that defines ``features`` (an ``nn.Module``) and one of ``head``, ``classifier`` or ``fc`` (an
   ``nn.Linear``), with ``forward(x) == head(features(x))``: the documented contract for custom architectures.
3. An ``nn.Sequential`` whose last module is an ``nn.Linear`` (every zoo model: ``Normalize``, ..., ``Linear``): the
   body is the sequence without its last module. The body shares its modules with the model, so training through
   the body trains the model.

The module also holds the small random-state helper shared by the objectives of this family: each keeps its own
seeded generator (random starts, random directions) whose state is checkpointed with the objective, so that a
resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bastion.errors import InputError, ModelError

__all__ = ["ObjectiveRandomness", "features_and_logits", "split_model"]

_HEAD_NAMES = ("head", "classifier", "fc")


class _HookedBody(nn.Module):
    """Runs the whole model and returns the input of its final linear layer, captured by a temporary hook.

    The hook lives only for the duration of one forward pass, so splitting a model never leaves hooks behind.
    """

    def __init__(self, model: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self._head = [head]  # a list: not registered a second time as a submodule

    def forward(self, x: Tensor) -> Tensor:
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])

        handle = self._head[0].register_forward_pre_hook(capture)
        try:
            self.model(x)
        finally:
            handle.remove()
        if not captured:
            raise ModelError("the head layer given to split_model was not called during the model's forward pass")
        return captured[-1]


def split_model(model: nn.Module, *, head: nn.Linear | None = None) -> tuple[nn.Module, nn.Linear]:
    """Split a classifier into a feature extractor and its final linear layer.

    Args:
        model: the classifier.
        head: the model's final ``nn.Linear`` (its output must be the model's output), for architectures that are
            neither an ``nn.Sequential`` ending in a Linear nor a model with ``features`` and ``head`` attributes.

    Returns:
        ``(body, head)`` with ``model(x) == head(body(x))``; ``body(x)`` is (N, D), the penultimate features.

    Raises:
        InputError: ``model`` is not an ``nn.Module``, or ``head`` is not an ``nn.Linear`` inside it.
        ModelError: the model cannot be split (see the module docstring for the three supported ways).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if head is not None:
        if not isinstance(head, nn.Linear):
            raise InputError(f"head must be the model's final nn.Linear, got {type(head).__name__}")
        if not any(m is head for m in model.modules()):
            raise InputError("head must be a submodule of the model (its final nn.Linear)")
        return _HookedBody(model, head), head
    features = getattr(model, "features", None)
    if isinstance(features, nn.Module) and not isinstance(model, nn.Sequential):
        for name in _HEAD_NAMES:
            candidate = getattr(model, name, None)
            if isinstance(candidate, nn.Linear):
                return features, candidate
    if isinstance(model, nn.Sequential) and len(model) >= 2 and isinstance(model[-1], nn.Linear):
        body = model[:-1]
        last = model[-1]
        assert isinstance(last, nn.Linear)
        return body, last
    raise ModelError(
        f"cannot find the latent features of {type(model).__name__}: use an nn.Sequential ending in an nn.Linear, "
        "give the model a 'features' module and a 'head' (or 'classifier'/'fc') nn.Linear with "
        "forward(x) == head(features(x)), or pass split_model(model, head=<the final nn.Linear>)"
    )


def features_and_logits(body: nn.Module, head: nn.Linear, x: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, D) and logits (N, K) of ``x`` in one forward pass."""
    feats = body(x)
    if feats.dim() != 2:
        feats = feats.flatten(1)
    return feats, head(feats)


class ObjectiveRandomness:
    """A seeded random generator owned by a training objective, created on the device of the first batch.

    ``seed=None`` uses PyTorch's global generator (then reproducibility is the caller's business, e.g.
    ``torch.manual_seed``). With a seed, :meth:`state_dict` / :meth:`load_state_dict` checkpoint the generator so a
    resumed run continues the same random stream.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for tensors on ``device`` (``None`` when unseeded: the global generator)."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        if self._generator is not None:
            return {"rng": self._generator.get_state()}
        if self._pending_state is not None:
            return {"rng": self._pending_state}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rng = state.get("rng")
        if rng is None:
            return
        if self._generator is not None:
            self._generator.set_state(rng)
        else:
            self._pending_state = rng
