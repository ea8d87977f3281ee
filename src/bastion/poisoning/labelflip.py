"""Label flipping: a dirty-label availability attack that relabels a fraction of the training set.

The oldest poisoning attack on learned classifiers (Biggio, Nelson & Laskov, "Support Vector Machines Under
Adversarial Label Noise", ACML 2011; Xiao, Xiao & Eckert, "Adversarial Label Flips Attack on Support Vector
Machines", ECAI 2012): the inputs are left alone, the labels of chosen samples are changed. Two variants:

* **random** (``pairs=None``): ``round(rate · N)`` samples chosen uniformly at random each get a new label drawn
  uniformly from the ``K - 1`` other classes (uniform label noise);
* **targeted class pairs** (``pairs=[(source, destination), ...]``): for each pair, ``round(rate · N_source)``
  samples of class ``source`` (``N_source`` its count) are relabelled ``destination`` — the systematic confusion
  between chosen classes that hurts the victim most on those classes.

The random choice of the rows (and of the new labels) depends only on ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bastion.data import Dataset
from bastion.errors import InputError
from bastion.poisoning.base import (
    PoisonAttack,
    PoisonedData,
    check_class,
    check_dataset,
    check_rate,
    check_seed,
    choose,
    n_from_rate,
    replace_rows,
)

__all__ = ["LabelFlip"]


def _check_pairs(pairs: Any) -> list[tuple[int, int]] | None:
    if pairs is None:
        return None
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise InputError(
            f"pairs must be None (random flipping) or a list of (source, destination) classes, got {pairs!r}"
        )
    out = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InputError(f"pairs: each entry must be a (source, destination) pair of classes, got {pair!r}")
        s, d = pair
        for v in (s, d):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"pairs: classes must be non-negative ints, got {pair!r}")
        if s == d:
            raise InputError(f"pairs: source and destination must differ, got {pair!r}")
        out.append((int(s), int(d)))
    sources = [s for s, _ in out]
    if len(set(sources)) != len(sources):
        raise InputError(f"pairs: each source class may appear once, got {pairs!r}")
    return out


class LabelFlip(PoisonAttack):
    """Random or targeted (class-pair) label flipping at a poison rate.

    Args:
        rate: the poison rate in (0, 1]: the fraction of the training set relabelled (random flipping), or of each
            source class (targeted pairs). Default 10 %.
        pairs: ``None`` for random flipping, or ``[(source, destination), ...]`` class pairs for targeted flipping.
        seed: seeds the choice of the samples and of the new labels.

    Example::

        poisoned = LabelFlip(rate=0.2)(train_set)               # uniform label noise on 20 % of the samples
        poisoned = LabelFlip(rate=0.4, pairs=[(1, 7)])(train_set)  # 40 % of the ones relabelled seven
    """

    name = "labelflip"

    def __init__(self, *, rate: float = 0.1, pairs: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.rate = check_rate(rate)
        self.pairs = _check_pairs(pairs)
        self.seed = check_seed(seed)
        self._params = {"rate": self.rate, "pairs": self.pairs, "seed": self.seed}

    def __call__(self, data: Dataset) -> PoisonedData:
        """Flip labels of ``data``.

        Args:
            data: the clean training set.

        Returns:
            The relabelled set (same inputs, order and length); ``poison_indices`` are the relabelled samples,
            ``target`` the destination class when every pair shares one, else None.
        """
        data = check_dataset(data)
        k = data.num_classes
        if k < 2:
            raise InputError("label flipping needs at least two classes")
        gen = torch.Generator().manual_seed(self.seed)
        y = data.y.cpu()
        if self.pairs is None:
            idx = choose(torch.arange(len(data)), n_from_rate(self.rate, len(data)), gen)
            # y + U{1..K-1} mod K is uniform over the other classes and never the true one.
            shift = torch.randint(1, k, (idx.numel(),), generator=gen)
            new = (y[idx] + shift) % k
            target = None
        else:
            parts, labels = [], []
            for s, d in self.pairs:
                check_class(s, k, "pairs source")
                check_class(d, k, "pairs destination")
                members = torch.nonzero(y == s).reshape(-1)
                if members.numel() == 0:
                    raise InputError(f"pairs: the data holds no sample of source class {s}")
                chosen = choose(members, n_from_rate(self.rate, members.numel()), gen)
                parts.append(chosen)
                labels.append(torch.full((chosen.numel(),), d, dtype=torch.int64))
            idx_all = torch.cat(parts)
            order = torch.argsort(idx_all)
            idx, new = idx_all[order], torch.cat(labels)[order]
            destinations = {d for _, d in self.pairs}
            target = next(iter(destinations)) if len(destinations) == 1 else None
        poisoned = replace_rows(data, idx, None, new, name=f"{data.name} [labelflip {self.rate:g}]")
        return PoisonedData(data=poisoned, poison_indices=idx, attack=self.name, target=target, config=self.config())
