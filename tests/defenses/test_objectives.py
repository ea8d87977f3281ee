"""Tests of the adversarial training objectives and their shared inner maximisation.

Each objective must lower its own loss and, on the digits data with a small MLP, raise the PGD robust accuracy
(measured with the library's PGD attack, a separate code path) clearly above standard training. The loop semantics
of Free-AT (replays, carried perturbation), Fast-AT (uniform start, step 1.25·eps) and N-FGSM (noise of 2·eps, no
projection onto the ball) are checked directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks import PGD
from bastion.data import Dataset, load_digits
from bastion.defenses.training import (
    FGSMAT,
    MART,
    NFGSM,
    OBJECTIVES,
    PGDAT,
    TRADES,
    AdversarialTrainer,
    FastAT,
    FreeAT,
    StandardObjective,
    kl_div_logits,
    make_objective,
    pgd_perturb,
)
from bastion.defenses.training.mart import boosted_ce
from bastion.errors import InputError
from bastion.models import build_model
from bastion.threat import LpBall

EPS = 0.1
THREAT = LpBall("linf", EPS)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    train_set, test_set = load_digits().train_test_split(test_fraction=0.25, seed=0)
    return train_set.subset(slice(0, 800)), test_set.subset(slice(0, 300))


def _fit(objective: object, data: Dataset, epochs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", data.feature_shape, 10, hidden=(64,))
    trainer = AdversarialTrainer(
        objective,  # type: ignore[arg-type]
        epochs=epochs,
        batch_size=50,
        optimizer="adam",
        lr=3e-3,
        seed=0,
        progress=False,
    )
    model.history = trainer.fit(model, data).history  # type: ignore[assignment]
    return model


def _robust_accuracy(model: nn.Module, data: Dataset) -> float:
    result = PGD(steps=20, rel_stepsize=0.125)(model, data.x, data.y, threat=THREAT, seed=1)
    return result.robust_accuracy(data.y)


@pytest.fixture(scope="module")
def standard_robust(digits: tuple[Dataset, Dataset]) -> float:
    train_set, test_set = digits
    model = _fit(StandardObjective(), train_set)
    return _robust_accuracy(model, test_set)


OBJECTIVE_CASES: list[tuple[str, Callable[[], object], int]] = [
    ("fgsm-at", lambda: FGSMAT(THREAT), 8),
    ("pgd-at", lambda: PGDAT(THREAT, steps=5), 8),
    # 16 epochs of budget = 4 passes of 4 replays: 16 forward/backward passes per sample, a third of PGD-5's 48
    ("free-at", lambda: FreeAT(THREAT, replays=4), 16),
    ("fast-at", lambda: FastAT(THREAT), 8),
    ("n-fgsm", lambda: NFGSM(THREAT), 8),
    ("trades", lambda: TRADES(THREAT, steps=5), 8),
    ("mart", lambda: MART(THREAT, steps=5), 8),
]


# ----------------------------------------------------------------------------------------------- robustness gain
@pytest.mark.parametrize(("name", "factory", "epochs"), OBJECTIVE_CASES, ids=[c[0] for c in OBJECTIVE_CASES])
def test_objective_lowers_its_loss_and_gains_robustness(
    name: str,
    factory: Callable[[], object],
    epochs: int,
    digits: tuple[Dataset, Dataset],
    standard_robust: float,
) -> None:
    train_set, test_set = digits
    model = _fit(factory(), train_set, epochs)
    losses = [m.loss for m in model.history]  # type: ignore[attr-defined]
    assert losses[-1] < 0.8 * losses[0], f"{name} did not lower its own loss: {losses}"
    robust = _robust_accuracy(model, test_set)
    # standard training holds 57 % under this PGD; the objectives reach 66-71 % with these settings
    assert robust >= standard_robust + 0.05, f"{name}: robust accuracy {robust:.3f} vs standard {standard_robust:.3f}"


# ----------------------------------------------------------------------------------------------- inner maximisation
class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_pgd_perturb_stays_in_the_ball_raises_the_loss_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = _BNNet().train()
    x, y = torch.rand(16, 6), torch.randint(0, 3, (16,))
    stats = model.body[2].running_mean.clone()
    for norm, eps in (("linf", 0.1), ("l2", 0.5), ("l1", 1.0)):
        threat = LpBall(norm, eps)
        x_adv = pgd_perturb(
            model, x, y, threat, steps=10, step_size=eps / 4, generator=torch.Generator().manual_seed(0)
        )
        assert bool(threat.contains(x_adv, x).all())
        assert not x_adv.requires_grad
        with torch.no_grad():
            model.eval()
            before = F.cross_entropy(model(x), y, reduction="none")
            after = F.cross_entropy(model(x_adv), y, reduction="none")
            model.train()
        assert float(after.mean()) > float(before.mean())
    # eval mode inside (documented): BatchNorm statistics untouched, training flags restored, no parameter grads
    assert torch.equal(model.body[2].running_mean, stats)
    assert int(model.body[2].num_batches_tracked) == 0
    assert model.training and model.body[4].training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_perturb_custom_loss_start_and_validation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.rand(8, 4) * 0.5 + 0.25, torch.randint(0, 3, (8,))
    # maximising a loss that only rewards moving coordinate 0 up ends at x_0 + eps exactly
    x_adv = pgd_perturb(
        model, x, y, THREAT, steps=3, step_size=0.05, random_start=False, loss=lambda logits: logits.sum(1) * 0
    )
    assert torch.equal(x_adv, x)  # zero gradient -> sign 0 -> no move
    start = x + 0.05
    out = pgd_perturb(model, x, y, THREAT, steps=0, step_size=0.1, start=start + 1.0)
    assert torch.allclose(out, (x + EPS).clamp(0, 1))  # the start is projected onto the ball first
    with pytest.raises(InputError, match="steps"):
        pgd_perturb(model, x, y, THREAT, steps=-1, step_size=0.1)
    with pytest.raises(InputError, match="step_size"):
        pgd_perturb(model, x, y, THREAT, steps=1, step_size=0.0)
    with pytest.raises(InputError, match="labels"):
        pgd_perturb(model, x, y[:3], THREAT, steps=1, step_size=0.1)
    with pytest.raises(InputError, match="one value per sample"):
        pgd_perturb(model, x, y, THREAT, steps=1, step_size=0.1, loss=lambda logits: logits.sum())
    with pytest.raises(InputError, match="start"):
        pgd_perturb(model, x, y, THREAT, steps=1, step_size=0.1, start=x[:2])


# ----------------------------------------------------------------------------------------------- FGSM-AT
def test_fgsm_at_is_the_paper_mixture_of_clean_and_sign_step_losses() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.rand(10, 5) * 0.6 + 0.2, torch.randint(0, 3, (10,))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    x_fgsm = x + 0.1 * g.sign()
    want = 0.5 * F.cross_entropy(model(x), y) + 0.5 * F.cross_entropy(model(x_fgsm), y)
    assert torch.allclose(FGSMAT(LpBall("linf", 0.1))(model, x, y), want)
    want_clean = F.cross_entropy(model(x), y)
    assert torch.allclose(FGSMAT(LpBall("linf", 0.1), alpha=1.0)(model, x, y), want_clean)


# ----------------------------------------------------------------------------------------------- Fast-AT
class _Recorder(nn.Module):
    """Wraps a model and keeps every input it sees in training mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(x.detach().clone())
        return self.inner(x)


