"""Transfer attacks (MI-FGSM, DI, TI and their combinations): contract, update rules, transfer, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bastion.attacks import (
    ATTACKS,
    BIM,
    DIFGSM,
    FGSM,
    MIDITIFGSM,
    MIFGSM,
    PGD,
    TIFGSM,
    Attack,
    DeepFool,
    Ensemble,
    TransferAttack,
    make_attack,
    transfer_attack,
)
from bastion.attacks.transfer import (
    default_kernel_size,
    gaussian_kernel,
    input_diversity,
    resize_and_pad,
    smooth_gradient,
)
from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.errors import InputError
from bastion.models import build_model
from bastion.results import SampleRecord
from bastion.threat import LpBall

NAMED = {"mi-fgsm": MIFGSM, "di-fgsm": DIFGSM, "ti-fgsm": TIFGSM, "mi-di-ti-fgsm": MIDITIFGSM}


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) and its first 128 held-out test images."""
    model, x, y = digits_mlp64
    return model, x[:128], y[:128]


def _trained(arch: str, data: Dataset | None, seed: int, epochs: int, **kwargs) -> nn.Module:
    # module fixtures run before the autouse one-thread fixture: set one thread here too (tiny tensors)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = build_model(arch, (1, 8, 8), 10, **kwargs)
        if data is not None:
            train(model, data, epochs=epochs, lr=3e-3, seed=seed, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def surrogates() -> dict[str, nn.Module]:
    """Surrogates for the target digits MLP: two trained on the same data, two unrelated to it."""
    train_set, _ = load_digits().train_test_split(test_fraction=0.2, seed=0)  # the target's training split
    perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(0))
    shuffled = Dataset(train_set.x, train_set.y[perm], 10, "digits with shuffled labels")
    return {
        "mlp-seed2": _trained("mlp", train_set, 2, 8, hidden=(32,)),  # same data, another seed
        "cnn-seed1": _trained("cnn", train_set, 1, 6, channels=(8, 16), hidden=32),  # same data, another arch
        "random-weights": _trained("cnn", None, 3, 0, channels=(8, 16), hidden=32),
        "shuffled-labels": _trained("cnn", shuffled, 4, 6, channels=(8, 16), hidden=32),
    }


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


# ------------------------------------------------------------------------------------------- white-box contract
THREATS = [LpBall("linf", 0.15), LpBall("l2", 1.0)]
ATTACK_OBJECTS = [
    MIFGSM(),
    DIFGSM(),
    TIFGSM(),
    MIDITIFGSM(),
    TransferAttack(momentum=0.5, kernel_size=3, diversity_prob=0.3),
]
CASES = [(a, t) for t in THREATS for a in ATTACK_OBJECTS]


@pytest.mark.parametrize("attack,threat", CASES, ids=[f"{a!r}-{t.key}" for a, t in CASES])
def test_attack_contract_and_at_least_as_strong_as_fgsm(digits_model, attack: Attack, threat: LpBall) -> None:
    model, x, y = digits_model
    res = attack(model, x, y, threat=threat, seed=0)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert bool(threat.contains(res.x_adv, x).all())  # inside the ball and the domain
    pred = _predict(model, res.x_adv)
    torch.testing.assert_close(res.success, pred != y)  # success re-verified by prediction
    torch.testing.assert_close(res.distance[res.success], threat.distance(res.x_adv, x)[res.success])
    fgsm = FGSM()(model, x, y, threat=threat)
    assert res.success_rate >= fgsm.success_rate, f"{res.success_rate} < FGSM's {fgsm.success_rate}"
    # every iteration runs (no early stop): one gradient per attacked sample and step
    attacked = int((_predict(model, x) == y).sum())
    assert res.grad_calls == attack.steps * attacked  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_variants_are_registered_with_their_papers_defaults(digits_model, name: str) -> None:
    assert ATTACKS[name] is NAMED[name]
    attack = make_attack(name)
    expected = {
        "mi-fgsm": (1.0, 0.0, 1),
        "di-fgsm": (0.0, 0.5, 1),
        "ti-fgsm": (0.0, 0.0, None),
        "mi-di-ti-fgsm": (1.0, 0.5, None),
    }[name]
    assert (attack.momentum, attack.diversity_prob, attack.kernel_size) == expected  # type: ignore[attr-defined]
    assert attack.steps == 10 and attack.rel_stepsize is None  # type: ignore[attr-defined]
    # options from the command line are converted and every variant takes every option
    assert make_attack(name, momentum=0.5, kernel_size=3.0, diversity_prob=1).kernel_size == 3  # type: ignore
    # the same contract as tests/test_attacks.py's registry table
    model, x, y = digits_model
    res = attack(model, x[:24], y[:24], threat=LpBall("linf", 0.15))
    torch.testing.assert_close(res.success, _predict(model, res.x_adv) != y[:24])
    assert res.success_rate > 0.5


