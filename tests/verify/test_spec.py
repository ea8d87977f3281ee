"""Specifications: violation checks on known points, merging, and the local-robustness spec against argmax."""

from __future__ import annotations

import pytest
import torch

from bastion.errors import InputError
from bastion.threat import LpBall
from bastion.verify.spec import Region, Spec


def two_region_spec() -> Spec:
    # region 0: x in [0,1]^2, unsafe if y0 >= y1 (i.e. y1 - y0 <= 0) or y2 <= -1
    # region 1: x in [2,3]x[0,1], unsafe if y0 + y1 <= 0.5 and y2 >= 0
    r0 = Region(
        torch.zeros(2),
        torch.ones(2),
        [
            (torch.tensor([[-1.0, 1.0, 0.0]]), torch.tensor([0.0])),
            (torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([-1.0])),
        ],
    )
    r1 = Region(
        torch.tensor([2.0, 0.0]),
        torch.tensor([3.0, 1.0]),
        [(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, -1.0]]), torch.tensor([0.5, 0.0]))],
    )
    return Spec([r0, r1], num_outputs=3)


def test_violated_on_known_points() -> None:
    spec = two_region_spec()
    assert spec.input_shape == (2,) and spec.num_inputs == 2
    x = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [2.5, 1.0], [2.5, 1.0], [1.5, 0.5], [0.0, 1.0]])
    y = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # region 0, y0 >= y1: violated
            [0.0, 1.0, 0.0],  # region 0, y1 > y0 and y2 > -1: safe
            [0.0, 1.0, -1.0],  # region 0, y2 <= -1 (on the boundary): violated
            [0.25, 0.25, 0.0],  # region 1, both rows hold (boundaries): violated
            [0.25, 0.5, 0.0],  # region 1, y0 + y1 > 0.5: safe
            [9.0, 0.0, -9.0],  # in no box: safe whatever the output
            [0.3, 0.3, 5.0],  # corner of box 0, tie y0 == y1: violated
        ]
    )
    assert spec.violated(x, y).tolist() == [True, False, True, True, False, False, True]


def test_violated_accepts_shaped_inputs_and_checks_sizes() -> None:
    spec = two_region_spec().with_input_shape((1, 2))
    assert spec.violated(torch.tensor([[[0.5, 0.5]]]), torch.tensor([[1.0, 0.0, 0.0]])).tolist() == [True]
    with pytest.raises(InputError, match="features"):
        spec.with_input_shape((3,))
    with pytest.raises(InputError, match="outputs"):
        spec.violated(torch.zeros(1, 2), torch.zeros(1, 4))


def test_empty_output_constraint_means_every_output_is_unsafe() -> None:
    spec = Spec([Region(torch.zeros(1), torch.ones(1), [(torch.zeros(0, 2), torch.zeros(0))])], 2)
    assert spec.violated(torch.tensor([[0.5], [1.5]]), torch.randn(2, 2)).tolist() == [True, False]
    assert not Spec([], 2, (1,)).violated(torch.zeros(3, 1), torch.zeros(3, 2)).any()


def test_merge_regions_sharing_a_box() -> None:
    a = (torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]))
    b = (torch.tensor([[0.0, 1.0]]), torch.tensor([0.0]))
    spec = Spec(
        [Region(torch.zeros(1), torch.ones(1), [a]), Region(torch.ones(1), 2 * torch.ones(1), [a]),
         Region(torch.zeros(1), torch.ones(1), [b])],
        2,
    )  # fmt: skip
    merged = spec.merged()
    assert len(merged.regions) == 2 and len(merged.regions[0].unsafe) == 2
    x = torch.rand(200, 1) * 3
    y = torch.randn(200, 2)
    assert torch.equal(merged.violated(x, y), spec.violated(x, y))


def test_region_validation() -> None:
    with pytest.raises(InputError, match="empty region"):
        Region(torch.ones(2), torch.zeros(2))
    with pytest.raises(InputError, match="A must be"):
        Region(torch.zeros(2), torch.ones(2), [(torch.zeros(2), torch.zeros(2))])
    with pytest.raises(InputError, match="columns"):
        Spec([Region(torch.zeros(2), torch.ones(2), [(torch.zeros(1, 3), torch.zeros(1))])], 2)


def test_robustness_spec_agrees_with_argmax() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 2, 3)
    spec = Spec.robustness(x, 2, LpBall("linf", 0.1), num_classes=4)
    assert spec.input_shape == (1, 2, 3) and len(spec.regions) == 1
    region = spec.regions[0]
    torch.testing.assert_close(region.lower, (x.reshape(-1) - 0.1).clamp(0, 1))
    torch.testing.assert_close(region.upper, (x.reshape(-1) + 0.1).clamp(0, 1))
    xs = (x + (torch.rand(500, 1, 2, 3) - 0.5) * 0.2).clamp(0, 1)  # inside the ball
    y = torch.randn(500, 4)
    y[:10] = torch.tensor([0.0, 1.0, 1.0, -1.0])  # ties with the label count as violations
    expected = (y[:, [0, 1, 3]] >= y[:, 2:3]).any(dim=1)
    assert torch.equal(spec.violated(xs, y), expected)
    assert expected[:10].all() and (~expected).any()
    far = x + 0.5
    assert not spec.violated(far, torch.tensor([[9.0, 0.0, 0.0, 0.0]])).any()


def test_robustness_spec_rejects_bad_arguments() -> None:
    x = torch.rand(4)
    with pytest.raises(InputError, match="linf"):
        Spec.robustness(x, 0, LpBall("l2", 0.1), num_classes=3)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="label"):
        Spec.robustness(x, 3, LpBall("linf", 0.1), num_classes=3)
    with pytest.raises(InputError, match="NaN"):
        Spec.robustness(torch.tensor([float("nan")]), 0, LpBall("linf", 0.1), num_classes=3)


def test_violation_is_decided_in_float64() -> None:
    # 0.1 is not a float32; its nearest float32 lies just above it, so that point is outside [0, 0.1]
    spec = Spec([Region(torch.tensor([0.0], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64), [])], 1)
    spec.regions[0].unsafe.append((torch.zeros(0, 1), torch.zeros(0)))
    x32 = torch.tensor([[0.1]], dtype=torch.float32)
    assert not spec.violated(x32, torch.zeros(1, 1)).any()
    assert spec.violated(torch.tensor([[0.1]], dtype=torch.float64), torch.zeros(1, 1)).all()
