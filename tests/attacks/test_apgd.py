"""APGD, APGD-DLR and APGD-T (Croce & Hein, ICML 2020): contract, strength against PGD, schedule, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks import ATTACKS, PGD, Attack, make_attack
from bastion.attacks.apgd import APGD, APGDT, apgd_checkpoints
from bastion.errors import InputError
from bastion.threat import LpBall


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


THREATS = [LpBall("linf", 0.1), LpBall("l2", 1.0), LpBall("l1", 4.0)]
CASES = [(APGD(loss=loss), t) for t in THREATS for loss in ("ce", "dlr")] + [
    (APGDT(steps=20, n_target_classes=3), t) for t in THREATS
]


@pytest.mark.parametrize("attack,threat", CASES, ids=[f"{a!r}-{t.key}" for a, t in CASES])
def test_attack_contract(digits_model, attack: Attack, threat: LpBall) -> None:
    model, x, y = digits_model
    res = attack(model, x, y, threat=threat)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(threat.contains(res.x_adv, x).all())  # inside the ball and the domain, every sample
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
        clean = model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert bool((res.distance[res.success] <= threat.eps * (1 + 1e-5) + 1e-6).all())
    assert res.success_rate > float((clean != y).float().mean()) + 0.3
    # the budget: at most `steps` gradients per sample, run and target class
    n_targets = getattr(attack, "n_target_classes", 1)
    assert 0 < res.grad_calls <= attack.steps * attack.restarts * n_targets * x.shape[0]  # type: ignore[attr-defined]


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("threat", [LpBall("linf", 0.1), LpBall("l2", 0.5), LpBall("l2", 1.0)], ids=lambda t: t.key)
def test_apgd_at_least_as_strong_as_pgd_with_the_same_gradients(digits_model, threat, loss, steps) -> None:
    model, x, y = digits_model
    apgd = APGD(steps=steps, loss=loss)(model, x, y, threat=threat, seed=0)
    # PGD with its default step (eps/30) and with Madry et al.'s 2.5·eps/steps, same loss, gradients and seed
    for rel in (0.01 / 0.3, 2.5 / steps):
        pgd = PGD(steps=steps, rel_stepsize=rel, loss=loss)(model, x, y, threat=threat, seed=0)
        assert apgd.robust_accuracy(y) <= pgd.robust_accuracy(y), f"PGD(rel_stepsize={rel})"
    assert apgd.grad_calls <= steps * x.shape[0]


@pytest.mark.parametrize("threat", [LpBall("linf", 0.05), LpBall("l2", 0.5)], ids=lambda t: t.key)
def test_apgd_t_at_least_as_strong_as_apgd_ce(digits_model, threat: LpBall) -> None:
    model, x, y = digits_model
    ce = APGD(steps=20)(model, x, y, threat=threat)
    t = APGDT(steps=20)(model, x, y, threat=threat)
    assert 0.3 < t.robust_accuracy(y) <= ce.robust_accuracy(y)  # a small eps: not everything breaks


@pytest.mark.parametrize("attack", [APGD(steps=50), APGD(steps=50, loss="dlr"), APGDT(steps=50)], ids=repr)
def test_targeted_mode_reaches_the_targets(digits_model, attack: Attack) -> None:
    model, x, y = digits_model
    targets = (y + 1) % 10
    res = attack(model, x, y, threat=LpBall("linf", 0.4), targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    assert res.grad_calls <= 50 * x.shape[0]  # explicit targets: one target, not n_target_classes


RESTARTS = [
    (APGD(steps=3, restarts=1), APGD(steps=3, restarts=3)),
    (APGDT(steps=3, restarts=1, n_target_classes=2), APGDT(steps=3, restarts=3, n_target_classes=2)),
]


@pytest.mark.parametrize("single,multi", RESTARTS, ids=lambda a: repr(a))
def test_restarts_never_make_it_weaker(digits_model, single: APGD, multi: APGD) -> None:
    model, x, y = digits_model
    threat = LpBall("l1", 2.0)  # few steps at a radius where random starts matter
    one = single(model, x, y, threat=threat, seed=3)
    three = multi(model, x, y, threat=threat, seed=3)
    assert bool((three.success | ~one.success).all())  # every sample broken once is still broken
    assert int(three.success.sum()) > int(one.success.sum())  # and the extra runs found more


def test_checkpoints_follow_the_paper_formula() -> None:
    def formula(steps: int) -> list[int]:
        p = [0.0, 0.22]
        while True:
            nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
            if nxt > 1 + 1e-9:
                break
            p.append(nxt)
        return sorted({math.ceil(round(q * steps, 6)) for q in p})

    assert apgd_checkpoints(100)[:4] == [0, 22, 41, 57]
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 5, 10, 20, 37, 50, 100, 250, 1000):
        assert apgd_checkpoints(steps) == formula(steps), steps
    assert apgd_checkpoints(1000)[:3] == [0, 220, 410]


def _linear_binary(dim: int) -> nn.Linear:
    """Two classes, class 0 far ahead: no input near the data is misclassified, so APGD only maximises the loss."""
    torch.manual_seed(1)
    lin = nn.Linear(dim, 2).double()
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.copy_(torch.tensor([20.0, 0.0]))  # a margin of ~20 ± 8: never flipped, CE not rounded to 0
    return lin


@pytest.mark.parametrize("threat", [LpBall("linf", 0.1), LpBall("l2", 0.3), LpBall("l1", 0.3)], ids=lambda t: t.key)
def test_apgd_finds_the_loss_maximum_on_a_linear_model(threat: LpBall) -> None:
    # CE on a two-class linear model grows with the margin w·δ (w = w_1 - w_0), whose maximum over the ball (box
    # inactive: x in [0.3, 0.7]) is eps·||w||_dual; APGD must return that point for every sample, not its last one.
    model = _linear_binary(16)
    x = 0.3 + 0.4 * torch.rand(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)
    res = APGD(steps=100)(model, x, y, threat=threat, seed=0)
    assert not bool(res.success.any())
    w = model.weight[1] - model.weight[0]
    dual = {"linf": w.abs().sum(), "l2": w.norm(), "l1": w.abs().max()}[threat.norm]
    with torch.no_grad():
        gain = (res.x_adv - x) @ w
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        adv_loss = F.cross_entropy(model(res.x_adv), y, reduction="none")
    torch.testing.assert_close(gain, (threat.eps * dual).expand(6).detach(), rtol=1e-3, atol=1e-6)
    assert bool((adv_loss > clean_loss).all())


class _Bump(nn.Module):
    """Two classes; the CE loss of class 0, ``softplus(-||x - centre||²)``, peaks at ``centre``; never misclassified."""

    centre: torch.Tensor

    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = ((x.flatten(1) - self.centre) ** 2).sum(1)
        return torch.stack([torch.zeros_like(d), -d], 1)


# l1: a step moves a quarter of the 16 coordinates (with the default 1 %, one coordinate per step, 100 steps are
# too few to settle on a point whose 16 coordinates all differ from the start)
BUMP_THREATS = [LpBall("linf", 0.1), LpBall("l2", 0.3), LpBall("l1", 0.5, l1_sparsity=0.25)]


@pytest.mark.parametrize("threat", BUMP_THREATS, ids=lambda t: t.key)
def test_step_halving_converges_to_an_interior_maximum_and_the_best_point_is_kept(threat: LpBall) -> None:
    # The loss peaks inside the ball. A constant step of 2·eps (eps for l1) would keep jumping around the peak; the
    # halving schedule shrinks the step, so APGD must end within a small fraction of eps of it. And whatever the
    # iterates did, the returned point must have the highest loss of every point the attack evaluated.
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.1 * torch.rand(8, 16, generator=g, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    u = torch.rand(8, 16, generator=g, dtype=torch.float64) * 2 - 1
    centre = x + 0.6 * threat.eps * u / threat.distance(u, torch.zeros_like(u))[:, None]
    model = _Bump(centre)
    losses: list[torch.Tensor] = []
    model.register_forward_hook(lambda m, i, out: losses.append(F.cross_entropy(out, y, reduction="none").detach()))
    res = APGD(steps=100)(model, x, y, threat=threat, seed=0)
    assert not bool(res.success.any())  # rows of every forward pass are the 8 samples, in order
    assert bool((threat.distance(res.x_adv, centre) <= threat.eps / 10).all())
    evaluated = torch.stack(losses[1:-1]).amax(dim=0)  # every iterate (not the clean pass, not the re-check)
    assert bool((losses[-1] >= evaluated).all())


def test_apgd_t_needs_four_classes_and_caps_the_number_of_targets() -> None:
    torch.manual_seed(0)
    three = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(InputError, match="4 classes"):
        APGDT(steps=2)(three, x, y, threat=LpBall("linf", 0.1))
    # APGD-T without explicit targets: success means any misclassification, whatever the target tried
    four = nn.Sequential(nn.Linear(4, 4))
    res = APGDT(steps=5, n_target_classes=20)(four, x, y, threat=LpBall("linf", 1.0))
    with torch.no_grad():
        torch.testing.assert_close(res.success, four(res.x_adv).argmax(1) != y)
    assert res.grad_calls <= 3 * 5 * x.shape[0]  # n_target_classes is capped at K - 1 = 3


def test_bad_hyperparameters_are_named() -> None:
    for bad in (0.0, 1.0, 1.5, -0.2, float("nan"), "0.5", True):
        with pytest.raises(InputError, match="rho"):
            APGD(rho=bad)  # type: ignore[arg-type]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(InputError, match="alpha"):
            APGD(alpha=bad)
    for steps in (0, -3, 2.5):
        with pytest.raises(InputError, match="steps"):
            APGD(steps=steps)  # type: ignore[arg-type]
    for loss in ("cw", "mse", None):
        with pytest.raises(InputError, match="loss"):
            APGD(loss=loss)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="restarts"):
        APGD(restarts=0)
    with pytest.raises(InputError, match="n_target_classes"):
        APGDT(n_target_classes=0)
    model = nn.Linear(3, 3)
    x = torch.rand(2, 3)
    y = model(x).argmax(1).detach()  # correctly classified, so the attack does run
    with pytest.raises(InputError, match="infinite"):
        APGD(steps=2)(model, x, y, threat=LpBall("l2", math.inf))
    with pytest.raises(InputError, match="supports the norms"):
        APGD(steps=2)(model, x, y, threat=LpBall("l0", 1))


def test_registered_with_paper_defaults() -> None:
    assert ATTACKS["apgd"] is APGD and ATTACKS["apgd-t"] is APGDT
    a = make_attack("apgd", loss="dlr")
    assert isinstance(a, APGD) and a.options() == {
        "steps": 100,
        "restarts": 1,
        "loss": "dlr",
        "rho": 0.75,
        "alpha": 0.75,
    }
    t = make_attack("apgd-t")
    assert isinstance(t, APGDT) and (t.steps, t.restarts, t.n_target_classes, t.loss) == (100, 1, 9, "dlr")
    assert APGD().initial_step(LpBall("linf", 0.1)) == pytest.approx(0.2)
    assert APGD().initial_step(LpBall("l2", 0.5)) == pytest.approx(1.0)
    assert APGD().initial_step(LpBall("l1", 4.0)) == pytest.approx(4.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.key)
def test_apgd_runs_on_cuda(digits_model, threat: LpBall) -> None:
    model, x, y = digits_model
    gpu = model.to("cuda")
    try:
        for attack in (APGD(steps=10, restarts=2), APGD(steps=10, loss="dlr"), APGDT(steps=5)):
            res = attack(gpu, x, y, threat=threat)
            assert res.x_adv.device.type == "cuda"
            assert bool(threat.contains(res.x_adv, x.cuda()).all())
            with torch.no_grad():
                torch.testing.assert_close(res.success, gpu(res.x_adv).argmax(1) != y.cuda())
    finally:
        model.to("cpu")


# ------------------------------------------------------------------------------------- batched targets
def _float64(model: nn.Module) -> nn.Module:
    """A float64 copy: batch size then cannot change a row's result by float rounding, so rows are comparable."""
    import copy

    return copy.deepcopy(model).double().eval()


