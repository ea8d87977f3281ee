"""The black-box oracle: every query counted per sample, budgets never exceeded, no gradients, labels-only, adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from bastion.attacks import NES, PGD, Attack, BanditsTD, CountingModel, SimBA, SimBADCT, Square
from bastion.attacks.base import adversarial_labels
from bastion.data import load_digits
from bastion.errors import InputError, ModelError
from bastion.models.checks import model_fingerprint
from bastion.models.oracle import BlackBox, QueryBudgetExhausted, from_numpy, from_onnx, from_sklearn
from bastion.results import Criterion
from bastion.threat import LpBall, ThreatModel

L2 = LpBall("l2", 1.0)


class Recorder:
    """The model behind an independent counter: every input row it is asked about is kept (as the wall sees it)."""

    def __init__(self, model: nn.Module, *, labels: bool = False) -> None:
        self.model, self.labels, self.rows, self.calls = model, labels, [], 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows.append(x.detach().clone())
        with torch.no_grad():
            out = self.model(x)
        return out.argmax(dim=1) if self.labels else out

    @property
    def total(self) -> int:
        return sum(r.shape[0] for r in self.rows)

    def per_sample(self, clean: torch.Tensor) -> torch.Tensor:
        """Queries per clean sample, each queried row charged to the nearest clean input (checked unambiguous)."""
        if not self.rows:
            return torch.zeros(clean.shape[0], dtype=torch.long)
        rows = torch.cat(self.rows).flatten(1)
        dist = torch.cdist(rows, clean.flatten(1))
        two = dist.topk(2, dim=1, largest=False).values
        # the premise of the attribution: every query lies near its own sample and far from all the others
        assert float(two[:, 0].max()) <= 1.2 < float(two[:, 1].min()), (two[:, 0].max(), two[:, 1].min())
        return torch.bincount(dist.argmin(dim=1), minlength=clean.shape[0])


@pytest.fixture(scope="module")
def digits_model(
    digits_mlp64: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shared digits MLP (tests/conftest.py) in eval mode and its first 64 held-out test images."""
    model, x, y = digits_mlp64
    return model.eval(), x[:64], y[:64]


