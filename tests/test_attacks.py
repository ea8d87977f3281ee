"""Table-driven attack tests on tiny models: inside the threat set, success re-verified, stronger than baselines."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bastion.attacks import ATTACKS, BIM, FGSM, PGD, Attack, make_attack
from bastion.data import Dataset
from bastion.errors import BastionWarning, InputError, ModelError
from bastion.threat import FlowThreat, LpBall, ThreatModel


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


CASES = [
    (FGSM(), LpBall("linf", 0.15)),
    (FGSM(), LpBall("l2", 1.5)),
    (FGSM(), LpBall("l1", 6.0)),
    (BIM(), LpBall("linf", 0.15)),
    (BIM(), LpBall("l2", 1.5)),
    (PGD(steps=20), LpBall("linf", 0.15)),
    (PGD(steps=20), LpBall("l2", 1.5)),
    (PGD(steps=30), LpBall("l1", 6.0)),
    (PGD(steps=20, loss="cw", schedule="cosine"), LpBall("linf", 0.15)),
    (PGD(steps=20, loss="dlr", restarts=2), LpBall("l2", 1.5)),
]


@pytest.mark.parametrize("attack,threat", CASES, ids=[f"{a!r}-{t.key}" for a, t in CASES])
def test_attack_contract(digits_model, attack: Attack, threat: LpBall) -> None:
    model, x, y = digits_model
    res = attack(model, x, y, threat=threat)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    # inside the threat set and the domain, for every sample (successful or not)
    assert bool(threat.contains(res.x_adv, x).all())
    # success re-verified independently by prediction
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    clean = model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    torch.testing.assert_close(res.clean_pred, clean)
    # distances: finite exactly where successful, within eps, 0 for clean misclassifications
    assert bool(torch.isinf(res.distance[~res.success]).all())
    assert bool((res.distance[res.success] <= threat.eps * (1 + 1e-5) + 1e-6).all())
    assert bool((res.distance[clean != y] == 0).all())
    # the attack does something on a model where that is possible
    assert res.success_rate > float((clean != y).float().mean()) + 0.1
    assert res.model_calls >= x.shape[0] and res.seconds > 0


@pytest.mark.parametrize("threat", [LpBall("linf", 0.1), LpBall("l2", 1.0), LpBall("l1", 4.0)], ids=lambda t: t.key)
def test_pgd_at_least_as_strong_as_fgsm(digits_model, threat: LpBall) -> None:
    model, x, y = digits_model
    fgsm = FGSM()(model, x, y, threat=threat)
    pgd = PGD(steps=40)(model, x, y, threat=threat)
    assert pgd.robust_accuracy(y) <= fgsm.robust_accuracy(y)
    bim = BIM()(model, x, y, threat=threat)
    assert bim.robust_accuracy(y) <= fgsm.robust_accuracy(y)


def test_restarts_never_make_it_weaker(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.08)
    one = PGD(steps=10, restarts=1)(model, x, y, threat=threat, seed=3)
    three = PGD(steps=10, restarts=3)(model, x, y, threat=threat, seed=3)
    assert bool((three.success | ~one.success).all())  # every sample broken once is still broken
    assert int(three.success.sum()) >= int(one.success.sum())


def test_early_stop_changes_cost_not_result(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.1)
    fast = PGD(steps=30, random_start=False)(model, x, y, threat=threat)
    full = PGD(steps=30, random_start=False, early_stop=False)(model, x, y, threat=threat)
    torch.testing.assert_close(fast.success, full.success)
    assert fast.grad_calls < full.grad_calls


@pytest.mark.parametrize("attack", [PGD(steps=50), BIM()], ids=repr)
def test_targeted_mode_reaches_the_targets(digits_model, attack: Attack) -> None:
    model, x, y = digits_model
    targets = (y + 1) % 10
    res = attack(model, x, y, threat=LpBall("linf", 0.4), targets=targets)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred == targets)
    assert res.success_rate >= 0.9
    # a weaker untargeted criterion is met more often than the targeted one at small eps
    small = LpBall("linf", 0.05)
    tgt = attack(model, x, y, threat=small, targets=targets)
    unt = attack(model, x, y, threat=small)
    assert tgt.success_rate <= unt.success_rate


def _linear_model(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


@pytest.mark.parametrize("norm,dual", [("linf", 1.0), ("l2", 2.0)])
def test_fgsm_is_exact_on_a_linear_binary_classifier(norm: str, dual: float) -> None:
    # On f(x) = Wx + b with two classes and no active box, one steepest-ascent step of length eps is optimal:
    # the attack succeeds exactly when the margin is below eps times the dual norm of w_other - w_label.
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(2, 20, generator=g, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    model = _linear_model(w, b)
    x = torch.rand(400, 20, generator=g, dtype=torch.float64) * 0.2 + 0.4
    y = model(x).argmax(dim=1).detach()
    logits = model(x).detach()
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)
    wd = (w[1] - w[0]).norm(p=dual)
    eps = float(margin.median() / wd)  # about half of the samples can be broken
    threat = LpBall(norm, eps, domain=(-100.0, 100.0))
    res = FGSM()(model, x, y, threat=threat)
    expected = margin < eps * wd
    clear = (margin - eps * wd).abs() > 1e-9  # away from exact ties
    torch.testing.assert_close(res.success[clear], expected[clear])
    assert 0.1 < float(expected.double().mean()) < 0.9  # the test is not trivial


@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("norm,dual", [("linf", 1.0), ("l2", 2.0)])
def test_pgd_with_few_steps_reaches_the_boundary(steps: int, norm: str, dual: float) -> None:
    """The default step travels 2.5 radii whatever ``steps``: on a linear model PGD ends on the sphere, exactly
    as strong as the optimal one-step attack (the old fixed step of eps/30 travelled only steps/30 of the radius)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(2, 20, generator=g, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    model = _linear_model(w, b)
    x = torch.rand(400, 20, generator=g, dtype=torch.float64) * 0.2 + 0.4
    logits = model(x).detach()
    y = logits.argmax(dim=1)
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)
    wd = (w[1] - w[0]).norm(p=dual)
    eps = float(margin.median() / wd)
    threat = LpBall(norm, eps, domain=(-100.0, 100.0))
    res = PGD(steps=steps, random_start=False, early_stop=False)(model, x, y, threat=threat)
    dist = threat.distance(res.x_adv, x)
    failed = ~res.success
    torch.testing.assert_close(dist[failed], torch.full_like(dist[failed], eps))  # on the boundary
    expected = margin < eps * wd
    clear = (margin - eps * wd).abs() > 1e-9
    torch.testing.assert_close(res.success[clear], expected[clear])


