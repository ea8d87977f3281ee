"""Certified training (IBP, CROWN-IBP): schedules, soundness of the bound trained on, and the verified-accuracy gain.

The training test can fail: on the digits data with a small MLP at l∞ eps = 0.05, standard training leaves almost
nothing IBP-verifiable, while IBP and CROWN-IBP training must certify a large part of the held-out set (measured by
:func:`bastion.verify.certify.certify` on a snapshot network, a separate code path from the live training bounds).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.data import Dataset, load_digits
from bastion.defenses.training import (
    CROWNIBP,
    OBJECTIVES,
    AdversarialTrainer,
    IBPTraining,
    StandardObjective,
    accuracy,
    make_objective,
    verified_accuracy,
)
from bastion.defenses.training.certified import CertifiedScheduleWarning, ramp_position, worst_case_logits
from bastion.errors import InputError
from bastion.models import build_model
from bastion.threat import LpBall

EPS = 0.05
THREAT = LpBall("linf", EPS)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits().train_test_split(test_fraction=0.2, seed=0)


def _mlp(seed: int = 0, hidden: tuple[int, ...] = (64,)) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), 10, hidden=hidden)


def _fit(objective: object, data: Dataset, epochs: int = 12) -> tuple[nn.Module, list[float]]:
    model = _mlp()
    result = AdversarialTrainer(
        objective,  # type: ignore[arg-type]
        threat=THREAT,
        epochs=epochs,
        batch_size=64,
        optimizer="adam",
        lr=5e-3,
        progress=False,
    ).fit(model, data)
    return model, [h.loss for h in result.history]


@pytest.fixture(scope="module")
def trained(digits: tuple[Dataset, Dataset]) -> dict[str, tuple[nn.Module, list[float]]]:
    train_set, _ = digits
    # module fixtures run before the autouse one-thread fixture: set it here (several threads only spin on 2 cores)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            return {
                "standard": _fit(StandardObjective(), train_set),
                "ibp": _fit(IBPTraining(THREAT, warmup=0.1, ramp=0.4), train_set),
                "crown-ibp": _fit(CROWNIBP(THREAT, warmup=0.1, ramp=0.4), train_set),
            }
    finally:
        torch.set_num_threads(threads)


# -- schedules -------------------------------------------------------------------------------------------------
def _recording(cls: type) -> type:
    """``cls`` recording the steps its hook gets and the (ε, κ, β) each loss evaluation uses."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.steps: list[tuple[int, int]] = []
            self.seen: list[tuple[float, float, float]] = []

        def step_start(self, step: int, total_steps: int) -> None:
            self.steps.append((step, total_steps))
            super().step_start(step, total_steps)

        def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.seen.append((self.eps, self.kappa, getattr(self, "beta", -1.0)))
            return super().__call__(model, x, y)

    return Recording


def test_ramps_are_per_step_through_the_trainer(digits: tuple[Dataset, Dataset]) -> None:
    # 64 samples, batch 16, 5 epochs: 20 steps; warm-up 10 %, ramp 40 %: r_s = clip((s / 20 - 0.1) / 0.4, 0, 1)
    tiny = digits[0].subset(list(range(64)))
    for cls, kappa_end, beta in ((IBPTraining, 0.5, False), (CROWNIBP, 0.5, True)):
        obj = _recording(cls)(THREAT, warmup=0.1, ramp=0.4)
        AdversarialTrainer(obj, epochs=5, batch_size=16, optimizer="adam", lr=1e-3, progress=False).fit(
            _mlp(hidden=(8,)), tiny
        )
        assert obj.steps == [(s, 20) for s in range(20)]
        r = [min(1.0, max(0.0, (s / 20 - 0.1) / 0.4)) for s in range(20)]
        assert [e for e, _, _ in obj.seen] == [ri * EPS for ri in r]
        assert [k for _, k, _ in obj.seen] == [1.0 + ri * (kappa_end - 1.0) for ri in r]
        if beta:
            assert [b for _, _, b in obj.seen] == [1.0 - ri for ri in r]
        # epoch 1 (steps 4-7) lies inside the ramp: four different radii, not one per epoch
        assert len({e for e, _, _ in obj.seen[4:8]}) == 4
        assert obj.seen[2][0] == 0.0 and obj.seen[3][0] > 0.0 and obj.seen[10][0] == EPS