# ------------------------------------------------------------------------------------------- update rules
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = _predict(model, x) == y
    return x[keep][:64], y[keep][:64]


def _hand_mi_fgsm(model, x, y, eps, steps, mu, norm):
    """Dong et al. (2018), Algorithm 1 (and its l2 form), written out with plain tensor operations."""
    alpha = eps / steps
    x_adv, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        z = x_adv.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)
        g = mu * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        if norm == "linf":
            x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        else:
            x_adv = x_adv + alpha * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = x_adv - x
            x_adv = x + d * (eps / d.flatten(1).norm(dim=1).clamp_min(eps)).view(-1, 1, 1, 1)
    return x_adv


@pytest.mark.parametrize("mu", [0.0, 1.0])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_momentum_iteration_matches_the_update_rule_written_by_hand(digits_model, mu: float, norm: str) -> None:
    model, x, y = digits_model
    x, y = _correct(model, x, y)
    # l2: a domain so wide that the box never binds, so the hand loop's plain ball projection is the exact one
    eps, domain = (0.1, (0.0, 1.0)) if norm == "linf" else (1.0, (-10.0, 10.0))
    res = MIFGSM(momentum=mu)(model, x, y, threat=LpBall(norm, eps, domain=domain))
    expected = _hand_mi_fgsm(model, x, y, eps, 10, mu, norm)
    torch.testing.assert_close(res.x_adv, expected, rtol=0, atol=1e-6 if norm == "l2" else 0)


@pytest.mark.parametrize("threat", THREATS, ids=lambda t: t.key)
def test_zero_momentum_without_di_or_ti_is_bim_with_the_same_step(digits_model, threat: LpBall) -> None:
    model, x, y = digits_model
    steps = 10
    ours = MIFGSM(momentum=0.0, steps=steps, early_stop=True)(model, x, y, threat=threat)
    bim = BIM(steps=steps, abs_stepsize=threat.eps / steps, early_stop=True)(model, x, y, threat=threat)
    tol = 0 if threat.norm == "linf" else 1e-6  # l2: the l1 rescaling before the l2 normalisation rounds
    torch.testing.assert_close(ours.x_adv, bim.x_adv, rtol=0, atol=tol)
    torch.testing.assert_close(ours.success, bim.success)
    assert ours.grad_calls == bim.grad_calls


def test_no_diversity_and_unit_kernel_switch_di_and_ti_off(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.15)
    plain = MIFGSM()(model, x, y, threat=threat)
    # DI with p = 0 and TI with kernel size 1 are the momentum attack itself
    for attack in (TransferAttack(diversity_prob=0.0, kernel_size=1), MIDITIFGSM(diversity_prob=0, kernel_size=1)):
        res = attack(model, x, y, threat=threat, seed=5)
        torch.testing.assert_close(res.x_adv, plain.x_adv, rtol=0, atol=0)
    assert torch.equal(smooth_gradient(x, 1), x)
    assert torch.equal(input_diversity(x, prob=0.0, generator=torch.Generator().manual_seed(0)), x)
    # ... while switching either on changes the iterates
    for attack in (MIFGSM(diversity_prob=1.0), MIFGSM(kernel_size=3)):
        assert not torch.equal(attack(model, x, y, threat=threat, seed=5).x_adv, plain.x_adv)


def test_di_is_seeded_and_draws_per_sample(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.15)
    a = DIFGSM()(model, x, y, threat=threat, seed=1)
    b = DIFGSM()(model, x, y, threat=threat, seed=1)
    c = DIFGSM()(model, x, y, threat=threat, seed=2)
    assert torch.equal(a.x_adv, b.x_adv) and not torch.equal(a.x_adv, c.x_adv)
    # one independent transform per sample: copies of one image are transformed differently, about half not at all
    copies = x[:1].expand(400, -1, -1, -1)
    out = input_diversity(copies, prob=0.5, generator=torch.Generator().manual_seed(0))
    unchanged = (out == copies).flatten(1).all(dim=1)
    assert 0.4 < float(unchanged.float().mean()) < 0.6
    assert torch.unique(out[~unchanged].flatten(1), dim=0).shape[0] > 150