@pytest.fixture(scope="module")
def separated(digits_model) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Digits at least 2.5 apart in l2, correctly classified: queries within 1.2 of a sample identify it."""
    model = digits_model[0]
    data = load_digits()
    flat = data.x.flatten(1)
    chosen: list[int] = []
    for i in range(flat.shape[0]):
        if all(float((flat[i] - flat[j]).norm()) >= 2.5 for j in chosen):
            chosen.append(i)
    x, y = data.x[chosen], data.y[chosen]
    with torch.no_grad():
        ok = model(x).argmax(dim=1) == y
    assert int(ok.sum()) >= 20
    return model, x[ok], y[ok]


# ------------------------------------------------------------------------------------------------- counting
COUNTED = [
    NES(queries=200, samples=10),
    BanditsTD(queries=200, prior_size=4),
    SimBA(queries=200),
    SimBADCT(queries=200),
    Square(queries=150),
]


@pytest.mark.parametrize("attack", COUNTED, ids=lambda a: type(a).__name__)
def test_every_query_is_counted_for_its_own_sample(separated, attack: Attack) -> None:
    model, x, y = separated
    recorder = Recorder(model)
    oracle = BlackBox(recorder, batch_size=37)
    res = attack(oracle, x, y, threat=L2)
    assert res.queries is not None and res.grad_calls == 0
    # one truth: the wall's count, the oracle's, the result's total and the base's forward count all agree
    assert recorder.total == oracle.queries == int(res.queries.sum()) == res.model_calls
    # per sample: exactly the queries the wall saw for that sample (the clean query and the re-verification included)
    torch.testing.assert_close(recorder.per_sample(x), res.queries)
    assert bool((res.queries <= 200 + 2).all())
    assert recorder.calls == oracle.calls and all(r.shape[0] <= 37 for r in recorder.rows)  # batched, never above


def test_sample_budget_is_never_exceeded(separated) -> None:
    model, x, y = separated
    for attack, budget in (
        (NES(queries=10_000, samples=10), 40),
        (SimBA(queries=10_000), 25),
        (BanditsTD(prior_size=4), 9),
    ):
        recorder = Recorder(model)
        res = attack(BlackBox(recorder, sample_budget=budget), x, y, threat=L2)
        per = recorder.per_sample(x)
        assert res.queries is not None
        torch.testing.assert_close(per, res.queries)
        assert int(per.max()) <= budget, (type(attack).__name__, int(per.max()))
        # the budget was used, not wasted: unbroken samples spent all that whole steps allow
        unbroken = per[~res.success]
        assert unbroken.numel() == 0 or int(unbroken.min()) > budget - 12


def test_total_budget_is_never_exceeded_and_the_attack_stops_cleanly(separated) -> None:
    model, x, y = separated
    recorder = Recorder(model)
    n = x.shape[0]
    total = 2 * n + 11 * (n // 2) + 5  # the clean queries, the re-verifications and one NES step for half of them
    oracle = BlackBox(recorder, budget=total)
    res = NES(queries=10_000, samples=10)(oracle, x, y, threat=L2)
    assert recorder.total == oracle.queries <= total
    assert oracle.remaining == total - oracle.queries
    assert res.queries is not None and int(res.queries.sum()) == recorder.total
    torch.testing.assert_close(recorder.per_sample(x), res.queries)
    # the budget ran out: samples the search never reached cost their clean query only and stay unbroken
    untouched = res.queries == 1
    assert bool(untouched.any()) and not bool(res.success[untouched].any())
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) != y)
    # a spent oracle refuses the next request whole and sends nothing
    sent = recorder.total
    with pytest.raises(QueryBudgetExhausted, match="budget"):
        NES(queries=100, samples=10)(oracle, x, y, threat=L2)
    assert recorder.total == sent
    oracle.reset()
    assert oracle.queries == 0 and oracle.remaining == total


class Unqueried(Attack):
    """Returns random points of the ball without querying them: the base must verify or drop them."""

    name = ""
    norms = ("linf", "l2")
    access = "score"
    budgeted = True

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return threat.random_start(x, generator), model.ledger().used


def test_what_the_budgets_cannot_verify_is_dropped_not_trusted(digits_model) -> None:
    model, x, y = digits_model
    threat = LpBall("linf", 0.3)
    n = x.shape[0]
    recorder = Recorder(model)
    res = Unqueried()(BlackBox(recorder, sample_budget=1), x, y, threat=threat)
    assert recorder.total == n and res.queries is not None and bool((res.queries == 1).all())
    torch.testing.assert_close(res.x_adv, x, rtol=0, atol=0)  # nothing could be verified: nothing claimed
    recorder = Recorder(model)
    res = Unqueried()(BlackBox(recorder, budget=n + 5), x, y, threat=threat)
    assert recorder.total == n + 5 and res.queries is not None and int((res.queries == 2).sum()) == 5
    kept = res.queries == 2
    assert bool((res.x_adv[~kept] == x[~kept]).all()) and not bool((res.x_adv[kept] == x[kept]).all())
    with torch.no_grad():
        torch.testing.assert_close(res.success, model(res.x_adv).argmax(dim=1) != y)


class Unbudgeted(Unqueried):
    """A score attack that queries outside the ledger (``budgeted = False``)."""

    budgeted = False

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model(x)
        return x, torch.ones(x.shape[0], dtype=torch.long, device=x.device)


def test_an_attack_that_ignores_budgets_is_refused_on_a_budgeted_oracle(digits_model) -> None:
    model, x, y = digits_model
    with pytest.raises(InputError, match=r"Unbudgeted does not spend.*budget"):
        Unbudgeted()(BlackBox(model, budget=10_000), x, y, threat=L2)
    with pytest.raises(InputError, match="sample_budget"):
        Unbudgeted()(BlackBox(model, sample_budget=100), x, y, threat=L2)
    # Square spends through the ledger: it runs within both budgets
    res = Square(queries=10)(BlackBox(model, sample_budget=6), x, y, threat=L2)
    assert res.queries is not None and int(res.queries.max()) <= 6


# ------------------------------------------------------------------------------------------------- access
def test_white_box_attacks_and_gradients_are_refused(digits_model) -> None:
    model, x, y = digits_model
    oracle = BlackBox(model)
    with pytest.raises(InputError, match=r"PGD is a white-box attack.*score-based attack \(.*nes.*simba"):
        PGD(steps=3)(oracle, x, y, threat=LpBall("linf", 0.1))
    assert oracle.queries == 0  # refused before any query
    xg = x[:4].clone().requires_grad_(True)
    with pytest.raises(InputError, match="no gradients"):
        oracle(xg).sum().backward()
    with pytest.raises(InputError, match="no gradients"):
        CountingModel(oracle).logits_and_grad(x[:4], lambda z: z.sum(dim=1))


class RandomLabelSearch(Attack):
    """A minimal decision-based attack for the test: uniform points of the ball, judged by labels only."""

    name = ""  # not registered
    norms = ("linf", "l2")
    access = "label"
    budgeted = True
    seen_scores: ClassVar[list[bool]] = []

    def __init__(self, *, queries: int = 50) -> None:
        self.queries = queries

    def run(
        self,
        model: CountingModel,
        x: torch.Tensor,
        criterion: Criterion,
        threat: ThreatModel,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert model.access == "label" and model.clean_scores is None and model.clean_labels is not None
        ledger = model.ledger(self.queries)
        best, done = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool)
        while True:
            act = ledger.afford((~done).nonzero().squeeze(1), 1)
            if act.numel() == 0:
                return best, ledger.used
            cand = threat.random_start(x[act], generator)
            hit = adversarial_labels(criterion.subset(act), ledger.labels(cand, act))
            best[act[hit]] = cand[hit]
            done[act[hit]] = True


def test_a_labels_only_oracle_never_gives_a_score(digits_model) -> None:
    model, x, y = digits_model
    recorder = Recorder(model, labels=True)
    oracle = BlackBox(recorder, returns="labels", num_classes=10)
    for read in (oracle, oracle.scores, CountingModel(oracle)):
        with pytest.raises(InputError, match="labels only"):
            read(x[:3])
    with pytest.raises(InputError, match=r"NES reads scores.*labels only"):
        NES(queries=10)(oracle, x, y, threat=L2)
    assert recorder.total == 0
    with torch.no_grad():
        torch.testing.assert_close(oracle.labels(x), model(x).argmax(dim=1))
    assert recorder.total == oracle.queries == x.shape[0]
    oracle.reset()
    recorder.rows.clear()
    # a decision-based attack runs through labels alone: clean predictions, search and re-verification
    threat = LpBall("linf", 0.3)
    res = RandomLabelSearch(queries=30)(oracle, x, y, threat=threat, seed=1)
    assert res.queries is not None and recorder.total == oracle.queries == int(res.queries.sum())
    with torch.no_grad():
        pred = model(res.x_adv).argmax(dim=1)
        clean = model(x).argmax(dim=1)
    torch.testing.assert_close(res.success, pred != y)
    torch.testing.assert_close(res.clean_pred, clean)
    assert bool(threat.contains(res.x_adv, x).all()) and res.success_rate > float((clean != y).float().mean())
    assert bool((res.queries[clean != y] == 1).all())  # already misclassified: the clean query only
    assert bool((res.queries <= 30 + 2).all())


def test_score_and_label_reads_of_a_score_oracle(digits_model) -> None:
    model, x, _ = digits_model
    oracle = BlackBox(model)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(oracle(x), logits)
    torch.testing.assert_close(oracle.labels(x), logits.argmax(dim=1))
    assert oracle.queries == 2 * x.shape[0] and oracle.num_classes == 10
    probs = BlackBox(lambda t: model(t).softmax(dim=1), returns="probabilities")
    # probabilities come back as log-probabilities: the same softmax, the same argmax, margins in log space
    torch.testing.assert_close(probs(x).softmax(dim=1), logits.softmax(dim=1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs(x), logits.log_softmax(dim=1), atol=1e-4, rtol=1e-4)
    zero = BlackBox(lambda t: torch.eye(10)[: t.shape[0]], returns="probabilities")
    assert bool(torch.isfinite(zero(x[:10])).all())  # p = 0 gives a finite (very negative) score
    double = BlackBox(model.double())
    try:
        assert double(x.double()).dtype == torch.float64
    finally:
        model.float()


# ------------------------------------------------------------------------------------------------- adapters
def test_numpy_adapter_equals_the_torch_model(digits_model) -> None:
    model, x, _ = digits_model
    norm, lin1, lin2 = model[0], model[2], model[4]
    mean, std = float(norm.mean.reshape(-1)[0]), float(norm.std.reshape(-1)[0])
    w1, b1 = lin1.weight.detach().numpy(), lin1.bias.detach().numpy()
    w2, b2 = lin2.weight.detach().numpy(), lin2.bias.detach().numpy()

    def numpy_mlp(a: np.ndarray) -> np.ndarray:
        assert a.shape[1:] == (64,) and a.dtype == np.float32
        h = np.maximum(((a - mean) / std) @ w1.T + b1, 0.0)
        return h @ w2.T + b2

    oracle = from_numpy(numpy_mlp, input_shape=(64,), batch_size=16, fingerprint="numpy-mlp")
    with torch.no_grad():
        torch.testing.assert_close(oracle(x), model(x), atol=1e-5, rtol=1e-5)
    assert oracle.calls == math.ceil(x.shape[0] / 16) and oracle.queries == x.shape[0]
    with pytest.raises(InputError, match="input_shape"):
        from_numpy(numpy_mlp, input_shape=(0,))
    with pytest.raises(InputError, match="dtype"):
        from_numpy(numpy_mlp, dtype="int32")


def test_sklearn_adapter_probabilities_decisions_and_labels() -> None:
    from sklearn.linear_model import LogisticRegression

    train, test = load_digits().train_test_split(test_fraction=0.2, seed=0)
    flat, labels_train = train.x[:600].flatten(1).numpy(), train.y[:600].numpy()
    est = LogisticRegression(max_iter=200).fit(flat, labels_train)
    x = test.x[:50]
    flat_test = x.flatten(1).numpy()
    proba = from_sklearn(est)
    torch.testing.assert_close(
        proba(x).exp(), torch.as_tensor(est.predict_proba(flat_test.astype(np.float64))).float(), atol=1e-6, rtol=1e-5
    )
    assert proba.returns == "probabilities" and proba.num_classes == 10
    predicted = torch.as_tensor(est.predict(flat_test.astype(np.float64)))
    torch.testing.assert_close(proba.labels(x), predicted)
    torch.testing.assert_close(from_sklearn(est, method="decision_function")(x).argmax(dim=1), predicted)
    labels = from_sklearn(est, method="predict")
    assert labels.returns == "labels"
    torch.testing.assert_close(labels.labels(x), predicted)
    with pytest.raises(InputError, match="labels only"):
        labels(x)
    # the same estimator has the same fingerprint; another one does not
    assert model_fingerprint(from_sklearn(est)) == model_fingerprint(proba)
    other = LogisticRegression(max_iter=200, C=0.1).fit(flat, labels_train)
    assert model_fingerprint(from_sklearn(other)) != model_fingerprint(proba)
    # an attack runs on it like on any model
    res = SimBA(queries=100)(proba, x, test.y[:50], threat=L2)
    assert res.queries is not None and int(res.queries.sum()) == proba.queries - 2 * 50  # two reads above
    assert res.success_rate > 0.3
    with pytest.raises(InputError, match="classes_"):
        from_sklearn(LogisticRegression(max_iter=50).fit(flat[:200], labels_train[:200] + 1))
    with pytest.raises(InputError, match="not fitted"):
        from_sklearn(LogisticRegression())
    with pytest.raises(InputError, match="method"):
        from_sklearn(est, method="score")  # type: ignore[arg-type]


def _export(model: nn.Module, path: Path, *, dynamic: bool) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(1, 1, 8, 8),), str(path), dynamo=False, opset_version=13, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic else None,
        )  # fmt: skip


def test_onnx_adapter_file_and_session_equal_the_torch_model(digits_model, tmp_path: Path) -> None:
    import onnxruntime as ort

    model, x, _ = digits_model
    dyn, fixed = tmp_path / "dyn.onnx", tmp_path / "fixed.onnx"
    _export(model, dyn, dynamic=True)
    _export(model, fixed, dynamic=False)
    with torch.no_grad():
        want = model(x)
    from_file = from_onnx(dyn, batch_size=20)
    torch.testing.assert_close(from_file(x), want, atol=1e-5, rtol=1e-5)
    assert from_file.calls == 4  # batches of 20, never one by one
    session = from_onnx(ort.InferenceSession(str(dyn), providers=["CPUExecutionProvider"]))
    torch.testing.assert_close(session(x), want, atol=1e-5, rtol=1e-5)
    one = from_onnx(fixed)  # a fixed batch of 1: run input by input, still one query per input
    torch.testing.assert_close(one(x[:5]), want[:5], atol=1e-5, rtol=1e-5)
    assert one.queries == 5
    torch.testing.assert_close(from_onnx(dyn)(x.flatten(1)), want, atol=1e-5, rtol=1e-5)  # flat inputs reshaped
    assert model_fingerprint(from_file) == model_fingerprint(from_onnx(dyn))
    assert model_fingerprint(from_file) != model_fingerprint(one)
    with pytest.raises(ModelError, match="not found"):
        from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="InferenceSession"):
        from_onnx(42)
    with pytest.raises(InputError, match="shape"):
        from_file(torch.rand(2, 10))


# ------------------------------------------------------------------------------------------------- contract
def test_oracle_is_a_module_with_a_stable_identity(digits_model) -> None:
    model, x, _ = digits_model
    wrapped = BlackBox(model)
    assert list(wrapped.parameters())  # a torch model behind the wall moves and fingerprints with it
    before = model_fingerprint(wrapped)
    wrapped(x)
    assert model_fingerprint(wrapped) == before  # counters are not identity

    def f(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)[:, :3]

    assert model_fingerprint(BlackBox(f)) != model_fingerprint(BlackBox(f))  # unknown callables never collide
    assert model_fingerprint(BlackBox(f, fingerprint="api-v1")) == model_fingerprint(BlackBox(f, fingerprint="api-v1"))
    assert "queries=64" in repr(wrapped)


def test_bad_oracle_arguments_and_answers(digits_model) -> None:
    model, x, _ = digits_model
    with pytest.raises(InputError, match="callable"):
        BlackBox(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="returns"):
        BlackBox(model, returns="scores")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="num_classes"):
        BlackBox(model, returns="labels")
    with pytest.raises(InputError, match="budget"):
        BlackBox(model, budget=0)
    with pytest.raises(InputError, match="sample_budget"):
        BlackBox(model, sample_budget=-3)
    with pytest.raises(InputError, match="batch_size"):
        BlackBox(model, batch_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="already a BlackBox"):
        BlackBox(BlackBox(model))
    with pytest.raises(InputError, match="floating-point"):
        BlackBox(model)(torch.zeros(3, 64, dtype=torch.long))
    cases = [
        (lambda t: torch.zeros(t.shape[0]), "logits", r"two scores"),
        (lambda t: torch.full((t.shape[0], 10), math.nan), "logits", "NaN"),
        (lambda t: torch.full((t.shape[0], 10), 2.0), "probabilities", r"outside \[0, 1\]"),
        (lambda t: torch.zeros(t.shape[0] + 1, 10), "logits", "shape"),
        (lambda t: torch.full((t.shape[0],), 12), "labels", "outside the 10 classes"),
        (lambda t: torch.full((t.shape[0],), 1.5), "labels", "whole numbers"),
        (lambda t: "nope", "logits", "not an array|shape"),
    ]
    for fn, returns, message in cases:
        oracle = BlackBox(fn, returns=returns, num_classes=10)  # type: ignore[arg-type]
        with pytest.raises(ModelError, match=message):
            oracle.labels(x[:4])
    changing = BlackBox(lambda t: torch.zeros(t.shape[0], 10 if t.shape[0] > 2 else 5))
    changing(x[:4])
    with pytest.raises(ModelError, match="expected 10"):
        changing(x[:2])