def test_fast_at_random_start_and_step_of_1_25_eps() -> None:
    torch.manual_seed(0)
    model = _Recorder(nn.Sequential(nn.Linear(20, 4)))
    x = torch.rand(200, 20) * 0.2 + 0.4  # far from the domain bounds: no clipping by the box
    y = torch.randint(0, 4, (200,))
    objective = FastAT(THREAT)
    assert objective.step_size == pytest.approx(1.25 * EPS)
    with torch.random.fork_rng():
        torch.manual_seed(123)
        loss = objective(model, x, y)
    (trained_on,) = model.seen
    # replay the algorithm independently: delta0 ~ U(-eps, eps), one sign step of 1.25 eps, clip to the ball
    with torch.random.fork_rng():
        torch.manual_seed(123)
        delta0 = (2 * torch.rand(x.shape) - 1) * EPS
    start = (x + delta0).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.inner(start), y, reduction="sum"), start)
    expected = torch.clamp(x + delta0 + 1.25 * EPS * g.sign(), x - EPS, x + EPS)
    assert torch.allclose(trained_on, expected, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(model.inner(expected), y))
    # the uniform start leaves a point strictly inside the ball exactly where delta0·sign(g) < -0.25 eps:
    # probability 3/8 per coordinate, while FGSM from x (or with a step >= 2 eps) puts every coordinate on the sphere
    inside = ((trained_on - x).abs() < EPS - 1e-6).float().mean()
    assert abs(float(inside) - 0.375) < 0.03