# ------------------------------------------------------------------------------------------- DI and TI operators
def test_resize_and_pad_against_a_hand_computation() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4) / 100
    one, zero = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(resize_and_pad(x, one, zero, zero), x)  # scale 1 at the corner: the identity
    # half size in the top-left corner: bilinear sampling at the centres of 2x2 blocks is 2x2 average pooling,
    # the rest is padding
    out = resize_and_pad(x, 0.5 * one, zero, zero, pad_value=0.25)
    torch.testing.assert_close(out[..., :2, :2], F.avg_pool2d(x, 2))
    assert bool((out[..., 2:, :] == 0.25).all()) and bool((out[..., :, 2:] == 0.25).all())
    # the same, placed in the bottom-right corner of the second image only
    out = resize_and_pad(x, 0.5 * one, torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(out[1, :, 2:, 2:], F.avg_pool2d(x, 2)[1])
    assert float(out[1, :, :2, :].abs().max()) == 0.0
    # the diversity transform keeps the image inside the canvas and no larger than it: at ratio 1 it is the identity
    y = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(input_diversity(y, prob=1.0, resize_ratio=1.0), y)


def test_gaussian_kernel_and_depthwise_smoothing() -> None:
    k = gaussian_kernel(5, dtype=torch.float64)
    t = torch.linspace(-3, 3, 5, dtype=torch.float64)
    hand = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / 2)
    torch.testing.assert_close(k, hand / hand.sum())
    assert math.isclose(float(k.sum()), 1.0) and torch.equal(k, k.T) and torch.equal(k, k.flip(0))
    assert torch.equal(gaussian_kernel(1), torch.ones(1, 1))
    # an impulse in channel 0 spreads as the kernel in channel 0 only (depthwise: channels never mix)
    g = torch.zeros(1, 3, 9, 9, dtype=torch.float64)
    g[0, 0, 4, 4] = 1.0
    s = smooth_gradient(g, 5)
    assert s.shape == g.shape
    torch.testing.assert_close(s[0, 0, 2:7, 2:7], k)
    assert float(s[0, 1:].abs().max()) == 0.0 and math.isclose(float(s.sum()), 1.0)
    # the paper's kernel scaled to the image size
    assert default_kernel_size(299, 299) == 15 and default_kernel_size(224, 224) == 11
    assert default_kernel_size(8, 8) == 3 and default_kernel_size(32, 32) == 3
    assert TIFGSM().kernel_for(torch.zeros(1, 3, 299, 299)) == 15


def test_ensemble_logits_are_the_mean(digits_model, surrogates) -> None:
    model, x, _ = digits_model
    members = [model, surrogates["mlp-seed2"], surrogates["cnn-seed1"]]
    with torch.no_grad():
        logits = [m(x) for m in members]
        torch.testing.assert_close(Ensemble(members)(x), sum(logits) / 3)
        weighted = Ensemble(members, weights=[2, 1, 1])(x)
        torch.testing.assert_close(weighted, (2 * logits[0] + logits[1] + logits[2]) / 4)
    # an ensemble is a model: the white-box attacks run on it unchanged
    ens = Ensemble(members)
    res = MIDITIFGSM()(ens, x, _predict(ens, x), threat=LpBall("linf", 0.15))
    assert res.success_rate > 0.5


# ------------------------------------------------------------------------------------------- transfer
@pytest.mark.parametrize("attack", ["mi-fgsm", "mi-di-ti-fgsm"])
def test_same_data_surrogates_transfer_far_better_than_unrelated_ones(digits_mlp64, surrogates, attack) -> None:
    target, x, y = digits_mlp64
    threat = LpBall("linf", 0.2)
    rates = {name: transfer_attack(s, target, x, y, attack=attack, threat=threat) for name, s in surrogates.items()}
    same = min(rates[k].transfer_rate for k in ("mlp-seed2", "cnn-seed1"))
    unrelated = max(rates[k].transfer_rate for k in ("random-weights", "shuffled-labels"))
    assert same >= 0.4 and unrelated <= 0.2 and same >= unrelated + 0.3, {k: r.transfer_rate for k, r in rates.items()}
    # the white-box success on the trained surrogates is higher still
    assert all(rates[k].whitebox_rate > rates[k].transfer_rate for k in ("mlp-seed2", "cnn-seed1"))