BATCHED_CASES = [
    (LpBall("l2", 0.4), 1, 4096),
    (LpBall("l2", 0.6), 1, 4096),
    (LpBall("l2", 0.6), 2, 4096),  # restarts
    (LpBall("l2", 0.6), 1, 35),  # memory-bounded chunks (7 samples × 5 targets)
    (LpBall("linf", 0.04), 1, 35),
]


@pytest.mark.parametrize("threat,restarts,max_rows", BATCHED_CASES, ids=lambda v: getattr(v, "key", str(v)))
def test_batched_targets_break_the_same_samples_as_the_sequential_order(digits_model, threat, restarts, max_rows):
    model, x, y = digits_model
    model, x = _float64(model), x[:96].double()
    y = y[:96]
    opts = {"steps": 5, "n_target_classes": 5, "restarts": restarts}
    seq = APGDT(batch_targets=False, **opts)(model, x, y, threat=threat, seed=3)
    bat = APGDT(batch_targets=True, max_rows=max_rows, **opts)(model, x, y, threat=threat, seed=3)
    torch.testing.assert_close(bat.success, seq.success)
    # not a vacuous comparison: some samples resist, and some are broken only by a later target (which the
    # batched mode must therefore have run, from the same start, on the same rows)
    assert 0 < int(seq.success.sum()) < x.shape[0]
    if threat.norm == "l2":  # on this model, later targets break more points at these l2 radii
        first = APGDT(batch_targets=False, **{**opts, "n_target_classes": 1})(model, x, y, threat=threat, seed=3)
        assert int(seq.success.sum()) > int(first.success.sum())
    assert bool(threat.contains(bat.x_adv, x).all())


def test_batched_targets_stop_every_row_of_a_broken_sample(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.1)
    res = APGDT(steps=50, n_target_classes=9)(model, x, y, threat=threat, seed=0)
    broken = int(res.success.sum())
    assert broken > 0.3 * x.shape[0]
    # a sample that survives every target costs 9 × 50 gradients; a broken one leaves with all its rows, early
    assert res.grad_calls < 9 * 50 * (x.shape[0] - broken) + 0.5 * 9 * 50 * broken
    # and the clean logits come from the frame: clean forward + gradient steps' forwards + last forwards + check
    assert res.model_calls <= x.shape[0] * (1 + 9 * 51 + 1)


def test_batched_targets_option_is_checked() -> None:
    with pytest.raises(InputError, match="batch_targets"):
        APGDT(batch_targets=1)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_rows"):
        APGDT(max_rows=0)
