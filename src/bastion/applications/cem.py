"""Contrastive explanations (CEM): pertinent negatives and pertinent positives by elastic-net optimisation.

Dhurandhar, Chen, Luss, Tu, Ting, Shanmugam & Das, "Explanations based on the Missing: Towards Contrastive
Explanations with Pertinent Negatives", NeurIPS 2018. A PyTorch-native implementation (the authors' code and
AIX360's ``CEMExplainer`` are TensorFlow 1.x only); written from the paper.

For an input ``x0`` the model classifies as ``t0``, with ``z(·)`` the model's logits and ``lo`` the domain's low
value (an *absent* feature: the dark background of a digit):

* a **pertinent negative** (PN) is a sparse set of features ``δ >= 0`` that, *added* to ``x0``, changes the class:
  ``argmax z(x0 + δ) != t0``. It says what is *missing* from ``x0`` that would make it another class. Objective
  (the paper's eq. 1)::

      min_δ  c · max(z_t0(x0 + δ) - max_{i != t0} z_i(x0 + δ), -κ) + β ||δ||_1 + ||δ||_2² + γ ||x0 + δ - AE(x0 + δ)||_2²

  over ``0 <= δ <= hi - x0`` (features can only be switched on, and stay in the domain);
* a **pertinent positive** (PP) is a sparse part of ``x0`` that on its own keeps the class: ``lo + δ`` with
  ``0 <= δ <= x0 - lo`` and ``argmax z(lo + δ) == t0``. It says what is *minimally sufficient*. Objective (eq. 2)::

      min_δ  c · max(max_{i != t0} z_i(lo + δ) - z_t0(lo + δ), -κ) + β ||δ||_1 + ||δ||_2² + γ ||lo + δ - AE(lo + δ)||_2²

Both are solved by FISTA (projected shrinkage-thresholding of the l1 term, the paper's Section 3 and the authors'
code): a gradient step on the smooth part at the slack point, soft-thresholding by ``β`` towards ``δ = 0``
(the authors' code thresholds by ``β`` itself rather than by step·β, as bastion's EAD does; kept), the projection
onto the box above, and the momentum ``k / (k + 3)``; the step decays as ``lr · (1 - k / steps)^½``. A per-sample
binary search over ``c`` (``c`` times 10 while never successful, bisection afterwards: bastion's C&W/EAD
:func:`~bastion.attacks.cw.update_consts`) runs ``c_steps`` optimisations. An iterate counts when it meets its
goal with margin κ (PN: some class beats ``t0`` by κ; PP: ``t0`` beats every other class by κ), and the best one
per sample by the elastic-net size ``β||δ||_1 + ||δ||_2²`` is kept.

Defaults are the paper's MNIST settings: κ = 0.1, β = 0.1, γ = 100 (used only with an autoencoder), initial
``c = 10``, 9 binary-search steps, 1000 iterations, lr = 0.01. The autoencoder term is optional: any module
mapping inputs to reconstructions of the same shape, e.g. a :class:`~bastion.reliability.vae.VAE`'s
``reconstruct`` (see :func:`autoencoder_from_vae`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bastion.attacks.base import positive_float, positive_int
from bastion.attacks.cw import NO_UPPER, update_consts
from bastion.data import Dataset, validate_arrays
from bastion.errors import InputError
from bastion.models.checks import check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.oracle import BlackBox
from bastion.results import SampleRecord, cw_margin
from bastion.store import Store, resumable_run

__all__ = ["CEM", "MODES", "CEMResult", "autoencoder_from_vae"]

Mode = Literal["PN", "PP"]
#: The two kinds of explanation.
MODES: tuple[str, ...] = ("PN", "PP")


def autoencoder_from_vae(vae: Any) -> Callable[[Tensor], Tensor]:
    """The deterministic autoencoder ``x -> decoder(mu(x))`` of a :class:`~bastion.reliability.vae.VAE`."""
    if not callable(getattr(vae, "reconstruct", None)):
        raise InputError(f"expected a bastion VAE (with reconstruct()), got {type(vae).__name__}")

    def ae(x: Tensor) -> Tensor:
        return vae.decode(vae.encode(x)).reshape(x.shape)

    return ae


@dataclass
class CEMResult:
    """Contrastive explanations of a batch.

    Attributes:
        x: the explained inputs (N, ...).
        clean_pred: the model's class ``t0`` of each input.
        pn: pertinent-negative images ``x0 + δ`` (N, ...) (``x0`` where none was found), or ``None`` (not asked).
        pn_delta: the added features ``δ`` (zero where none was found).
        pn_pred: the class of each ``pn`` image.
        pn_found: a PN meeting its goal was found (re-verified: ``pn_pred != clean_pred``).
        pp: pertinent-positive images ``lo + δ`` (N, ...) (all ``lo`` where none was found), or ``None``.
        pp_pred: the class of each ``pp`` image.
        pp_found: a PP meeting its goal was found (re-verified: ``pp_pred == clean_pred``).
        model_calls: forward evaluations, counted in samples.
        seconds: wall time.
        run_id: the store's run id, if a store was given.
        options: the explainer's options.
        computed: which samples were optimised in this call (a resumed run takes the outcome of the others,
            ``*_found`` and ``*_pred``, from the store, but not their images, which stay at ``x0`` / ``lo``);
            ``None`` means all. Sparsity figures cover computed samples only.
    """

    x: Tensor
    clean_pred: Tensor
    pn: Tensor | None = None
    pn_delta: Tensor | None = None
    pn_pred: Tensor | None = None
    pn_found: Tensor | None = None
    pp: Tensor | None = None
    pp_pred: Tensor | None = None
    pp_found: Tensor | None = None
    model_calls: int = 0
    seconds: float = 0.0
    run_id: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    computed: Tensor | None = None

    @staticmethod
    def _support(t: Tensor | None, lo: float = 0.0) -> Tensor | None:
        return None if t is None else ((t - lo).abs() > 1e-6).flatten(1).float().mean(dim=1)

    def _computed(self) -> Tensor:
        n = int(self.x.shape[0])
        return torch.ones(n, dtype=torch.bool) if self.computed is None else self.computed.cpu()

    def summary(self) -> dict[str, Any]:
        """Success rates and sparsity (mean fraction of features used, mean l1 size) of the explanations."""
        out: dict[str, Any] = {"n": int(self.x.shape[0])}
        lo = float(self.options.get("lo", 0.0))
        if self.pn_found is not None and self.pn_delta is not None:
            found = self.pn_found & self._computed()
            sup = self._support(self.pn_delta)
            l1 = self.pn_delta.flatten(1).abs().sum(dim=1)
            out["pn_success"] = float(self.pn_found.float().mean()) if found.numel() else 0.0
            out["pn_support"] = float(sup[found].mean()) if bool(found.any()) and sup is not None else None
            out["pn_l1"] = float(l1[found].mean()) if bool(found.any()) else None
        if self.pp_found is not None and self.pp is not None:
            found = self.pp_found & self._computed()
            sup = self._support(self.pp, lo)
            orig = self._support(self.x, lo)
            l1 = (self.pp - lo).flatten(1).abs().sum(dim=1)
            out["pp_success"] = float(self.pp_found.float().mean()) if found.numel() else 0.0
            out["pp_support"] = float(sup[found].mean()) if bool(found.any()) and sup is not None else None
            out["input_support"] = float(orig.mean()) if orig is not None and orig.numel() else None
            out["pp_l1"] = float(l1[found].mean()) if bool(found.any()) else None
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self.summary()
        out.update(model_calls=self.model_calls, seconds=self.seconds, run_id=self.run_id, options=self.options)
        rows = []
        for i in range(int(self.x.shape[0])):
            row: dict[str, Any] = {"index": i, "class": int(self.clean_pred[i])}
            if self.pn_pred is not None and self.pn_found is not None:
                row.update(pn_class=int(self.pn_pred[i]), pn_found=bool(self.pn_found[i]))
            if self.pp_pred is not None and self.pp_found is not None:
                row.update(pp_class=int(self.pp_pred[i]), pp_found=bool(self.pp_found[i]))
            rows.append(row)
        out["per_sample"] = rows
        return out

    def table(self) -> str:
        s = self.summary()
        lines = [f"contrastive explanations (CEM) of {s['n']} inputs, {self.seconds:.1f} s"]
        if "pn_success" in s:
            extra = "" if s["pn_support"] is None else f", mean support {100 * s['pn_support']:.1f} % of the features"
            lines.append(f"  pertinent negatives: {100 * s['pn_success']:.1f} % change the class{extra}")
        if "pp_success" in s:
            extra = "" if s["pp_support"] is None else (
                f", mean support {100 * s['pp_support']:.1f} % of the features (the inputs use "
                f"{100 * (s['input_support'] or 0):.1f} %)"
            )  # fmt: skip
            lines.append(f"  pertinent positives: {100 * s['pp_success']:.1f} % keep the class{extra}")
        for row in self.to_dict()["per_sample"][:10]:
            parts = [f"  #{row['index']}: class {row['class']}"]
            if "pn_class" in row:
                parts.append(f"PN -> {row['pn_class']}" + ("" if row["pn_found"] else " (none found)"))
            if "pp_class" in row:
                parts.append(f"PP -> {row['pp_class']}" + ("" if row["pp_found"] else " (none found)"))
            lines.append(", ".join(parts))
        return "\n".join(lines)


class CEM:
    """The contrastive explanation method (Dhurandhar et al., NeurIPS 2018); see the module docstring.

    Args:
        mode: ``"PN"``, ``"PP"`` or ``"both"``.
        kappa: confidence margin κ (0.1).
        beta: weight β of the l1 term and the soft threshold (0.1).
        gamma: weight γ of the autoencoder term (100; used only when an autoencoder is given).
        c_init: first value of ``c`` (10).
        c_steps: binary-search steps over ``c`` (9).
        steps: FISTA iterations per value of ``c`` (1000).
        lr: initial step (0.01), decayed as ``(1 - k / steps)^½``.
        autoencoder: a callable mapping inputs (N, ...) to reconstructions of the same shape, or ``None``.
    """

    def __init__(
        self,
        *,
        mode: str = "both",
        kappa: float = 0.1,
        beta: float = 0.1,
        gamma: float = 100.0,
        c_init: float = 10.0,
        c_steps: int = 9,
        steps: int = 1000,
        lr: float = 0.01,
        autoencoder: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if mode not in ("PN", "PP", "both"):
            raise InputError(f"mode must be 'PN', 'PP' or 'both', got {mode!r}")
        self.mode = mode
        self.kappa = positive_float("kappa", kappa, allow_zero=True)
        self.beta = positive_float("beta", beta, allow_zero=True)
        self.gamma = positive_float("gamma", gamma, allow_zero=True)
        self.c_init = positive_float("c_init", c_init)
        self.c_steps = positive_int("c_steps", c_steps)
        self.steps = positive_int("steps", steps)
        self.lr = positive_float("lr", lr)
        if autoencoder is not None and not callable(autoencoder):
            raise InputError(f"autoencoder must be callable (inputs -> reconstructions), got {autoencoder!r}")
        self.autoencoder = autoencoder

    def options(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "kappa": self.kappa, "beta": self.beta, "gamma": self.gamma, "c_init": self.c_init,
            "c_steps": self.c_steps, "steps": self.steps, "lr": self.lr, "autoencoder": self.autoencoder is not None,
        }  # fmt: skip

    def __repr__(self) -> str:
        return f"CEM({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    # ----------------------------------------------------------------------------------------------- public
    def explain(
        self,
        model: nn.Module,
        x: Tensor | Dataset,
        *,
        domain: tuple[float, float] | None = None,
        batch_size: int = 128,
        store: Store | str | None = None,
        progress: bool = True,
        config: dict[str, Any] | None = None,
    ) -> CEMResult:
        """Pertinent negatives and/or positives of ``model``'s decisions on ``x``.

        Args:
            model: a white-box torch classifier (gradients are needed; a BlackBox is refused).
            x: inputs (N, ...) inside ``domain``, or a Dataset (its labels are ignored: CEM explains the model's
                own decision ``t0``).
            domain: the input domain (default: the Dataset's, else (0, 1)); its low value is "absent".
            batch_size: samples optimised together.
            store: a result store (or path): one record per sample and mode, written batch by batch; a re-run
                resumes. The store keeps each sample's outcome (found, class, l1, support), not its image: the
                result of a resumed run holds the images of the samples optimised in this call only
                (``result.computed``).
            progress: show a progress bar.
            config: extra information stored with the run.

        Returns:
            A :class:`CEMResult`; successes are re-verified by a forward pass on the returned images.
        """
        started = time.perf_counter()
        if isinstance(model, BlackBox) or not isinstance(model, nn.Module):
            raise InputError("CEM needs a white-box torch model (it follows gradients); got "
                             f"{type(model).__name__}")  # fmt: skip
        if isinstance(x, Dataset):
            dom = x.domain if domain is None else domain
            xs = x.x
        else:
            dom = (0.0, 1.0) if domain is None else domain
            if not torch.is_tensor(x) or x.dim() < 2:
                raise InputError(f"x must be a batch of inputs (N, ...) or a Dataset, got {type(x).__name__}")
            xs = x
        dummy = torch.zeros(xs.shape[0], dtype=torch.long)
        xs, _, _ = validate_arrays(xs, dummy, domain=dom, source="inputs given to CEM")
        lo, hi = float(dom[0]), float(dom[1])
        device = model_device(model)
        bs = positive_int("batch_size", batch_size)
        modes = list(MODES) if self.mode == "both" else [self.mode]
        calls = 0
        with torch.no_grad(), eval_mode(model):
            logits = model(xs[: min(len(xs), 2)].to(device))
            k = check_logits(logits, min(len(xs), 2))
            pred = torch.cat([model(xb.to(device)).argmax(dim=1).cpu() for xb in xs.split(1024)]) if len(xs) else dummy
            calls += len(xs)
        data = Dataset(xs, pred, num_classes=k, name="cem inputs", domain=(lo, hi))
        out = {m: torch.zeros_like(xs) for m in modes}
        out_pred = {m: pred.clone() for m in modes}
        computed = torch.zeros(len(xs), dtype=torch.bool)
        payload = {"options": self.options(), "domain": [lo, hi]}
        keys = [f"cem:{m}" for m in modes]
        with resumable_run(
            store, kind="explain", payload=payload,
            fingerprints=lambda: (model_fingerprint(model), data.fingerprint()), n_samples=len(data), threats=keys,
            config=config,
        ) as run:  # fmt: skip
            with eval_mode(model):
                for idx, xb, yb in run.batches(data, bs, desc=f"cem ({self.mode})", progress=progress):
                    xb, yb = xb.to(device), yb.to(device)
                    records = []
                    t0 = time.perf_counter()
                    for m in modes:
                        delta, n_calls = self._solve(model, xb, yb, m, lo, hi)
                        calls += n_calls
                        image = (xb + delta) if m == "PN" else (lo + delta)
                        with torch.no_grad():
                            new_pred = model(image).argmax(dim=1)
                        calls += xb.shape[0]
                        out[m][idx] = delta.cpu()
                        computed[idx] = True
                        out_pred[m][idx] = new_pred.cpu()
                        ok = new_pred != yb if m == "PN" else new_pred == yb
                        l1 = delta.flatten(1).abs().sum(dim=1)
                        support = (delta.abs() > 1e-6).flatten(1).float().mean(dim=1)
                        for j, i in enumerate(idx.tolist()):
                            found = bool(ok[j])
                            records.append(SampleRecord(
                                index=i, threat=f"cem:{m}", label=int(yb[j]), clean_pred=int(yb[j]),
                                status="falsified" if (m == "PN" and found) else "unknown",
                                adv_distance=float(l1[j]) if (m == "PN" and found) else None, attack=repr(self),
                                queries=n_calls // max(xb.shape[0], 1) + 1,
                                extra={"found": found, "class": int(new_pred[j]), "l1": float(l1[j]),
                                       "support": float(support[j])},
                            ))  # fmt: skip
                    share = (time.perf_counter() - t0) / max(len(modes) * xb.shape[0], 1)
                    for r in records:
                        r.seconds = share
                    run.write(records)
                    run.show(done=len(idx))
            result = CEMResult(
                x=xs, clean_pred=pred, model_calls=calls, options={**self.options(), "lo": lo}, computed=computed
            )
            stored = {key: {r.index: r for r in run.records(key)} for key in keys}
            for m in modes:
                recs = stored[f"cem:{m}"]
                hit = torch.tensor([bool(recs[i].extra.get("found")) if i in recs else False for i in range(len(xs))])
                cls = torch.tensor([int(recs[i].extra.get("class", pred[i])) if i in recs else int(pred[i])
                                    for i in range(len(xs))], dtype=torch.long)  # fmt: skip
                if m == "PN":
                    result.pn_delta, result.pn = out[m], xs + out[m]
                    result.pn_pred, result.pn_found = cls, hit
                else:
                    result.pp = lo + out[m]
                    result.pp_pred, result.pp_found = cls, hit
            return run.finish(result, started=started)

    # ----------------------------------------------------------------------------------------------- solver
    def _solve(self, model: nn.Module, x: Tensor, t0: Tensor, mode: str, lo: float, hi: float) -> tuple[Tensor, int]:
        """The best ``δ`` per sample (zero where nothing met the goal) and the forward evaluations spent."""
        n = x.shape[0]
        base = x if mode == "PN" else torch.full_like(x, lo)
        upper_box = (hi - x) if mode == "PN" else (x - lo)
        view = (-1,) + (1,) * (x.dim() - 1)
        const = torch.full((n,), self.c_init, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(const)
        upper = torch.full_like(const, NO_UPPER)
        best = torch.zeros_like(x)
        best_dist = torch.full_like(const, math.inf)
        use_ae = self.autoencoder is not None and self.gamma > 0
        calls = 0

        def goal_margin(logits: Tensor) -> Tensor:
            # >= κ exactly when the explanation meets its goal with confidence κ
            other_minus_t0 = cw_margin(logits, t0)
            return other_minus_t0 if mode == "PN" else -other_minus_t0

        for _ in range(self.c_steps):
            c = const.clone()
            d_k = torch.zeros_like(x)
            y_k = torch.zeros_like(x)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for k in range(self.steps):
                alpha = self.lr * (1.0 - k / self.steps) ** 0.5
                y = y_k.detach().requires_grad_(True)
                with torch.enable_grad():
                    image = base + y
                    logits = model(image)
                    f = (-goal_margin(logits)).clamp(min=-self.kappa)
                    loss = c * f
                    if use_ae:
                        assert self.autoencoder is not None
                        loss = loss + self.gamma * (image - self.autoencoder(image)).flatten(1).square().sum(dim=1)
                    (grad,) = torch.autograd.grad(loss.sum(), y)
                calls += n
                with torch.no_grad():
                    grad = grad + 2.0 * y_k  # the ||δ||² term
                    z = y_k - alpha * grad
                    d_next = torch.minimum((z.abs() - self.beta).clamp(min=0.0) * z.sign(), upper_box).clamp(min=0.0)
                    y_k = d_next + (k / (k + 3.0)) * (d_next - d_k)
                    y_k = torch.minimum(y_k, upper_box).clamp(min=0.0)
                    d_k = d_next
                    margin = goal_margin(model(base + d_k))
                    calls += n
                    flat = d_k.flatten(1)
                    dist = flat.square().sum(dim=1) + self.beta * flat.abs().sum(dim=1)
                    success = margin >= self.kappa
                    better = success & (dist < best_dist)
                    best_dist = torch.where(better, dist, best_dist)
                    best = torch.where(better.view(view), d_k, best)
                    found |= success
            const, lower, upper = update_consts(const, lower, upper, found)
        return best, calls