def test_transfer_result_is_consistent_with_the_models(digits_mlp64, surrogates) -> None:
    target, x, y = digits_mlp64
    x, y = x[:150], y[:150]
    surrogate, threat = surrogates["cnn-seed1"], LpBall("linf", 0.2)
    res = transfer_attack(surrogate, target, x, y, attack=MIDITIFGSM(), threat=threat, batch_size=64, seed=3)
    assert bool(threat.contains(res.x_adv, x).all())
    t_clean, t_adv = _predict(target, x), _predict(target, res.x_adv)
    s_clean, s_adv = _predict(surrogate, x), _predict(surrogate, res.x_adv)
    assert torch.equal(res.target_clean_pred, t_clean) and torch.equal(res.target_adv_pred, t_adv)
    assert torch.equal(res.transfer_success, (t_clean == y) & (t_adv != y))
    assert torch.equal(res.surrogate_success, s_adv != y)
    assert math.isclose(res.transfer_rate, float((t_adv != y)[t_clean == y].float().mean()))
    assert math.isclose(res.whitebox_rate, float((s_adv != y)[s_clean == y].float().mean()))
    # batches draw their own seeds: the result does not depend on the batch size being a multiple of anything
    again = transfer_attack(surrogate, target, x, y, attack=MIDITIFGSM(), threat=threat, batch_size=64, seed=3)
    assert torch.equal(again.x_adv, res.x_adv)
    # one record per sample, for the target, storable as JSON
    assert len(res.records) == 150 and all(isinstance(r, SampleRecord) for r in res.records)
    for i, r in enumerate(res.records):
        assert r.index == i and r.threat == threat.key and r.label == int(y[i]) and r.clean_pred == int(t_clean[i])
        if r.clean_pred != r.label:
            assert (r.status, r.attack, r.adv_distance) == ("falsified", "clean", 0.0)
        elif bool(res.transfer_success[i]):
            assert r.status == "falsified" and r.attack == "transfer:mi-di-ti-fgsm"
            assert r.adv_distance is not None and 0 < r.adv_distance <= 0.2 + 1e-6
        else:
            assert (r.status, r.attack, r.adv_distance) == ("unknown", None, None)
        assert r.extra["surrogate_adv_pred"] == int(s_adv[i]) and r.queries == 2
        json.dumps(r.to_dict())
    summary = res.to_dict()
    assert summary["n_transferred"] == int(res.transfer_success.sum()) and summary["attack"] == "transfer:mi-di-ti-fgsm"
    json.dumps(summary)
    assert "transfer success" in res.table() and f"{100 * res.transfer_rate:.2f}%" in res.table()


