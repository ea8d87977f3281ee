"""The audio threat model: an l∞ budget in decibels relative to the clip (Carlini & Wagner, "Audio Adversarial
Examples: Targeted Attacks on Speech-to-Text", IEEE S&P Workshops (DLS) 2018, Sec. III-B).

Carlini & Wagner measure a perturbation ``δ`` of the waveform ``x`` by its loudness relative to the clip:
``dB(v) = max_i 20·log10(|v_i|)`` and ``dB_x(δ) = dB(δ) - dB(x)``, i.e. ``20·log10(max|δ| / max|x|)``; a budget of
``τ`` dB is therefore an l∞ ball whose radius scales with each clip's peak, ``max|x| · 10^(τ/20)``. Their targeted
examples on DeepSpeech have a mean distortion of -31 dB; the default budget here is -32 dB (the brief's figure),
a radius of 2.5 % of the clip's peak.

:class:`DecibelBall` implements bastion's :class:`~bastion.threat.ThreatModel`. Its ``eps`` is the linear ratio
``10^(db/20)`` and :meth:`DecibelBall.distance` the ratio ``max|δ| / max|x|`` (0 for the clean clip), so that
distances are non-negative and ordered like every other threat's; :func:`to_db` converts them back to decibels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bastion.audio.data import AUDIO_DOMAIN
from bastion.errors import InputError
from bastion.threat import ThreatModel, check_domain

__all__ = ["DecibelBall", "check_waveforms", "to_db"]


def check_waveforms(x: object, what: str = "x") -> torch.Tensor:
    """``x`` if it is a floating-point batch of mono waveforms (N, 1, T) or (N, T), else an InputError."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError(f"{what} must be a floating-point tensor of waveforms (N, 1, T), got {type(x).__name__}")
    if not (x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)):
        hint = "; that looks like an image batch" if x.dim() == 4 else ""
        raise InputError(f"{what} must be mono waveforms of shape (N, 1, T) or (N, T), got {tuple(x.shape)}{hint}")
    return x


def to_db(ratio: torch.Tensor | float) -> torch.Tensor:
    """A distance ratio ``max|δ| / max|x|`` in decibels, ``20·log10(ratio)`` (``-inf`` for 0)."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    return 20 * torch.log10(r)


def _peak(x: torch.Tensor) -> torch.Tensor:
    return x.abs().flatten(1).amax(dim=1)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class DecibelBall(ThreatModel):
    """Waveforms ``x'`` with ``dB_x(x' - x) <= db`` inside the sample domain.

    Args:
        db: the budget in decibels relative to the clip's peak (e.g. -32; 0 allows a perturbation as loud as the
            clip; ``math.inf`` is unbounded).
        domain: bounds of every sample (``[-1, 1]``).

    Example:
        >>> round(DecibelBall(-20.0).eps, 3)
        0.1
    """

    db: float = -32.0
    domain: tuple[float, float] = AUDIO_DOMAIN

    def __post_init__(self) -> None:
        try:
            db = float(self.db)
        except (TypeError, ValueError):
            raise InputError(f"db must be a number of decibels, got {self.db!r}") from None
        if math.isnan(db) or db == -math.inf:
            raise InputError(f"db must be a finite number of decibels (or inf), got {self.db!r}")
        object.__setattr__(self, "db", db)
        object.__setattr__(self, "domain", check_domain(self.domain))

    @property
    def eps(self) -> float:
        """The budget as the ratio ``max|δ| / max|x|``: ``10^(db/20)``."""
        return math.inf if math.isinf(self.db) else 10 ** (self.db / 20)

    @property
    def key(self) -> str:
        base = f"db:{self.db!r}"
        return base if self.domain == AUDIO_DOMAIN else f"{base}@[{self.domain[0]!r},{self.domain[1]!r}]"

    def with_db(self, db: float) -> DecibelBall:
        return DecibelBall(db, self.domain)

    def radius(self, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        """Per-clip l∞ radius (N,): ``ratio · max|x|`` with ``ratio`` the budget (or ``eps``, per clip or scalar)."""
        check_waveforms(x)
        e = torch.as_tensor(self.eps if eps is None else eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return torch.where(torch.isinf(e), e, e * _peak(x))

    def _check(self, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        check_waveforms(x, "x")
        check_waveforms(x_adv, "x_adv")
        if x_adv.shape != x.shape:
            raise InputError(f"x_adv has shape {tuple(x_adv.shape)} but x has {tuple(x.shape)}")

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``max|x_adv - x| / max|x|`` per clip (0 when unchanged; ``inf`` for a changed silent clip)."""
        self._check(x_adv, x)
        d = _peak(x_adv - x)
        peak = _peak(x)
        return torch.where(d == 0, torch.zeros_like(d), d / peak)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        r = self.radius(x, eps)
        d = _peak(x_adv - x) if x_adv.shape == x.shape else self.distance(x_adv, x)
        tol = 1e-7 + 1e-5 * torch.where(torch.isinf(r), 0.0, r)
        return (d <= r + tol) & self.in_domain(x_adv)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float | None = None) -> torch.Tensor:
        """Clip every sample to ``[x - r, x + r]`` and to the domain (exact: the set is a box)."""
        self._check(x_adv, x)
        r = _rows(self.radius(x, eps), x)
        return torch.maximum(torch.minimum(x_adv, x + r), x - r).clamp(*self.domain)

    def random_start(
        self, x: torch.Tensor, generator: torch.Generator | None = None, eps: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """Uniform noise in the box of radius ``r`` around each clip, clipped to the domain."""
        r = self.radius(x, eps)
        r = torch.where(torch.isinf(r), torch.full_like(r, self.domain[1] - self.domain[0]), r)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return (x + u * _rows(r, x)).clamp(*self.domain)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor | float) -> torch.Tensor:
        """The l∞ steepest-ascent step ``step_size · sign(grad)`` (``step_size`` absolute, per clip or scalar)."""
        check_waveforms(x_adv, "x_adv")
        size = step_size if isinstance(step_size, float) else _rows(torch.as_tensor(step_size), x_adv)
        return x_adv + size * grad.sign()

    def __repr__(self) -> str:
        extra = "" if self.domain == AUDIO_DOMAIN else f", domain={self.domain!r}"
        return f"DecibelBall({self.db!r}{extra})"