def test_one_pgd_step_rule_for_attack_training_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD, PGD-AT, MART and the trainer's validation all take ``pgd_step_size``: 2.5·eps/steps."""
    from bastion.defenses.training import MART, PGDAT, AdversarialTrainer
    from bastion.defenses.training import trainer as trainer_module
    from bastion.threat import pgd_step_size

    threat = LpBall("linf", 0.3)
    for steps in (1, 7, 40):
        assert pgd_step_size(0.3, steps) == pytest.approx(2.5 * 0.3 / steps)
        assert PGD(steps=steps).iterations(threat) == (steps, pgd_step_size(0.3, steps))
        assert PGDAT(threat, steps=steps).step_size == pgd_step_size(0.3, steps)
        assert MART(threat, steps=steps).step_size == pgd_step_size(0.3, steps)
    seen: list[float] = []
    real = trainer_module.pgd_perturb

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs["step_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "pgd_perturb", spy)
    data = Dataset(torch.rand(20, 4), torch.arange(20) % 2, num_classes=2, name="tiny")
    trainer = AdversarialTrainer(PGDAT(threat, steps=1), threat=threat, epochs=1, validation=data, val_steps=4,
                                 progress=False)  # fmt: skip
    trainer.fit(nn.Sequential(nn.Linear(4, 2)), data)
    assert seen and all(s == pgd_step_size(0.3, 4) for s in seen)


def test_bim_uses_the_paper_schedule() -> None:
    assert BIM().iterations(LpBall("linf", 0.3)) == (
        81,
        pytest.approx(1 / 255),
    )  # min(0.3·255 + 4, 1.25·0.3·255)
    assert BIM().iterations(LpBall("linf", 4 / 255)) == (5, pytest.approx(1 / 255))  # 1.25·4 = 5 < 8
    assert BIM(steps=7).iterations(LpBall("l2", 1.0)) == (7, pytest.approx(1.25 / 7))


def test_model_mode_is_restored_and_attack_runs_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 3))
    model.train()
    model[2].eval()  # mixed flags must come back exactly
    x, y = torch.rand(8, 16), torch.randint(0, 3, (8,))
    a = PGD(steps=3, random_start=False)(model, x, y, threat=LpBall("linf", 0.1))
    b = PGD(steps=3, random_start=False)(model, x, y, threat=LpBall("linf", 0.1))
    torch.testing.assert_close(a.x_adv, b.x_adv)  # dropout off during the attack: deterministic
    assert model.training and model[1].training and not model[2].training