def test_paper_default_schedules() -> None:
    ibp, crown = IBPTraining(THREAT), CROWNIBP(THREAT)
    # Gowal et al. MNIST: 2k warm-up + 10k ramp steps of 60k, kappa 1 -> 0.5
    assert (ibp.warmup, ibp.ramp, ibp.kappa_start, ibp.kappa_end) == pytest.approx((2 / 60, 10 / 60, 1.0, 0.5))
    # Zhang et al.'s MNIST configuration: ramp over epochs 10-60 of 200, kappa 1 -> 0.5 (final-kappa), beta 1 -> 0
    assert (crown.warmup, crown.ramp, crown.kappa_start, crown.kappa_end, crown.beta_start, crown.beta_end) == (
        pytest.approx((0.05, 0.25, 1.0, 0.5, 1.0, 0.0))
    )
    # without a trainer's hook an objective sits at the end of its schedule
    assert ibp.eps == EPS and ibp.kappa == 0.5 and crown.beta == 0.0 and crown.kappa == 0.5
    # Gowal's 60k steps: warm for 2k steps, linear over the next 10k, then full eps
    r = [ramp_position(s, 60_000, 2 / 60, 10 / 60) for s in (0, 1999, 2000, 2001, 7000, 11_999, 12_000, 59_999)]
    assert r[:3] == [0.0, 0.0, 0.0] and 0 < r[3] < 1e-3 and r[4] == pytest.approx(0.5)
    assert r[5] == pytest.approx(1.0 - 1e-4) and r[6:] == [1.0, 1.0]
    assert ramp_position(3, 10, 0.3, 0.0) == 1.0 and ramp_position(2, 10, 0.3, 0.0) == 0.0
    for bad in ((10, 10), (-1, 10), (0, 0)):
        with pytest.raises(InputError, match="total_steps"):
            ramp_position(*bad, 0.1, 0.1)
    crown.step_start(150, 1000)
    assert crown.position == pytest.approx((0.15 - 0.05) / 0.25)


def test_schedule_known_to_collapse_warns_once() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults, and kappa_end = 0 with a paper-length ramp, are quiet
        for obj in (CROWNIBP(THREAT), IBPTraining(THREAT), CROWNIBP(THREAT, kappa_end=0.0)):
            obj.step_start(0, 60_000 if obj.kappa_end == 0 else 300)
            obj.step_start(1, 60_000 if obj.kappa_end == 0 else 300)
    # kappa_end = 0 with a short ramp (the MNIST run that collapsed: 236 ramp steps), or with no warm-up
    for obj, total in (
        (CROWNIBP(THREAT, kappa_end=0.0), 945),
        (IBPTraining(THREAT, kappa_end=0.0, ramp=0.01), 50_000),
        (CROWNIBP(THREAT, kappa_end=0.0, warmup=0.0), 60_000),
    ):
        with pytest.warns(CertifiedScheduleWarning, match="kappa_end=0"):
            obj.step_start(0, total)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            obj.step_start(1, total)  # once per objective and total
        assert (obj.eps == 0.0) if obj.warmup > 0 else (obj.eps > 0.0)  # the hook still set the schedule


