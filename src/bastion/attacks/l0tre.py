"""The L0-TRE upper-bound search as an l0 attack (Ruan, Wu, Sun, Huang, Kroening & Kwiatkowska, IJCAI 2019).

The search (feature sensitivity ranking, cumulative setting of the most sensitive features, refinement) lives here
so that it is an ordinary attack of :mod:`bastion.attacks`; :mod:`bastion.verify.globalopt.l0` adds the proven lower
bound and the data-set robustness on top of it (see that module's docstring for the algorithm and its sources).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bastion.attacks.base import Attack, CountingModel, positive_int
from bastion.errors import InputError
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

__all__ = ["FEATURES", "L0TRE", "feature_map"]

#: Feature granularities: single input elements, or pixels (all channels of one location of a (C, H, W) input).
FEATURES = ("pixel", "element")


def _int_param(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_feature(feature: object) -> str:
    if feature not in FEATURES:
        raise InputError(f"feature must be one of {', '.join(map(repr, FEATURES))}, got {feature!r}")
    return str(feature)


def _check_max_features(max_features: object) -> int | None:
    return None if max_features is None else _int_param("max_features", max_features, 1)


def feature_map(shape: Sequence[int], feature: str) -> tuple[Tensor, int]:
    """The feature of every input element and the number of features.

    Args:
        shape: per-sample input shape.
        feature: ``"element"`` (each element its own feature) or ``"pixel"`` (for ``(C, H, W)`` inputs, the ``C``
            channel values at one location form one feature; other shapes fall back to elements).

    Returns:
        ``(feat_of, F)``: ``feat_of`` an int64 tensor of ``prod(shape)`` feature indices in ``[0, F)``.
    """
    feature = _check_feature(feature)
    numel = math.prod(shape)
    if feature == "pixel" and len(shape) == 3:
        hw = int(shape[1]) * int(shape[2])
        return torch.arange(numel) % hw, hw
    return torch.arange(numel), numel


def _elements_of(feat_of: Tensor, n_features: int) -> Tensor:
    """``(F, E)``: the input elements of every feature (``E`` elements each: 1, or the channels of a pixel)."""
    order = feat_of.argsort(stable=True)
    return order.reshape(n_features, -1)


def _largest_pool(level: int, budget: int, n_features: int) -> int:
    """The largest ``m <= n_features`` with ``C(m, level) <= budget`` (at least ``level``)."""
    m = level
    while m < n_features and math.comb(m + 1, level) <= budget:
        m += 1
    return m


# --------------------------------------------------------------------------------------------------- the search
@dataclass
class _Level:
    """What the sensitivity pass of one level leaves for the accumulation and the proof (rows of the search)."""

    ids: Tensor  # (R, S, t) the features of every subset
    best_vals: Tensor  # (R, S, t) the assignment v*(S)
    sens: Tensor  # (R, S) sensitivity
    corner_adv: Tensor  # (R, S) some grid assignment of the subset is adversarial


class _Search:
    """The upper-bound machinery of L0-TRE on a batch (flattened inputs), shared by the attack and the verifier.

    ``forward`` returns logits for a batch of inputs of the original shape. Forward evaluations are counted per
    sample (``forwards``). Rows are indices into the batch.
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor],
        x: Tensor,
        criterion: Criterion,
        *,
        feature: str,
        values: int,
        domain: tuple[float, float],
        batch_size: int,
    ) -> None:
        self.forward = forward
        self.shape = tuple(x.shape[1:])
        self.n = x.shape[0]
        self.x = x.reshape(self.n, -1)
        self.device = x.device
        self.feature = feature
        feat_of, self.n_features = feature_map(self.shape, feature)
        self.feat_of = feat_of.to(self.device)
        self.elems = _elements_of(self.feat_of, self.n_features)  # (F, E)
        self.lo, self.hi = domain
        self.grid = torch.linspace(self.lo, self.hi, values, dtype=x.dtype, device=self.device)
        self.batch_size = batch_size
        self.labels = criterion.labels
        self.targets = criterion.targets
        self.forwards = torch.zeros(self.n, dtype=torch.long, device=self.device)
        all_rows = torch.arange(self.n, device=self.device)
        self.f0 = self._score(self._eval(self.x, all_rows), all_rows) if self.n else self.x.new_zeros(0)

    # ----------------------------------------------------------------------------------------------- basics
    def _eval(self, flat: Tensor, rows: Tensor) -> Tensor:
        """Logits of the flattened inputs ``flat`` (B, numel) belonging to the samples ``rows`` (B,)."""
        self.forwards.index_add_(0, rows, torch.ones_like(rows))
        with torch.no_grad():
            return self.forward(flat.reshape(-1, *self.shape))

    def _score(self, logits: Tensor, rows: Tensor) -> Tensor:
        """The value whose drop measures sensitivity: the label's logit (untargeted, the paper's), or minus the
        target's logit (targeted)."""
        if self.targets is None:
            return logits.gather(1, self.labels[rows][:, None]).squeeze(1)
        return -logits.gather(1, self.targets[rows][:, None]).squeeze(1)

    def _adversarial(self, logits: Tensor, rows: Tensor) -> Tensor:
        pred = logits.argmax(dim=1)
        return pred == self.targets[rows] if self.targets is not None else pred != self.labels[rows]

    def changed(self, flat: Tensor, rows: Tensor) -> Tensor:
        """Number of features of ``flat`` (B, numel) that differ from the clean inputs of ``rows`` (B,)."""
        diff = (flat != self.x[rows]).to(flat.dtype)
        per_feature = flat.new_zeros(flat.shape[0], self.n_features).index_add_(1, self.feat_of, diff)
        return (per_feature > 0).sum(dim=1)

    def put(self, flat: Tensor, feats: Tensor, vals: Tensor) -> Tensor:
        """``flat`` (B, numel) with the features ``feats`` (B, t) set to ``vals`` (B, t) (every element of a
        feature gets its value); a new tensor."""
        e = self.elems.shape[1]
        idx = self.elems[feats].reshape(flat.shape[0], -1)
        return flat.clone().scatter_(1, idx, vals[..., None].expand(*vals.shape, e).reshape(flat.shape[0], -1))

    def adversarial(self, flat: Tensor, rows: Tensor) -> Tensor:
        """Re-execute the flattened inputs and say which are adversarial."""
        if flat.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device)
        return self._adversarial(self._eval(flat, rows), rows)

    # ----------------------------------------------------------------------------------------------- level t
    def sensitivity(self, rows: Tensor, level: int, cand: Tensor) -> tuple[_Level, Tensor, Tensor]:
        """Step 1 of the search on ``rows``: every ``level``-subset of the candidate features ``cand`` (R, m) under
        every grid assignment.

        Returns:
            The level's data, and the best adversarial grid corner found per row: its flattened input (R, numel)
            and its number of changed features (R,), ``inf`` where none was adversarial.
        """
        r_all, m = cand.shape
        combos = torch.combinations(torch.arange(m, device=self.device), r=level)
        combos = combos.reshape(-1, level)
        s_all = combos.shape[0]
        ids = cand[:, combos.reshape(-1)].reshape(r_all, s_all, level)
        vals = torch.cartesian_prod(*([self.grid] * level)).reshape(-1, level)
        p = vals.shape[0]
        sens = self.x.new_full((r_all, s_all), -math.inf)
        best = torch.zeros(r_all, s_all, dtype=torch.long, device=self.device)
        corner = torch.zeros(r_all, s_all, dtype=torch.bool, device=self.device)
        adv_img = self.x[rows].clone()
        adv_cnt = torch.full((r_all,), math.inf, dtype=torch.float64, device=self.device)
        r_chunk = max(1, min(r_all, self.batch_size // p))
        for r0 in range(0, r_all, r_chunk):
            rr = torch.arange(r0, min(r_all, r0 + r_chunk), device=self.device)
            r = rr.numel()
            s_chunk = max(1, self.batch_size // (r * p))
            base = self.x[rows[rr]]
            for s0 in range(0, s_all, s_chunk):
                sub = ids[rr, s0 : s0 + s_chunk]  # (r, s, t)
                s = sub.shape[1]
                feats = sub[:, :, None, :].expand(r, s, p, level).reshape(r * s * p, level)
                fvals = vals[None, None].expand(r, s, p, level).reshape(r * s * p, level)
                base_rep = base[:, None, :].expand(r, s * p, base.shape[1]).reshape(r * s * p, -1)
                flat = self.put(base_rep, feats, fvals)
                img = flat.reshape(r, s, p, -1)
                img_rows = rows[rr].repeat_interleave(s * p)
                logits = self._eval(flat, img_rows)
                score = self._score(logits, img_rows).reshape(r, s, p)
                adv = self._adversarial(logits, img_rows).reshape(r, s, p)
                low, arg = score.min(dim=2)
                sens[rr, s0 : s0 + s] = self.f0[rows[rr]][:, None] - low
                best[rr, s0 : s0 + s] = arg
                corner[rr, s0 : s0 + s] = adv.any(dim=2)
                hit = adv.reshape(r, s * p)
                has = hit.any(dim=1)
                if bool(has.any()):
                    first = hit.to(torch.int8).argmax(dim=1)
                    cand_img = img.reshape(r, s * p, -1)[torch.arange(r, device=self.device), first]
                    cnt = self.changed(cand_img, rows[rr]).to(torch.float64)
                    cnt = torch.where(has, cnt, torch.full_like(cnt, math.inf))
                    better = cnt < adv_cnt[rr]
                    adv_cnt[rr[better]] = cnt[better]
                    adv_img[rr[better]] = cand_img[better]
        best_vals = vals[best]  # (R, S, t)
        return _Level(ids, best_vals, sens, corner), adv_img, adv_cnt

    def accumulate(
        self, rows: Tensor, lvl: _Level, max_features: int | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Step 2: the first adversarial prefix of the features taken in decreasing subset sensitivity.

        Returns:
            ``(img, found, order, n_mod, feat_val)``: the adversarial input per row (the clean one where none was
            found), whether one was found, the feature order (R, F), the number of modified features of the
            prefix (R,) and the value each feature is set to (R, F).
        """
        r_all, s_all, level = lvl.ids.shape
        f = self.n_features
        order_s = lvl.sens.argsort(dim=1, descending=True, stable=True)
        seq_f = lvl.ids.gather(1, order_s[..., None].expand(-1, -1, level)).reshape(r_all, s_all * level)
        seq_v = lvl.best_vals.gather(1, order_s[..., None].expand(-1, -1, level)).reshape(r_all, s_all * level)
        length = s_all * level
        pos = torch.full((r_all, f), length, dtype=torch.long, device=self.device)
        steps = torch.arange(length, device=self.device).expand(r_all, length)
        pos.scatter_reduce_(1, seq_f, steps, reduce="amin", include_self=True)
        avail = pos < length
        feat_val = seq_v.gather(1, pos.clamp(max=length - 1))
        order = pos.argsort(dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(f, device=self.device).expand(r_all, f))
        limit = avail.sum(dim=1)
        if max_features is not None:
            limit = limit.clamp(max=max_features)
        img = self.x[rows].clone()
        found = torch.zeros(r_all, dtype=torch.bool, device=self.device)
        n_mod = torch.zeros(r_all, dtype=torch.long, device=self.device)
        start, chunk = 1, 4
        top = int(limit.max()) if r_all else 0
        val_el = feat_val[:, self.feat_of]  # (R, numel)
        while start <= top:
            live = (~found & (limit >= start)).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            c = max(1, min(chunk, self.batch_size // live.numel(), top - start + 1))
            ms = torch.arange(start, start + c, device=self.device)
            keep = rank[live][:, None, :] < ms[None, :, None]  # (r, c, F)
            el = keep[:, :, self.feat_of]
            base = self.x[rows[live]]
            cand_img = torch.where(el, val_el[live][:, None, :], base[:, None, :])  # (r, c, numel)
            img_rows = rows[live].repeat_interleave(c)
            adv = self.adversarial(cand_img.reshape(live.numel() * c, -1), img_rows).reshape(live.numel(), c)
            adv = adv & (ms[None, :] <= limit[live][:, None])
            has = adv.any(dim=1)
            if bool(has.any()):
                first = adv.to(torch.int8).argmax(dim=1)
                w = has.nonzero().squeeze(1)
                img[live[w]] = cand_img[w, first[w]]
                found[live[w]] = True
                n_mod[live[w]] = ms[first[w]]
            start += c
            chunk *= 2
        return img, found, order, n_mod, feat_val

    def tighten(self, rows: Tensor, img: Tensor, order: Tensor, n_mod: Tensor) -> Tensor:
        """Step 3: put modified features back to their clean values while the input stays adversarial."""
        img = img.clone()
        width = int(n_mod.max()) if n_mod.numel() else 0
        if width == 0:
            return img
        still = torch.arange(width, device=self.device)[None, :] < n_mod[:, None]  # (R, width)
        x_rows = self.x[rows]
        while True:
            changed = False
            for j in range(width):
                idx = still[:, j].nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                e_idx = self.elems[order[idx, j]]  # (r, E): the elements of the feature tried
                trial = img[idx].scatter(1, e_idx, x_rows[idx].gather(1, e_idx))
                ok = self.adversarial(trial, rows[idx])
                if bool(ok.any()):
                    img[idx[ok]] = trial[ok]
                    still[idx[ok], j] = False
                    changed = True
            if not changed:
                return img

    def upper(self, rows: Tensor, lvl: _Level, max_features: int | None, refine: bool) -> tuple[Tensor, Tensor]:
        """Steps 2 and 3 on ``rows``: adversarial inputs (R, numel) and their distances (R,), ``inf`` if none."""
        img, found, order, n_mod, _ = self.accumulate(rows, lvl, max_features)
        if refine and bool(found.any()):
            w = found.nonzero().squeeze(1)
            img[w] = self.tighten(rows[w], img[w], order[w], n_mod[w])
        cnt = self.changed(img, rows).to(torch.float64)
        return img, torch.where(found, cnt, torch.full_like(cnt, math.inf))

    def candidates(self, rows: Tensor, level: int, budget: int, sens1: Tensor | None) -> Tensor:
        """The candidate features of level ``level``: every feature while ``C(F, level) <= budget`` (and always
        at level 1), else the ``m`` most sensitive single features with ``C(m, level) <= budget``."""
        f = self.n_features
        if level == 1 or math.comb(f, level) <= budget or sens1 is None:
            return torch.arange(f, device=self.device).expand(rows.numel(), f)
        m = _largest_pool(level, budget, f)
        return sens1[rows].argsort(dim=1, descending=True, stable=True)[:, :m]


class L0TRE(Attack):
    """The L0-TRE upper-bound search as an l0 attack (Ruan et al., IJCAI 2019; the reference ``l0attack.py``).

    Rank the ``t``-subsets of features by how far setting them to grid values (``values`` points of the domain)
    lowers the label's logit (for a targeted attack: raises the target's), set the features of the most sensitive
    subsets cumulatively until the input is adversarial, then put back every feature that is not needed. Levels
    ``t = 1 .. subset_size`` are searched and the shortest example is kept. Untargeted by default; with targets,
    success means the target class. The base class projects onto ``LpBall("l0", k)`` (keeping the ``k`` largest
    changes) and re-verifies, so an example longer than ``k`` only counts if its projection is still adversarial.

    Args:
        subset_size: the largest subset size ``t`` (the reference attack ranks single pixels: 1).
        values: grid points per feature (the reference's ``pixel_num = 2``: the two ends of the domain).
        feature: ``"element"`` (bastion's l0 distance counts elements) or ``"pixel"`` (channels change together).
        budget: the most subsets per level; beyond, the level uses the most sensitive single features.
        max_features: the longest accumulated prefix (the reference's ``mani_range``; None: every feature).
        refine: put unneeded features back (the reference's refinement).
        batch_size: inputs per forward evaluation.
    """

    name = "l0-tre"
    norms = ("l0",)
    paper = (
        "Ruan, Wu, Sun, Huang, Kroening & Kwiatkowska, Global Robustness Evaluation of Deep Neural Networks with "
        "Provable Guarantees for the Hamming Distance, IJCAI 2019"
    )

    def __init__(
        self,
        *,
        subset_size: int = 1,
        values: int = 2,
        feature: str = "element",
        budget: int = 50_000,
        max_features: int | None = None,
        refine: bool = True,
        batch_size: int = 8192,
    ) -> None:
        self.subset_size = _int_param("subset_size", subset_size, 1)
        self.values = _int_param("values", values, 2)
        self.feature = _check_feature(feature)
        self.budget = _int_param("budget", budget, 1)
        self.max_features = _check_max_features(max_features)
        if not isinstance(refine, bool):
            raise InputError(f"refine must be True or False, got {refine!r}")
        self.refine = refine
        self.batch_size = positive_int("batch_size", batch_size)

    def run(
        self,
        model: CountingModel,
        x: Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> Tensor:
        if not isinstance(threat, LpBall):
            raise InputError(f"L0TRE needs an LpBall('l0', k) threat model, got {threat!r}")
        search = _Search(
            model, x, criterion, feature=self.feature, values=self.values, domain=threat.domain,
            batch_size=self.batch_size,
        )  # fmt: skip
        n = x.shape[0]
        best = search.x.clone()
        dist = torch.full((n,), math.inf, dtype=torch.float64, device=x.device)
        eps = threat.eps
        sens1: Tensor | None = None
        for level in range(1, self.subset_size + 1):
            rows = (dist > eps).nonzero().squeeze(1) if math.isfinite(eps) else torch.arange(n, device=x.device)
            if rows.numel() == 0:
                break
            cand = search.candidates(rows, level, self.budget, sens1)
            lvl, c_img, c_cnt = search.sensitivity(rows, level, cand)
            if level == 1:
                sens1 = lvl.sens.new_full((n, search.n_features), -math.inf)
                sens1[rows] = lvl.sens
            u_img, u_cnt = search.upper(rows, lvl, self.max_features, self.refine)
            for img, cnt in ((c_img, c_cnt), (u_img, u_cnt)):
                better = cnt < dist[rows]
                dist[rows[better]] = cnt[better]
                best[rows[better]] = img[better]
        return best.reshape(x.shape)
