"""The named cascades (``standard``, ``fast``, ``rapid``): budgets, strength against their members, counted work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bastion.attacks import make_attack
from bastion.attacks.presets import PRESETS, preset, preset_cost
from bastion.data import Dataset
from bastion.errors import InputError
from bastion.evaluate import evaluate
from bastion.threat import LpBall

#: the presets at a budget small enough for the test suite (same attacks, same order, same options otherwise)
SMALL = {
    "apgd": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 4},
    "fab-t": {"steps": 10, "n_target_classes": 4},
    "square": {"queries": 150},
}


@pytest.fixture(scope="module")
def setup(digits_mlp64) -> tuple[nn.Module, Dataset]:
    model, x, y = digits_mlp64
    return model, Dataset(x[:60], y[:60], num_classes=10, name="digits")


class PassCounter(nn.Module):
    """An independent count of the work done on a model: rows through forward, and rows of every gradient that
    flows back through the logits (a backward pass of one input per row and backward call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.passes = 0

    def _backward(self, grad: torch.Tensor) -> None:
        self.passes += grad.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.passes += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)
        return out


def test_fast_preset_is_torchattacks_default_budget() -> None:
    fast = dict(PRESETS["fast"])
    assert [n for n, _ in PRESETS["fast"]] == ["apgd", "apgd-t", "fab-t", "square"]
    assert fast["apgd"]["steps"] == fast["apgd-t"]["steps"] == fast["fab-t"]["steps"] == 10
    assert fast["apgd-t"]["n_target_classes"] == fast["fab-t"]["n_target_classes"] == 9
    assert fast["square"]["queries"] == 5000
    std = dict(PRESETS["standard"])
    assert std["apgd"]["steps"] == std["apgd-t"]["steps"] == std["fab-t"]["steps"] == 100
    assert std["square"]["queries"] == 5000
    assert preset_cost("standard")["total"] == 9719 and preset_cost("fast")["total"] == 5489
    assert preset_cost("rapid")["total"] == 2015
    assert "square" not in preset_cost("standard", norms=("l1",))
    assert preset_cost("standard", num_classes=4)["apgd-t"] == 3 * 201 + 2  # at most classes - 1 targets
    with pytest.raises(InputError, match="unknown attack preset"):
        preset_cost("quick")


CASCADES = [("standard", LpBall("linf", 0.05)), ("fast", LpBall("l2", 0.5))]


@pytest.mark.parametrize("name,threat", CASCADES, ids=[f"{n}-{t.key}" for n, t in CASCADES])
def test_cascade_is_never_weaker_than_any_member_alone(setup, name: str, threat: LpBall) -> None:
    model, data = setup
    cascade = preset(name, [threat.norm], SMALL)
    res = evaluate(model, data, threat, cascade, progress=False, checks=False)
    alone = {}
    for attack_name, opts in PRESETS[name]:
        member = make_attack(attack_name, **{**opts, **SMALL[attack_name]})
        alone[attack_name] = evaluate(model, data, threat, [member], progress=False, checks=False).worst_case
    for attack_name, worst in alone.items():
        assert res.worst_case[threat.key] <= worst[threat.key], (threat.key, attack_name)
    # and it does work: below the clean accuracy, and at or below the best member
    assert res.worst_case[threat.key] < res.clean_accuracy
    assert res.worst_case[threat.key] <= min(w[threat.key] for w in alone.values())


def test_reported_passes_match_an_independent_counter(setup) -> None:
    model, data = setup
    counter = PassCounter(model)
    threats = [LpBall("linf", 0.03), LpBall("linf", 0.08)]  # two radii: FAB-T's distances are shared
    res = evaluate(counter, data, threats, preset("standard", ["linf"], SMALL), batch_size=25, progress=False,
                   checks=False)  # fmt: skip
    assert res.passes == pytest.approx(counter.passes, rel=1e-9)
    assert res.passes > len(data)  # more than the clean forwards
    # never more than the documented most a sample can cost, per radius
    worst = preset_cost("standard", 10, ["linf"])
    small_total = sum(v for k, v in preset_cost_small().items() if k != "total")
    assert res.passes_per_sample <= len(threats) * small_total + 1
    assert worst["total"] > small_total
    assert f"{round(res.passes):,} forward-equivalent passes" in res.table()
    assert res.to_dict()["passes"] == round(res.passes)


def preset_cost_small() -> dict[str, int]:
    """The documented worst case of the SMALL budget (the same formula as preset_cost)."""
    return {
        "apgd": 2 * 10 + 1 + 2,
        "apgd-t": 4 * (2 * 10 + 1) + 2,
        "fab-t": 4 * 3 * 10 + 2,
        "square": 150 + 2,
    }


def test_passes_survive_a_resume(setup, tmp_path) -> None:
    model, data = setup
    cascade = preset("fast", ["linf"], SMALL)
    first = evaluate(model, data, LpBall("linf", 0.05), cascade, store=tmp_path / "r.db", progress=False,
                     checks=False)  # fmt: skip
    again = evaluate(model, data, LpBall("linf", 0.05), cascade, store=tmp_path / "r.db", progress=False,
                     checks=False)  # fmt: skip
    assert again.passes == pytest.approx(first.passes)  # recomputed from the stored records, nothing redone