def test_crown_ibp_defaults_do_not_collapse(digits: tuple[Dataset, Dataset]) -> None:
    # eps = 0.3 on digits, 10 epochs (230 steps): with kappa_end = 0 (the former default) the model ends as a constant
    # classifier, and the trainer's first step hook warns; with the defaults (kappa_end = 0.5) it keeps its classes.
    train_set, test_set = digits
    threat = LpBall("linf", 0.3)

    def fit(objective: CROWNIBP) -> torch.Tensor:
        model = _mlp()
        AdversarialTrainer(objective, epochs=10, batch_size=64, optimizer="adam", lr=5e-3, progress=False).fit(
            model, train_set
        )
        with torch.no_grad():
            return model(test_set.x).argmax(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = fit(CROWNIBP(threat))
    assert pred.unique().numel() == 10 and float((pred == test_set.y).float().mean()) >= 0.7
    with pytest.warns(CertifiedScheduleWarning):
        collapsed = fit(CROWNIBP(threat, kappa_end=0.0))
    assert float((collapsed == test_set.y).float().mean()) <= 0.3, "the documented collapse no longer happens"


# -- soundness of the bound trained on -----------------------------------------------------------------------------
def _sampled_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, k: int = 64) -> torch.Tensor:
    """Margins ``f_y - f_j`` (N, S, K) at random points and random vertices of the clipped box."""
    g = torch.Generator().manual_seed(1)
    n = x.shape[0]
    noise = torch.rand(k, *x.shape, generator=g) * 2 - 1
    noise[k // 2 :] = noise[k // 2 :].sign()  # vertices
    pts = (x.unsqueeze(0) + eps * noise).clamp(0, 1).reshape(-1, *x.shape[1:])
    with torch.no_grad():
        logits = model(pts).reshape(k, n, -1).transpose(0, 1)
    return logits.gather(2, y.view(n, 1, 1).expand(n, k, 1)) - logits


@pytest.mark.parametrize(
    "objective",
    [
        IBPTraining(THREAT),
        IBPTraining(THREAT, elide_last_layer=False),
        CROWNIBP(THREAT, beta_end=1.0),
        CROWNIBP(THREAT, beta_end=0.5),
    ],
    ids=["ibp", "ibp-no-elision", "crown-ibp", "crown-ibp-half"],
)
def test_trained_bound_is_sound(objective: IBPTraining | CROWNIBP, digits: tuple[Dataset, Dataset]) -> None:
    _, test_set = digits
    x, y = test_set.x[:40], test_set.y[:40]
    for model in (_mlp(seed=5, hidden=(32, 16)), _mlp(seed=6)):
        lb = objective.margin_lower_bounds(model, x, y)  # (N, K - 1)
        sampled = _sampled_margins(model, x, y, EPS)  # (N, S, K), 0 at the label
        keep = torch.ones(x.shape[0], 10, dtype=torch.bool)
        keep[torch.arange(x.shape[0]), y] = False
        worst_sampled = sampled.min(1).values[keep].reshape(x.shape[0], 9)
        assert bool((lb <= worst_sampled + 1e-5).all()), "a margin lower bound exceeds a sampled margin"
        # the worst-case logits bound the cross-entropy of every sampled point from above
        z_hat = worst_case_logits(lb.detach(), y)
        ce_hat = F.cross_entropy(z_hat, y, reduction="none")
        g = torch.Generator().manual_seed(2)
        pts = (x + EPS * (torch.rand(x.shape, generator=g) * 2 - 1).sign()).clamp(0, 1)
        with torch.no_grad():
            assert bool((F.cross_entropy(model(pts), y, reduction="none") <= ce_hat + 1e-5).all())


def test_zero_radius_bounds_are_the_clean_margins(digits: tuple[Dataset, Dataset]) -> None:
    # the warm-up (eps = 0) skips CROWN's backward pass: the IBP bound of a point box must then be exact
    _, test_set = digits
    x, y = test_set.x[:30], test_set.y[:30]
    model = _mlp(seed=4, hidden=(32, 16))
    with torch.no_grad():
        logits = model(x)
    exact = (logits.gather(1, y.view(-1, 1)) - logits)[torch.arange(10) != y.view(-1, 1)].reshape(30, 9)
    for objective in (IBPTraining(THREAT), CROWNIBP(THREAT, beta_end=0.5)):
        lb = objective.margin_lower_bounds(model, x, y, eps=0.0)
        torch.testing.assert_close(lb, exact, atol=1e-5, rtol=0)


def test_worst_case_logits_layout_and_elision_tightens() -> None:
    lb = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z = worst_case_logits(lb, torch.tensor([0, 2]))
    torch.testing.assert_close(z, torch.tensor([[0.0, -1.0, -2.0], [-3.0, -4.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 8, 8, generator=g), torch.arange(20) % 10
    model = _mlp(seed=3, hidden=(32, 16))
    elided = IBPTraining(THREAT).margin_lower_bounds(model, x, y)
    plain = IBPTraining(THREAT, elide_last_layer=False).margin_lower_bounds(model, x, y)
    assert bool((elided >= plain - 1e-5).all()) and bool((elided > plain + 1e-4).any())


# -- live network, gradients ------------------------------------------------------------------------------------------
def test_network_built_once_and_follows_the_optimiser() -> None:
    obj = IBPTraining(THREAT)
    model = _mlp(seed=1, hidden=(16,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.arange(8)
    net = obj.network(model, (1, 8, 8))
    before = obj.margin_lower_bounds(model, x, y).detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = obj(model, x, y)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    opt.step()
    assert obj.network(model, (1, 8, 8)) is net, "the live network must be reused across steps"
    after = obj.margin_lower_bounds(model, x, y).detach()
    assert not torch.allclose(before, after)
    assert obj(model, x, y) < loss, "one step on a batch must lower that batch's certified loss"
    assert obj.network(_mlp(seed=2, hidden=(16,)), (1, 8, 8)) is not net


# -- the point of it all ---------------------------------------------------------------------------------------------
def test_certified_training_raises_verified_accuracy(trained, digits: tuple[Dataset, Dataset]) -> None:
    _, test_set = digits
    ver = {k: verified_accuracy(m, test_set, THREAT, method="ibp") for k, (m, _) in trained.items()}
    clean = {k: accuracy(m, test_set) for k, (m, _) in trained.items()}
    # measured: standard ~2 %, IBP ~59 %, CROWN-IBP ~58 % IBP-verified (both κ 1 -> 0.5); clean accuracy stays ~96 %
    assert ver["standard"] <= 0.1, ver
    assert ver["ibp"] >= 0.4 and ver["crown-ibp"] >= 0.4, ver
    assert ver["ibp"] >= ver["standard"] + 0.3 and ver["crown-ibp"] >= ver["standard"] + 0.3, ver
    assert clean["ibp"] >= 0.85 and clean["crown-ibp"] >= 0.85, clean
    # after the ramp (full eps from step 50 % of training, epoch 6 of 12) the certified loss goes down
    for key in ("ibp", "crown-ibp"):
        losses = trained[key][1]
        assert losses[-1] < losses[5] - 0.1, (key, losses)


def test_verified_accuracy_matches_the_training_bound(trained, digits: tuple[Dataset, Dataset]) -> None:
    # certify() bounds a snapshot network through compute_bounds; the objective a live one through ibp_bounds
    _, test_set = digits
    model = trained["ibp"][0]
    x, y = test_set.x, test_set.y
    lb = IBPTraining(THREAT, elide_last_layer=False).margin_lower_bounds(model, x, y)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    expected = float((correct & (lb > 0).all(1)).float().mean())
    assert verified_accuracy(model, test_set, THREAT) == pytest.approx(expected)
    # CROWN certifies at least what IBP does here (tighter on a one-hidden-layer net)
    assert verified_accuracy(model, test_set, THREAT, method="crown") >= expected - 1e-9


# -- registry and bad input -----------------------------------------------------------------------------------------
def test_registry_and_bad_input() -> None:
    assert OBJECTIVES["ibp"][0] is IBPTraining and OBJECTIVES["crown-ibp"][0] is CROWNIBP
    obj = make_objective("crown_ibp", THREAT, beta_end=0.25, kappa_end=0.5)
    assert isinstance(obj, CROWNIBP) and obj.beta == 0.25 and obj.kappa == 0.5
    assert isinstance(make_objective("ibp", THREAT, warmup=0.0, ramp=0.5), IBPTraining)
    with pytest.raises(InputError, match="beta_end"):
        make_objective("ibp", THREAT, beta_end=0.0)
    with pytest.raises(InputError, match="linf"):
        IBPTraining(LpBall("l2", 1.0))
    with pytest.raises(InputError, match="eps"):
        CROWNIBP(LpBall("linf", float("inf")))
    with pytest.raises(InputError, match="kappa_end"):
        IBPTraining(THREAT, kappa_end=1.5)
    with pytest.raises(InputError, match="warmup"):
        CROWNIBP(THREAT, warmup=0.7, ramp=0.5)
    with pytest.raises(InputError, match="threat"):
        IBPTraining("linf")  # type: ignore[arg-type]
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    with pytest.raises(InputError, match="BatchNorm"):
        IBPTraining(THREAT)(bn, x, y)
    with pytest.raises(InputError, match=r"labels|y must"):
        IBPTraining(THREAT)(_mlp(), x, y.float())
    with pytest.raises(InputError, match="eps"):
        IBPTraining(THREAT).margin_lower_bounds(_mlp(), x, y, eps=-0.1)
    with pytest.raises(InputError, match="move the batch"):
        IBPTraining(THREAT).margin_lower_bounds(_mlp(), x.double(), y)
    # warm-up: no bound is computed and the loss is the clean cross-entropy, even for a BatchNorm network
    warm = IBPTraining(THREAT, warmup=0.5, ramp=0.5)
    warm.step_start(4, 10)
    assert warm.eps == 0.0 and warm.kappa == 1.0
    with pytest.raises(InputError, match="total_steps"):
        warm.step_start(10, 10)
    bn.eval()
    torch.testing.assert_close(warm(bn, x, y), F.cross_entropy(bn(x), y))
