"""Audio: the decibel threat model, PGD and C&W on a small waveform CNN, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from bastion.audio import AudioCW, DecibelBall, WaveformPGD, make_vowels, to_db
from bastion.errors import InputError
from bastion.models import build_model
from bastion.models.zoo import ModelError


@pytest.fixture(scope="module")
def vowels():
    from bastion.audio.demo import demo_audiocnn

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one-thread fixture
    try:
        model, test = demo_audiocnn(seconds=0.25, train_n=300, test_n=48, epochs=8, seed=0)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        ok = model(test.x).argmax(dim=1) == test.y
    assert int(ok.sum()) >= 36, "the test AudioCNN is too weak"
    return model, test.x[ok][:16], test.y[ok][:16]


def test_decibel_ball_geometry() -> None:
    x = make_vowels(4, seconds=0.1, seed=0).x
    threat = DecibelBall(-20.0)
    assert threat.eps == pytest.approx(0.1)
    peak = x.abs().flatten(1).amax(dim=1)
    assert torch.allclose(threat.radius(x), 0.1 * peak)
    far = x + 0.5 * torch.randn(x.shape)
    p = threat.project(far, x)
    assert bool(threat.contains(p, x).all()) and not bool(threat.contains(far, x).any())
    # dB of the projected perturbation: at the budget (the projection is onto the box's faces)
    assert torch.allclose(to_db(threat.distance(p, x)).float(), torch.full((4,), -20.0), atol=1e-3)
    assert bool((threat.distance(x, x) == 0).all())
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    assert bool(threat.contains(start, x).all())
    assert threat.key == "db:-20.0"


def test_pgd_at_minus_32_db_beats_noise_and_stays_inside(vowels) -> None:
    model, x, y = vowels
    threat = DecibelBall(-32.0)
    res = WaveformPGD(steps=40)(model, x, y, threat=threat)
    assert bool(threat.contains(res.x_adv, x).all())
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(dim=1) != y)
        noise = model(threat.random_start(x, torch.Generator().manual_seed(0))).argmax(dim=1) != y
    assert res.success_rate >= 0.3
    assert res.success_rate > float(noise.float().mean()) + 0.25
    louder = WaveformPGD(steps=40)(model, x, y, threat=DecibelBall(-20.0))
    assert louder.success_rate >= res.success_rate  # a larger budget is never worse


def test_cw_finds_quieter_examples_than_the_budget(vowels) -> None:
    model, x, y = vowels
    threat = DecibelBall(-20.0)
    res = AudioCW(steps=150, lr=2e-3, const=10.0)(model, x, y, threat=threat)
    assert bool(threat.contains(res.x_adv, x).all())
    with torch.no_grad():
        assert torch.equal(res.success, model(res.x_adv).argmax(dim=1) != y)
    assert res.success_rate >= 0.6
    db = to_db(res.distance[res.success])
    assert float(db.median()) < -23.0  # tau shrinks after each success: quieter than the -20 dB allowed


def test_bad_input_is_refused() -> None:
    model = build_model("audiocnn", (1, 2000), 10)
    x = make_vowels(2, seconds=0.25).x
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="mono waveforms"):
        WaveformPGD(steps=1)(model, torch.rand(2, 1, 8, 8), y, threat=DecibelBall())
    with pytest.raises(InputError, match="mono waveforms"):
        DecibelBall().project(x.repeat(1, 2, 1), x.repeat(1, 2, 1))
    with pytest.raises(InputError, match="DecibelBall"):
        from bastion.threat import LpBall

        WaveformPGD(steps=1)(model, x, y, threat=LpBall("linf", 0.01, domain=(-1, 1)))
    with pytest.raises(InputError, match="finite"):
        WaveformPGD(steps=1)(model, x, y, threat=DecibelBall(math.inf))
    with pytest.raises(InputError, match="decibels"):
        DecibelBall(float("nan"))
    with pytest.raises(InputError, match="mono waveforms"):
        model(torch.rand(2, 3, 2000))
    with pytest.raises(ModelError, match="T >= 256"):
        build_model("audiocnn", (1, 100), 10)
    with pytest.raises(InputError, match="classes"):
        make_vowels(4, classes=11)