def test_n_fgsm_noise_of_two_eps_one_step_of_eps_and_no_projection_onto_the_ball() -> None:
    torch.manual_seed(0)
    model = _Recorder(nn.Sequential(nn.Linear(20, 4)))
    x = torch.rand(300, 20) * 0.2 + 0.4  # at least 0.4 from the domain bounds: 3·eps = 0.3 never reaches them
    y = torch.randint(0, 4, (300,))
    objective = NFGSM(THREAT)
    assert objective.step_size == pytest.approx(EPS)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        loss = objective(model, x, y)
    (trained_on,) = model.seen
    # replay de Jorge et al.'s algorithm 1 independently: eta ~ U(-2 eps, 2 eps), one sign step of eps, no clipping
    with torch.random.fork_rng():
        torch.manual_seed(7)
        eta = (2 * torch.rand(x.shape) - 1) * 2 * EPS
    start = (x + eta).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model.inner(start), y, reduction="sum"), start)
    expected = x + eta + EPS * g.sign()
    assert torch.allclose(trained_on, expected, atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(model.inner(expected), y))
    # |eta + eps·s| > eps for a uniform eta in (-2 eps, 2 eps) with probability 1/2; it never exceeds 3 eps
    delta = (trained_on - x).abs()
    assert abs(float((delta > EPS + 1e-6).float().mean()) - 0.5) < 0.03
    assert float(delta.max()) <= 3 * EPS + 1e-6


def test_n_fgsm_stays_in_the_domain_and_refuses_other_norms() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    x_adv = NFGSM(LpBall("linf", 0.3)).perturb(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, y)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    with pytest.raises(InputError, match="linf"):
        NFGSM(LpBall("l2", 1.0))
    with pytest.raises(InputError, match="step_ratio"):
        NFGSM(THREAT, step_ratio=0)
    assert isinstance(make_objective("n-fgsm", THREAT), NFGSM)


# ----------------------------------------------------------------------------------------------- Free-AT
def test_free_at_replays_each_batch_and_carries_its_perturbation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = _Recorder(net)
    data = Dataset(torch.rand(20, 1, 8, 8), torch.randint(0, 10, (20,)), num_classes=10, name="rand")
    objective = FreeAT(THREAT, replays=3)
    trainer = AdversarialTrainer(objective, epochs=6, batch_size=10, optimizer="sgd", lr=0.01, progress=False)
    assert trainer.passes == 2  # 6 epochs of budget / 3 replays
    result = trainer.fit(model, data)
    assert len(result.history) == 2
    # one training-mode forward pass per replay: 2 passes x 2 batches x 3 replays
    assert len(model.seen) == 12
    # the same minibatch is replayed 3 times in a row: the clean images underneath are identical
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    first_batch = data.x[order[:10]]
    for k in range(3):
        assert bool(((model.seen[k] - first_batch).abs() <= EPS + 1e-6).all())
    # the very first replay is unperturbed (delta starts at 0); later replays are not
    assert torch.equal(model.seen[0], first_batch)
    assert not torch.equal(model.seen[1], first_batch)


def test_free_at_update_rule_and_state() -> None:
    torch.manual_seed(0)
    model = _Recorder(nn.Sequential(nn.Linear(6, 3)))
    x1, y1 = torch.rand(4, 6) * 0.5 + 0.25, torch.randint(0, 3, (4,))
    x2, y2 = torch.rand(4, 6) * 0.5 + 0.25, torch.randint(0, 3, (4,))
    objective = FreeAT(THREAT, replays=2)
    objective(model, x1, y1).backward()
    leaf_grad = torch.autograd.grad(F.cross_entropy(model.inner(x1.requires_grad_(True)), y1), x1)[0]
    x1 = x1.detach()
    objective(model, x1, y1)  # replay: delta = eps * sign(grad at x1 + 0)
    assert torch.allclose(model.seen[1], x1 + EPS * leaf_grad.sign())
    # the perturbation is carried to the next minibatch (not reset): x2 + delta, clipped to x2's ball
    state = objective.state_dict()  # (no backward since the last call: nothing pending)
    objective(model, x2, y2)
    assert torch.allclose(model.seen[2], (x2 + state["delta"]).clamp(0, 1))
    clone = FreeAT(THREAT, replays=2)
    clone.load_state_dict(state)
    assert torch.equal(clone.delta, state["delta"])
    with pytest.raises(InputError, match="shape"):
        objective(model, torch.rand(4, 7), y2)


