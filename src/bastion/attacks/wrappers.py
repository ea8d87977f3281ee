"""Model wrappers for attacking defences honestly: EOT and BPDA.

Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of Security: Circumventing Defenses to
Adversarial Examples", ICML 2018, show that many defences only *look* robust because gradient-based attacks get
useless gradients from them. Two of their fixes are model wrappers here, so that every white-box attack of bastion
can use them unchanged:

* :class:`EOT` (Expectation over Transformation; Athalye, Engstrom, Ilyas & Kwok, "Synthesizing Robust Adversarial
  Examples", ICML 2018) for *randomised* defences: the wrapped model's output is the average of ``samples``
  independent forward passes, so its gradient is the average of the per-draw gradients, an estimate of the gradient
  of the expected output.
* :class:`BPDA` (Backward Pass Differentiable Approximation) for a *non-differentiable* (or gradient-shattering)
  preprocessing ``g``: the forward pass computes ``model(g(x))`` exactly, the backward pass differentiates
  ``model(h(x))`` at the point ``g(x)`` instead, with ``h`` a differentiable approximation of ``g``; the identity
  (straight-through) is the common choice when ``g(x) ≈ x``.

Both wrappers are ``torch.nn.Module`` objects: ``PGD()(EOT(model, samples=10), x, y, threat=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bastion.attacks.base import positive_int
from bastion.errors import InputError


class EOT(nn.Module):
    """Expectation over Transformation: the average output of ``samples`` draws of a randomised model.

    Args:
        model: the randomised model (random transformations, noise, dropout at test time, ...).
        samples: number of independent forward passes averaged per call.
        average: ``"logits"`` averages the raw outputs; ``"probs"`` averages softmax probabilities and returns
            their logarithm (so the output is still a valid logit vector, and the gradient of the cross-entropy
            on it is that of the log of the expected probability, closer to an expectation of the defended
            classifier's decision).

    The randomness stays in effect while attacking: bastion's attacks put the wrapper in eval mode, which sets
    eval mode on ``model`` too; a model whose randomness depends on training mode (e.g. dropout) must switch it on
    itself. The samples are drawn by running the model ``samples`` times on the same batch, so memory grows
    with ``samples`` only through the autograd graph.
    """

    def __init__(self, model: nn.Module, *, samples: int = 10, average: str = "logits") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"EOT wraps a torch.nn.Module, got {type(model).__name__}")
        if average not in ("logits", "probs"):
            raise InputError(f"average must be 'logits' or 'probs', got {average!r}")
        self.model = model
        self.samples = positive_int("samples", samples)
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([self.model(x) for _ in range(self.samples)])
        if self.average == "logits":
            return outputs.mean(dim=0)
        return outputs.log_softmax(dim=-1).logsumexp(dim=0) - torch.log(torch.tensor(float(self.samples)))

    def extra_repr(self) -> str:
        return f"samples={self.samples}, average={self.average!r}"


class BPDA(nn.Module):
    """Backward Pass Differentiable Approximation (Athalye et al., ICML 2018) of a preprocessing step.

    ``BPDA(model, preprocess, approx)(x)`` returns ``model(preprocess(x))`` exactly; gradients with respect to
    ``x`` are those of ``model(z)`` at ``z = preprocess(x)``, pulled back through ``approx`` instead of
    ``preprocess``. With ``approx=None`` the approximation is the identity (straight-through estimator).

    Args:
        model: the classifier that follows the preprocessing.
        preprocess: the (possibly non-differentiable) input transformation of the defence, e.g. JPEG compression,
            bit-depth reduction or a denoiser; it must keep the input shape.
        approx: a differentiable function ``h`` with ``h(x) ≈ preprocess(x)``; ``None`` for the identity.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[torch.Tensor], torch.Tensor],
        approx: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"BPDA wraps a torch.nn.Module, got {type(model).__name__}")
        if not callable(preprocess) or (approx is not None and not callable(approx)):
            raise InputError("preprocess (and approx, when given) must be callables mapping a batch to a batch")
        self.model = model
        self.preprocess = preprocess
        self.approx = approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            exact = self.preprocess(x)
        if exact.shape != x.shape:
            raise InputError(f"BPDA: preprocess changed the input shape {tuple(x.shape)} to {tuple(exact.shape)}")
        approx = x if self.approx is None else self.approx(x)
        # the value is exact; the gradient reaches x through approx (the identity: straight-through)
        return self.model(approx + (exact - approx).detach())