def test_ensemble_surrogate_and_targeted_transfer(digits_mlp64, surrogates) -> None:
    target, x, y = digits_mlp64
    x, y = x[:100], y[:100]
    pair = [surrogates["mlp-seed2"], surrogates["cnn-seed1"]]
    threat = LpBall("linf", 0.2)
    listed = transfer_attack(pair, target, x, y, threat=threat)
    wrapped = transfer_attack(Ensemble(pair), target, x, y, threat=threat)
    assert torch.equal(listed.x_adv, wrapped.x_adv) and listed.transfer_rate > 0.3
    # targeted: success means the target predicts the target class
    t = (y + 1) % 10
    res = transfer_attack(pair, target, x, y, threat=threat, targets=t, attack=MIFGSM())
    assert torch.equal(res.transfer_success, (res.target_clean_pred == y) & (res.target_adv_pred == t))
    assert res.to_dict()["targeted"] and all(r.extra["target"] == int(t[r.index]) for r in res.records)
    assert res.whitebox_rate > res.transfer_rate
    # any white-box fixed-eps attack can craft: PGD from the registry, in l2
    pgd = transfer_attack(pair, target, x, y, threat=LpBall("l2", 1.5), attack=PGD(steps=10))
    assert pgd.attack == "transfer:pgd" and bool(LpBall("l2", 1.5).contains(pgd.x_adv, x).all())


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_input_error(digits_mlp64, surrogates) -> None:
    target, x, y = digits_mlp64
    x, y = x[:8], y[:8]
    sur, cnn, threat = surrogates["mlp-seed2"], surrogates["cnn-seed1"], LpBall("linf", 0.1)
    bad_calls = [
        lambda: transfer_attack([], target, x, y, threat=threat),  # no surrogate
        lambda: transfer_attack("mlp", target, x, y, threat=threat),  # type: ignore[arg-type]
        lambda: transfer_attack(sur, lambda z: z, x, y, threat=threat),  # type: ignore[arg-type]
        lambda: transfer_attack(sur, target, x, y[:5], threat=threat),  # mismatched lengths
        lambda: transfer_attack(cnn, target, x.reshape(8, 4, 4, 4), y, threat=threat, attack=MIFGSM()),  # wrong shape
        lambda: transfer_attack(sur, target, x.reshape(8, 64), y, threat=threat, attack="ti-fgsm"),  # TI needs images
        lambda: transfer_attack(sur, target, x, y + 5, threat=threat),  # labels beyond the classes
        lambda: transfer_attack(sur, target, x, y, threat=LpBall("linf", math.inf)),
        lambda: transfer_attack(sur, target, x, y, threat=LpBall("l1", 2.0)),  # no l1 version
        lambda: transfer_attack(sur, target, x, y, threat=threat, attack="mi-fgsm2"),  # unknown attack
        lambda: transfer_attack(sur, target, x, y, threat=threat, attack=DeepFool()),  # minimal-distortion
        lambda: transfer_attack(sur, target, x, y, threat=threat, batch_size=0),
        lambda: transfer_attack(sur, nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), x, y, threat=threat),
        lambda: make_attack("mi-fgsm", decay=1.0),  # unknown option
        lambda: make_attack("di-fgsm", diversity_prob="often"),
        lambda: MIFGSM(momentum=-1.0),
        lambda: DIFGSM(diversity_prob=1.5),
        lambda: DIFGSM(resize_ratio=0.9),
        lambda: TIFGSM(kernel_size=4),
        lambda: TIFGSM(kernel_size=0),
        lambda: MIFGSM(steps=2.5),  # type: ignore[arg-type]
        lambda: MIFGSM(loss="mse"),  # type: ignore[arg-type]
        lambda: MIFGSM(early_stop="yes"),  # type: ignore[arg-type]
        lambda: Ensemble([]),
        lambda: Ensemble(sur),  # type: ignore[arg-type]
        lambda: Ensemble([sur, "cnn"]),  # type: ignore[list-item]
        lambda: Ensemble([sur, target], weights=[1.0]),
        lambda: Ensemble([sur, target], weights=[-1.0, 2.0]),
        lambda: MIFGSM()(sur, x, y, threat=LpBall("l0", 3)),
        lambda: TIFGSM()(sur, x.reshape(8, 64), y, threat=threat),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(InputError):
            call()
            pytest.fail(f"bad call {i} did not raise")
    # ensemble members that disagree on the classes are refused at the first forward pass
    with pytest.raises(InputError, match="same classes"):
        Ensemble([sur, nn.Sequential(nn.Flatten(), nn.Linear(64, 3))])(x)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_attack_runs_on_cuda(digits_mlp64, surrogates) -> None:
    target, x, y = digits_mlp64
    sur = surrogates["cnn-seed1"]
    try:
        sur.cuda(), target.cuda()
        res = transfer_attack([sur, sur], target, x[:64], y[:64], attack=MIDITIFGSM(), threat=LpBall("l2", 1.0))
        assert res.x_adv.device.type == "cuda" and bool(LpBall("l2", 1.0).contains(res.x_adv, x[:64].cuda()).all())
        assert res.transfer_rate > 0.1
    finally:
        sur.cpu(), target.cpu()


# ------------------------------------------------------------------------------------- on a black-box target
def test_transferred_runs_on_a_labels_only_oracle_and_matches_transfer_attack(digits_mlp64, surrogates) -> None:
    from bastion import evaluate
    from bastion.attacks import MIFGSM, Transferred
    from bastion.models import BlackBox

    target, x, y = digits_mlp64
    x, y = x[:120], y[:120]
    threat = LpBall("linf", 0.2)
    oracle = BlackBox(lambda v: target(v).argmax(1), returns="labels", num_classes=10, budget=10_000)
    surrogate = surrogates["mlp-seed2"]
    res = evaluate(oracle, (x, y), threat, [Transferred(MIFGSM(), surrogate)], progress=False)
    direct = transfer_attack(surrogate, target, x, y, attack=MIFGSM(), threat=threat)
    correct = direct.target_clean_pred == y
    # the same examples (MI-FGSM has no randomness), judged on the target through its labels only
    broken = {r.index for r in res.records if r.status == "falsified" and r.attack != "clean"}
    assert broken == set(torch.nonzero(direct.transfer_success & correct).squeeze(1).tolist())
    # queries: evaluate's clean one, the attack's clean one, one re-verification per changed point; no scores read
    assert all(r.queries is not None and 1 <= r.queries <= 3 for r in res.records)
    assert oracle.queries == sum(r.queries or 0 for r in res.records)


def test_a_transfer_attack_on_a_black_box_is_refused_with_the_way_out(digits_mlp64) -> None:
    from bastion.attacks import MIFGSM, Transferred
    from bastion.models import BlackBox

    target, x, y = digits_mlp64
    with pytest.raises(InputError, match="surrogate"):
        MIFGSM()(BlackBox(target), x[:4], y[:4], threat=LpBall("linf", 0.1))
    with pytest.raises(InputError, match="fixed-eps white-box or transfer"):
        Transferred("fab", target)
