"""assess: attack -> certify -> complete search; the bracket certified <= found, fractions, re-verification, resume."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor, nn

from bastion.attacks import FAB, PGD
from bastion.errors import InputError
from bastion.store import Store
from bastion.threat import LpBall
from bastion.verify.assess import AssessResult, assess
from bastion.verify.bounds import BoundOptions

# bastion.verify re-exports the function assess under the module's name, which `import ... as` would pick up
assess_mod = importlib.import_module("bastion.verify.assess")

FAST = BoundOptions(alpha_steps=5)


def _check_result(res: AssessResult, model: nn.Module, x: Tensor, y: Tensor, threat: LpBall) -> None:
    """Every property the pipeline promises, sample by sample."""
    assert res.n == x.shape[0] == len(res.records)
    assert sum(res.fractions.values()) == pytest.approx(1.0)
    assert sum(res.decided_by.values()) == sum(r.status != "unknown" for r in res.records)
    eps = threat.eps
    with torch.no_grad():
        pred = model(x).argmax(1)
    for rec in res.records:
        i = rec.index
        assert rec.clean_pred == int(pred[i]) and rec.label == int(y[i])
        if rec.certified is not None and rec.adv_distance is not None:
            # a certified radius is a lower bound of the minimal adversarial distance, a found example an upper one
            assert rec.certified <= rec.adv_distance * (1 + 1e-5) + 1e-7, rec
        if rec.clean_pred != rec.label:
            assert rec.status == "falsified" and rec.adv_distance == 0.0 and rec.attack == "clean"
            continue
        if rec.status == "robust":
            assert rec.certified is not None and rec.certified >= eps
            assert rec.adv_distance is None or rec.adv_distance > eps
        elif rec.status == "falsified":
            assert rec.adv_distance is not None and rec.adv_distance <= eps * (1 + 1e-5) + 1e-6
            cex = res.counterexamples[i].reshape(1, *x.shape[1:])
            with torch.no_grad():
                assert int(model(cex).argmax(1)[0]) != rec.label, "a reported counterexample does not re-execute"
            assert bool(threat.contains(cex, x[i : i + 1])[0])
            assert threat.distance(cex, x[i : i + 1])[0] == pytest.approx(rec.adv_distance, rel=1e-5, abs=1e-7)
        else:
            assert rec.certified is None or rec.certified < eps
            assert rec.adv_distance is None or rec.adv_distance > eps


def test_bracket_fractions_and_reverification(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    wrong = (model(x).argmax(1) != y).nonzero().squeeze(1)[:2]
    sel = torch.cat([wrong, torch.arange(24)])
    x, y = x[sel], y[sel]
    threat = LpBall("linf", 0.1)
    res = assess(
        model, (x, y), threat, budget=1.0, attack=[PGD(steps=20)], minimal_attack=FAB(steps=30),
        options=FAST, progress=False,
    )  # fmt: skip
    _check_result(res, model, x, y, threat)
    assert res.fractions["falsified"] > 0 and res.fractions["robust"] > 0
    assert res.decided_by["clean"] == 2
    # the minimal attack gives a found distance for (nearly) every correctly classified sample
    assert sum(r.adv_distance is not None for r in res.records) >= 20
    # robust samples resist a stronger attack than the pipeline's
    robust = torch.tensor([r.index for r in res.records if r.status == "robust"])
    strong = PGD(steps=100, restarts=3, rel_stepsize=0.1)(model, x[robust], y[robust], threat=threat, seed=1)
    assert not bool(strong.success.any())
    assert "robust" in res.table() and res.to_dict()["fractions"] == res.fractions


def _small_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def test_complete_stage_decides_what_ibp_leaves() -> None:
    model = _small_net(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = LpBall("linf", 0.08)
    common = dict(attack=[PGD(steps=10)], minimal_attack=None, radius=False, progress=False)
    res = assess(model, (x, y), threat, budget=5.0, methods=["ibp"], **common)  # type: ignore[arg-type]
    _check_result(res, model, x, y, threat)
    assert not res.notes, res.notes  # linf: the complete stage always runs
    assert res.decided_by.get("complete", 0) >= 3, res.decided_by
    assert res.fractions["unknown"] == 0.0, "complete search on a 4-input network should decide every sample"
    crown = assess(model, (x, y), threat, budget=0.0, methods=["ibp", "crown"], **common)  # type: ignore[arg-type]
    by_index = {r.index: r for r in crown.records}
    for a in res.records:
        b = by_index[a.index]
        # the complete search agrees with every CROWN proof and every attack success
        if b.status == "robust":
            assert a.status == "robust"
        if b.status == "falsified":
            assert a.status == "falsified"
    robust = torch.tensor([r.index for r in res.records if r.status == "robust"])
    strong = PGD(steps=200, restarts=5, rel_stepsize=0.1)(model, x[robust], y[robust], threat=threat, seed=3)
    assert not bool(strong.success.any()), "an attack broke a sample the complete search proved robust"


def test_l2_without_complete_search(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    x, y = x[:12], y[:12]
    threat = LpBall("l2", 0.5)
    res = assess(model, (x, y), threat, budget=1.0, attack=[PGD(steps=20)], minimal_attack=FAB(steps=30),
                 methods=["crown"], progress=False)  # fmt: skip
    _check_result(res, model, x, y, threat)
    assert any("l2" in note for note in res.notes)


def test_assess_resumes_after_interruption(digits_mlp64, tmp_path, monkeypatch) -> None:
    model, x, y = digits_mlp64
    data = (x[:12], y[:12])
    threat = LpBall("linf", 0.1)
    kwargs = dict(
        budget=0.0,
        attack=[PGD(steps=10)],
        minimal_attack=FAB(steps=20),
        methods=["ibp", "crown"],
        batch_size=4,
        progress=False,
    )
    reference = assess(model, data, threat, **kwargs)  # type: ignore[arg-type]
    real = assess_mod._assess_batch
    calls: list[int] = []
    interrupt = [True]

    def flaky(*args, **kwargs):
        calls.append(int(args[4][0]))
        if len(calls) == 2 and interrupt[0]:
            raise KeyboardInterrupt  # as a user's Ctrl-C during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(assess_mod, "_assess_batch", flaky)
    path = tmp_path / "runs.db"
    with pytest.raises(KeyboardInterrupt):
        assess(model, data, threat, store=path, **kwargs)  # type: ignore[arg-type]
    calls.clear()
    interrupt[0] = False
    resumed = assess(model, data, threat, store=path, **kwargs)  # type: ignore[arg-type]
    assert calls == [4, 8]
    got = sorted(resumed.records, key=lambda r: r.index)
    want = sorted(reference.records, key=lambda r: r.index)
    for a, b in zip(got, want, strict=True):
        assert (a.index, a.status, a.attack) == (b.index, b.status, b.attack)
        assert a.certified == pytest.approx(b.certified, rel=1e-6)
        assert (a.adv_distance is None) == (b.adv_distance is None)
    assert resumed.fractions == pytest.approx(reference.fractions)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.kind == "assess" and run.status == "complete" and run.n_records == 12


def test_bad_inputs(digits_mlp64) -> None:
    model, x, y = digits_mlp64
    data = (x[:4], y[:4])
    threat = LpBall("linf", 0.1)
    with pytest.raises(InputError, match="budget"):
        assess(model, data, threat, budget=-1, progress=False)
    with pytest.raises(InputError, match="budget"):
        assess(model, data, threat, budget=math.inf, progress=False)
    with pytest.raises(InputError, match="minimal"):
        assess(model, data, threat, minimal_attack=PGD(), progress=False)
    with pytest.raises(InputError, match="unknown bound method"):
        assess(model, data, threat, methods=["ibp", "nope"], progress=False)
    with pytest.raises(InputError, match="preset"):
        assess(model, data, threat, attack="nope", progress=False)
    with pytest.raises(InputError, match="norms"):
        assess(model, data, LpBall("l0", 3), progress=False)