# ----------------------------------------------------------------------------------------------- TRADES / MART
def test_trades_loss_is_ce_plus_beta_kl_at_a_kl_maximiser() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(12, 5) * 0.6 + 0.2, torch.randint(0, 3, (12,))
    objective = TRADES(THREAT, beta=6.0, steps=10)
    assert objective.step_size == pytest.approx(0.007 / 0.031 * EPS)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        loss = objective(model, x, y)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        x_adv = objective.perturb(model, x, y)
    assert bool(THREAT.contains(x_adv, x).all())
    want = F.cross_entropy(model(x), y) + 6.0 * kl_div_logits(model(x), model(x_adv)).mean()
    assert torch.allclose(loss, want)
    # the inner maximiser finds a much larger KL than the Gaussian start and than random points of the ball
    with torch.no_grad():
        kl_adv = kl_div_logits(model(x), model(x_adv)).mean()
        kl_rand = kl_div_logits(model(x), model(THREAT.random_start(x))).mean()
    assert float(kl_adv) > 3 * float(kl_rand)


def test_kl_div_logits_matches_the_definition() -> None:
    p_logits, q_logits = torch.randn(6, 4), torch.randn(6, 4)
    p, q = p_logits.softmax(1), q_logits.softmax(1)
    assert torch.allclose(kl_div_logits(p_logits, q_logits), (p * (p / q).log()).sum(1), atol=1e-6)
    assert torch.allclose(kl_div_logits(p_logits, p_logits), torch.zeros(6), atol=1e-6)


def test_mart_boosted_ce_and_loss_closed_form() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    p = logits.softmax(1)
    want = torch.stack(
        [-(p[0, 0].log()) - (1 - p[0, 1]).log(), -(p[1, 0].log()) - (1 - p[1, 1]).log()]
    )  # strongest wrong class: 1 in both rows
    assert torch.allclose(boosted_ce(logits, y), want)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, yy = torch.rand(7, 5) * 0.6 + 0.2, torch.randint(0, 3, (7,))
    objective = MART(THREAT, lam=6.0, steps=3)
    with torch.random.fork_rng():
        torch.manual_seed(9)
        loss = objective(model, x, yy)
    with torch.random.fork_rng():
        torch.manual_seed(9)
        start = x + 0.001 * torch.randn_like(x)
        x_adv = pgd_perturb(model, x, yy, THREAT, steps=3, step_size=objective.step_size, start=start)
    lo, la = model(x), model(x_adv)
    p_true = lo.softmax(1).gather(1, yy[:, None]).squeeze(1)
    want_loss = boosted_ce(la, yy).mean() + 6.0 * (kl_div_logits(lo, la) * (1 - p_true)).mean()
    assert torch.allclose(loss, want_loss)
    assert objective.step_size == pytest.approx(2.5 * EPS / 3)


# ----------------------------------------------------------------------------------------------- construction
def test_defaults_follow_the_papers() -> None:
    mnist = LpBall("linf", 0.3)
    pgd = PGDAT(mnist)
    # Madry et al.'s 40 steps and random start, with the library's one step rule (2.5·eps/steps, not their 0.01)
    assert (pgd.steps, pgd.step_size, pgd.random_start) == (40, pytest.approx(2.5 * 0.3 / 40), True)
    trades = TRADES(LpBall("linf", 0.031))
    assert (trades.beta, trades.steps, trades.step_size, trades.init_std) == (6.0, 10, 0.007, 0.001)
    mart = MART(LpBall("linf", 8 / 255))
    assert (mart.lam, mart.steps) == (6.0, 10) and math.isclose(mart.step_size, 2 / 255)
    assert FGSMAT(mnist).alpha == 0.5
    assert FastAT(mnist).step_size == pytest.approx(0.375)
    assert FreeAT(mnist).replays == 8


def test_bad_objective_arguments_are_input_errors() -> None:
    with pytest.raises(InputError, match="LpBall"):
        PGDAT("linf")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="finite eps"):
        TRADES(LpBall("linf", 0.0))
    with pytest.raises(InputError, match="l0"):
        MART(LpBall("l0", 3))
    with pytest.raises(InputError, match="alpha"):
        FGSMAT(THREAT, alpha=1.5)
    with pytest.raises(InputError, match="replays"):
        FreeAT(THREAT, replays=0)
    with pytest.raises(InputError, match="steps"):
        PGDAT(THREAT, steps=0)
    with pytest.raises(InputError, match="unknown objective"):
        make_objective("pgd", THREAT)
    with pytest.raises(InputError, match="no option 'beta'"):
        make_objective("pgd-at", THREAT, beta=2)
    assert isinstance(make_objective("trades", THREAT, beta=1.0), TRADES)
    assert set(OBJECTIVES) >= {"standard", "fgsm-at", "pgd-at", "free-at", "fast-at", "trades", "mart"}