def test_seed_makes_random_starts_reproducible(digits_model) -> None:
    model, x, y = digits_model
    atk = PGD(steps=2, early_stop=False)
    r1 = atk(model, x, y, threat=LpBall("l2", 1.0), seed=7)
    r2 = atk(model, x, y, threat=LpBall("l2", 1.0), seed=7)
    r3 = atk(model, x, y, threat=LpBall("l2", 1.0), seed=8)
    torch.testing.assert_close(r1.x_adv, r2.x_adv)
    assert not torch.equal(r1.x_adv, r3.x_adv)


def test_float64_inputs_stay_float64() -> None:
    model = _linear_model(torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    x = torch.rand(4, 5, dtype=torch.float64)
    res = PGD(steps=2)(model, x, torch.zeros(4, dtype=torch.long), threat=LpBall("linf", 0.1))
    assert res.x_adv.dtype == torch.float64


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])


def test_inputs_outside_domain_are_rejected(tiny) -> None:
    model, x, y = tiny
    with pytest.raises(InputError, match=r"outside|domain"):
        PGD()(model, x * 255, y, threat=LpBall("linf", 0.1))
    with pytest.raises(InputError, match=r"NaN|finite"):
        PGD()(
            model,
            x.masked_fill(torch.eye(5, 4, dtype=torch.bool), float("nan")),
            y,
            threat=LpBall("linf", 0.1),
        )


def test_bad_labels_targets_and_threats_are_named(tiny) -> None:
    model, x, y = tiny
    with pytest.raises(InputError, match="labels go up to 7"):
        PGD()(model, x, torch.tensor([0, 1, 2, 0, 7]), threat=LpBall("linf", 0.1))
    with pytest.raises(InputError, match="targets"):
        PGD()(model, x, y, threat=LpBall("linf", 0.1), targets=torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="targets go up to 9"):
        PGD()(model, x, y, threat=LpBall("linf", 0.1), targets=torch.full((5,), 9))
    with pytest.raises(InputError, match="supports the norms"):
        PGD()(model, x, y, threat=LpBall("l0", 2))
    with pytest.raises(InputError, match="ThreatModel"):
        PGD()(model, x, y, threat=0.3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"x/y|shape|samples"):
        PGD()(model, x, y[:3], threat=LpBall("linf", 0.1))


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(InputError, match="steps"):
        PGD(steps=0)
    with pytest.raises(InputError, match="loss"):
        PGD(loss="mse")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="schedule"):
        PGD(schedule="exp")
    with pytest.raises(InputError, match="unknown attack"):
        make_attack("deepfool2")
    with pytest.raises(InputError, match="accepted options"):
        make_attack("pgd", stepz=3)
    assert isinstance(make_attack("PGD", steps=3), PGD)
    assert {"fgsm", "bim", "pgd"} <= set(ATTACKS)


