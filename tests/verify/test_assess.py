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
    with pytest.raises(InputError, match="complete"):
        assess(model, data, threat, complete="nope", progress=False)
    with pytest.raises(InputError, match="norms"):
        assess(model, data, LpBall("l2", 0.5), complete="deepgo", progress=False)
    with pytest.raises(InputError, match="sound Lipschitz"):
        assess(model, data, threat, complete="deepgo", complete_options={"lipschitz": "estimate"}, progress=False)
    with pytest.raises(InputError, match="unknown estimate"):
        assess(model, data, threat, estimates=["clever", "nope"], progress=False)
    with pytest.raises(InputError, match="norms"):
        assess(model, data, LpBall("l1", 1.0), estimates=["splitting"], progress=False)
    with pytest.raises(InputError, match="not among the estimates"):
        assess(model, data, threat, estimates=["clever"], estimate_options={"splitting": {}}, progress=False)
    with pytest.raises(InputError, match="fixes itself"):
        assess(model, data, threat, estimates=["clever"], estimate_options={"clever": {"norm": "l2"}}, progress=False)
    with pytest.raises(InputError, match="norms"):
        assess(model, data, LpBall("l0", 3), attack=[PGD()], progress=False)
    with pytest.raises(InputError, match="max_subsett"):
        assess(model, data, LpBall("l0", 3), complete_options={"max_subsett": 2}, progress=False)
    with pytest.raises(InputError, match="n_batch"):
        assess(model, data, threat, estimates=["clever"], estimate_options={"clever": {"n_batch": 2}}, progress=False)


def test_deepgo_as_the_complete_stage_is_sound_and_agrees_with_branch_and_bound() -> None:
    model = _small_net(0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    threat = LpBall("linf", 0.06)
    common = dict(attack=[PGD(steps=10)], minimal_attack=None, radius=False, methods=["ibp"], progress=False)
    go = assess(model, (x, y), threat, budget=5.0, complete="deepgo", **common)  # type: ignore[arg-type]
    _check_result(go, model, x, y, threat)
    assert go.decided_by.get("complete", 0) >= 3, go.decided_by
    bab = assess(model, (x, y), threat, budget=5.0, complete="bab", **common)  # type: ignore[arg-type]
    exact = {r.index: r.status for r in bab.records}
    for r in go.records:
        # both are sound: where each decides, they agree (no sample proven by one and broken by the other)
        if r.status != "unknown" and exact[r.index] != "unknown":
            assert r.status == exact[r.index], (r, exact[r.index])
    assert sum(r.status != "unknown" for r in go.records) >= 12


def test_l0_threat_runs_the_l0_tre_stage() -> None:
    from bastion.verify.globalopt.l0 import l0_robustness

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
    x = torch.rand(10, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one clean misclassification
    threat = LpBall("l0", 1)
    res = assess(model, (x, y), threat, budget=1.0, complete_options={"max_subset": 2}, progress=False)
    _check_result(res, model, x, y, threat)
    assert any("l0" in note for note in res.notes)  # no incomplete verifier for l0
    bounds = l0_robustness(model, x[1:], y[1:], max_subset=2, feature="element")
    for rec in res.records[1:]:
        j = rec.index - 1
        # the record's bracket is L0-TRE's: certified radius L - 1, found distance its upper bound
        assert rec.certified == float(bounds.certified_radius[j])
        assert rec.extra["l0_lower"] == int(bounds.lower[j]) and rec.queries is not None and rec.queries > 0
        if rec.status == "falsified":
            assert res.counterexamples[rec.index].ne(x[rec.index]).sum() <= 1
    assert {r.status for r in res.records[1:]} != {"unknown"}


def test_estimates_are_extra_columns_and_splitting_violations_falsify(tmp_path) -> None:
    # a linear classifier: CLEVER's score equals the exact l2 distance margin / ||w_y - w_j||
    w = torch.tensor([[1.0, 0.0, 0.5], [-1.0, 0.5, 0.0]])
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    model[0].weight.data.copy_(w)
    model[0].bias.data.copy_(torch.tensor([0.1, -0.1]))
    g = torch.Generator().manual_seed(0)
    x = 0.4 + 0.2 * torch.rand(6, 3, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    threat = LpBall("l2", 0.3)
    opts = {
        "clever": {"n_batches": 20, "batch_size": 64, "radius": 0.5},
        "splitting": {"n_particles": 200, "mh_steps": 10},
    }
    res = assess(model, (x, y), threat, budget=0.0, attack=[PGD(steps=5)], minimal_attack=None, methods=["crown"],
                 estimates=["clever", "splitting"], estimate_options=opts, radius=False, store=tmp_path / "a.db",
                 progress=False)  # fmt: skip
    _check_result(res, model, x, y, threat)
    diff = (w[0] - w[1]).norm()
    exact = (logits.max(1).values - logits.min(1).values) / diff
    for rec in res.records:
        assert rec.extra["clever"] == pytest.approx(min(float(exact[rec.index]), 0.5), rel=0.05)
        assert rec.extra["log_p"] <= 0.0 and rec.queries is not None and rec.queries > 1 + 20 * 64
        if math.isinf(rec.extra["log_p"]):
            assert rec.status != "falsified" or rec.attack != "splitting"
    assert res.estimates["clever"] > 0 and "log10_p" in res.estimates
    with Store(tmp_path / "a.db") as store:
        (run,) = store.runs()
        assert [r.extra for r in store.records(run.id)] == [r.extra for r in sorted(res.records, key=lambda r: r.index)]
    # a ball that reaches the boundary: splitting evaluates violations, which falsify the samples it finds them for
    wide = LpBall("l2", 2.0)
    res = assess(model, (x, y), wide, budget=0.0, attack=[], minimal_attack=None, methods=[], estimates=["splitting"],
                 estimate_options={"splitting": opts["splitting"]}, radius=False, progress=False)  # fmt: skip
    _check_result(res, model, x, y, wide)
    assert res.decided_by.get("splitting", 0) == x.shape[0]