def test_model_output_is_checked(tiny) -> None:
    _, x, y = tiny
    with pytest.raises(ModelError, match=r"\(N, K\)"):
        PGD()(nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0)), x, y, threat=LpBall("linf", 0.1))
    softmax_model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(dim=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PGD(steps=2)(softmax_model, x, y, threat=LpBall("linf", 0.1))
    assert any(issubclass(w.category, BastionWarning) and "softmax" in str(w.message).lower() for w in caught)


def test_dataset_and_attack_agree_on_validation() -> None:
    # the same validation routine serves data sets and attacks: a value the data set refuses, the attack refuses
    x = torch.rand(3, 4)
    x[0, 0] = 1.5
    with pytest.raises(InputError):
        Dataset(x, torch.zeros(3, dtype=torch.long), 2, "bad")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("threat", [LpBall("linf", 0.1), LpBall("l2", 1.0), LpBall("l1", 4.0)], ids=lambda t: t.key)
def test_attacks_run_on_cuda(digits_model, threat: LpBall) -> None:
    model, x, y = digits_model
    gpu = model.to("cuda")
    try:
        for attack in (FGSM(), BIM(), PGD(steps=10, restarts=2)):
            res = attack(gpu, x, y, threat=threat)  # CPU inputs are moved to the model's device
            assert res.x_adv.device.type == "cuda"
            assert bool(threat.contains(res.x_adv, x.cuda()).all())
    finally:
        model.to("cpu")


# ------------------------------------------------------------------------------------------- every registered attack
# Quick settings and a threat per registered attack: a new attack must be added here to be registered at all.
REGISTRY_TABLE: dict[str, tuple[dict, ThreatModel]] = {
    "fgsm": ({}, LpBall("linf", 0.15)),
    "bim": ({"steps": 10, "abs_stepsize": 0.02}, LpBall("linf", 0.15)),
    "pgd": ({"steps": 10, "rel_stepsize": 0.2}, LpBall("l2", 1.5)),
    "apgd": ({"steps": 10}, LpBall("l1", 6.0)),
    "apgd-t": ({"steps": 10, "n_target_classes": 3}, LpBall("linf", 0.15)),
    "square": ({"queries": 100}, LpBall("linf", 0.15)),
    "nes": ({"queries": 300}, LpBall("l2", 1.5)),
    "bandits-td": ({"queries": 300, "prior_size": 4}, LpBall("l2", 1.5)),
    "simba": ({"queries": 200}, LpBall("l2", 1.5)),
    "simba-dct": ({"queries": 200}, LpBall("l2", 1.5)),
    "zoo": (
        {"queries": 3000, "binary_steps": 1, "iterations": 90, "coordinates": 16, "initial_const": 1.0},
        LpBall("l2", float("inf")),
    ),
    "autozoom": ({"queries": 1000, "iterations": 300, "switch_every": 50}, LpBall("l2", float("inf"))),
    "boundary": ({"queries": 300}, LpBall("l2", float("inf"))),
    "hopskipjump": ({"queries": 300}, LpBall("l2", float("inf"))),
    "opt": ({"queries": 300}, LpBall("l2", float("inf"))),
    "sign-opt": ({"queries": 300}, LpBall("l2", float("inf"))),
    "rays": ({"queries": 300}, LpBall("linf", float("inf"))),
    "mi-fgsm": ({}, LpBall("linf", 0.15)),
    "di-fgsm": ({}, LpBall("l2", 1.5)),
    "ti-fgsm": ({}, LpBall("linf", 0.15)),
    "mi-di-ti-fgsm": ({}, LpBall("linf", 0.15)),
    "jsma": ({}, LpBall("l0", 10)),
    "l0-tre": ({"max_features": 20}, LpBall("l0", 10)),
    "deepfool": ({"steps": 20}, LpBall("l2", float("inf"))),
    "cw-l2": ({"binary_search_steps": 3, "steps": 50, "lr": 0.1, "initial_const": 1.0}, LpBall("l2", float("inf"))),
    "ead": ({"binary_search_steps": 3, "steps": 50, "lr": 0.1, "initial_const": 1.0}, LpBall("l1", float("inf"))),
    "lbfgs": ({"binary_search_steps": 3, "max_iter": 20}, LpBall("l2", float("inf"))),
    "fab": ({"steps": 20}, LpBall("linf", float("inf"))),
    "fab-t": ({"steps": 20, "n_target_classes": 2}, LpBall("l1", float("inf"))),
    "cw-linf": ({"steps": 50, "initial_const": 1e-2, "largest_const": 1.0}, LpBall("linf", float("inf"))),
    "cw-l0": ({"steps": 30, "lr": 0.1, "initial_const": 1.0, "largest_const": 4.0}, LpBall("l0", float("inf"))),
    "stadv": ({"steps": 50}, FlowThreat(0.5)),
}


def test_every_registered_attack_is_in_the_table() -> None:
    assert set(ATTACKS) == set(REGISTRY_TABLE)


@pytest.mark.parametrize("name", sorted(REGISTRY_TABLE))
def test_every_registered_attack_honours_the_contract(digits_model, name: str) -> None:
    model, x, y = digits_model
    x, y = x[:24], y[:24]
    options, threat = REGISTRY_TABLE[name]
    attack = make_attack(name, **options)
    res = attack(model, x, y, threat=threat)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    if isinstance(threat, FlowThreat):  # a flow threat is checked through the flow the base re-applied
        assert res.perturbation is not None and bool(threat.contains_flow(res.perturbation).all())
        torch.testing.assert_close(res.x_adv, threat.apply(x, res.perturbation))
        size = threat.flow_size(res.perturbation)
    else:
        assert bool(threat.contains(res.x_adv, x).all())  # inside the threat set (the domain for minimal attacks)
        size = threat.distance(res.x_adv, x)
    assert bool(torch.isfinite(res.distance[res.success]).all())
    torch.testing.assert_close(res.distance[res.success], size[res.success])
    assert res.success_rate > 0.5  # every attack breaks most of this undefended model at these radii
    if attack.access in ("score", "label"):
        assert res.grad_calls == 0 and res.queries is not None
