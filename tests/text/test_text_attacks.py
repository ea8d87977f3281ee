"""Every text attack stays in its threat model, re-verifies success, and beats random substitution."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bastion.errors import InputError
from bastion.text import (
    DeepWordBug,
    HotFlip,
    RandomSubstitution,
    TextBugger,
    TextFooler,
    TextThreat,
    attack_texts,
    train_text_classifier,
)
from bastion.text.training import substitute_randomly
from bastion.threat import LpBall


def _threats(small):
    return {
        "syn": small.synonyms,
        "typo": TextThreat.typos(max_fraction=0.25),
        "bugs": TextThreat.bugs(small.vectors, max_fraction=0.25),
    }


CASES = [
    (TextFooler(), "syn"),
    (HotFlip(), "syn"),
    (HotFlip(beam_width=3), "syn"),
    (DeepWordBug(), "typo"),
    (DeepWordBug(scoring="replace1", transform="all"), "typo"),
    (TextBugger(), "bugs"),
    (TextBugger(importance="deletion"), "bugs"),
]


@pytest.mark.parametrize(("attack", "tkey"), CASES, ids=[repr(a) for a, _ in CASES])
def test_attack_in_threat_and_reverified(small_text, attack, tkey) -> None:
    threat = _threats(small_text)[tkey]
    data = small_text.test.subset(slice(0, 60))
    res = attack(small_text.model, data.tokens, data.labels, threat=threat, seed=0)
    labels = torch.tensor(data.labels)
    assert torch.equal(res.attacked, small_text.model.predict_tokens(data.tokens) == labels)
    broken = (res.success & res.attacked).nonzero().squeeze(1).tolist()
    assert len(broken) >= 0.1 * int(res.attacked.sum()), f"{attack!r} broke only {len(broken)} sentences"
    pred = small_text.model.predict_tokens(res.adversarial)
    assert torch.equal(pred != labels, res.success)  # success is the model's own verdict on the output
    for j in range(len(data)):
        assert threat.contains(res.original[j], res.adversarial[j]), threat.violations(
            res.original[j], res.adversarial[j]
        )
        if not bool(res.success[j]):
            assert res.adversarial[j] == res.original[j]
    for j in broken:
        assert 1 <= int(res.words_changed[j]) <= threat.budget(len(res.original[j]))
    assert bool((res.queries >= 1).all()) and all(int(res.queries[j]) >= 2 for j in broken)
    assert (int(res.grad_calls.sum()) > 0) == attack.uses_gradients


def test_textfooler_beats_random_at_equal_queries(small_text) -> None:
    data = small_text.test.subset(slice(0, 120))
    tf = TextFooler()(small_text.model, data.tokens, data.labels, threat=small_text.synonyms)
    q = math.ceil(float(tf.queries[tf.attacked].float().mean()))
    rnd = RandomSubstitution(queries=q)(small_text.model, data.tokens, data.labels, threat=small_text.synonyms,
                                        max_queries=q)  # fmt: skip
    assert float(rnd.queries[rnd.attacked].float().mean()) <= q + 2
    assert tf.success_rate > rnd.success_rate + 0.1, (tf.success_rate, rnd.success_rate)


def test_hotflip_beats_random_at_equal_queries(small_text) -> None:
    data = small_text.test.subset(slice(0, 120))
    hf = HotFlip()(small_text.model, data.tokens, data.labels, threat=small_text.synonyms)
    q = math.ceil(float(hf.queries[hf.attacked].float().mean()))
    rnd = RandomSubstitution(queries=q)(small_text.model, data.tokens, data.labels, threat=small_text.synonyms,
                                        max_queries=q)  # fmt: skip
    assert hf.success_rate > rnd.success_rate + 0.1, (hf.success_rate, rnd.success_rate)


def test_max_queries_is_enforced(small_text) -> None:
    data = small_text.test.subset(slice(0, 30))
    res = TextFooler()(small_text.model, data.tokens, data.labels, threat=small_text.synonyms, max_queries=5)
    assert int(res.queries.max()) <= 5 + 2  # + the clean query and the re-verification


def test_substitute_randomly_stays_in_threat(small_text) -> None:
    import random

    rng = random.Random(0)
    for toks in small_text.test.tokens[:50]:
        assert small_text.synonyms.contains(toks, substitute_randomly(toks, small_text.synonyms, 0.9, rng))


def test_adversarial_training_lowers_asr(small_text) -> None:
    """Worst-of-k substitution training cuts TextFooler's success on the same data by a quarter or more."""
    threat = small_text.synonyms
    std = small_text.model
    adv = train_text_classifier(small_text.train, arch="bow", vectors=small_text.vectors, epochs=3, seed=0,
                                augment="worst", threat=threat, worst_of=3)  # fmt: skip
    data = small_text.test.subset(slice(0, 120))
    asr_std = TextFooler()(std, data.tokens, data.labels, threat=threat).success_rate
    asr_adv = TextFooler()(adv, data.tokens, data.labels, threat=threat).success_rate
    assert asr_adv < 0.75 * asr_std, (asr_std, asr_adv)


def test_attack_texts_store_resumes(small_text, tmp_path) -> None:
    data = small_text.test.subset(slice(0, 24))
    store = tmp_path / "s.db"
    calls = []
    atk = TextFooler()
    real = atk.run

    def counting(ctx):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt  # a kill in the middle of the second batch
        return real(ctx)

    atk.run = counting  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        attack_texts(atk, small_text.model, data, threat=small_text.synonyms, store=store, batch_size=8, progress=False)
    first = len(calls)
    atk.run = real  # type: ignore[method-assign]
    summary = attack_texts(atk, small_text.model, data, threat=small_text.synonyms, store=store, batch_size=8,
                           progress=False)  # fmt: skip
    fresh = attack_texts(TextFooler(), small_text.model, data, threat=small_text.synonyms, store=None, batch_size=8,
                         progress=False)  # fmt: skip
    assert first == 9 and summary.n == 24 and summary.run_id is not None
    assert summary.success_rate == fresh.success_rate and summary.attacked == fresh.attacked
    assert summary.mean_words_changed == fresh.mean_words_changed


# ----------------------------------------------------------------------------------------------- bad input
def test_image_model_given_text(small_text) -> None:
    with pytest.raises(InputError, match=r"not a bastion\.text\.TextClassifier"):
        TextFooler()(nn.Linear(64, 10), ["a good film"], [1], threat=small_text.synonyms)


@pytest.mark.parametrize(
    ("texts", "labels", "match"),
    [
        ([""], [0], "no word token"),
        (["!!!"], [0], "no word token"),
        ([], [], "empty"),
        ("a single string", [0], "single str"),
        ([3], [0], "int"),
        ([torch.rand(3, 8, 8)], [0], "image tensor"),
        (torch.rand(2, 3), [0, 1], "list of str"),
        (["good", "bad"], [0], "2 sentences but 1 labels"),
        (["good"], [7], r"\[0, 2\)"),
        (["good"], [0.5], "list of int"),
    ],
)
def test_bad_input(small_text, texts, labels, match) -> None:
    with pytest.raises(InputError, match=match):
        TextFooler()(small_text.model, texts, labels, threat=small_text.synonyms)


def test_wrong_threat(small_text) -> None:
    with pytest.raises(InputError, match="TextThreat"):
        TextFooler()(small_text.model, ["good"], [1], threat=LpBall("linf", 0.1))
    with pytest.raises(InputError, match="no substitutions"):
        TextFooler()(small_text.model, ["good"], [1], threat=TextThreat.typos())
    with pytest.raises(InputError, match="char_edits=0"):
        DeepWordBug()(small_text.model, ["good"], [1], threat=small_text.synonyms)
    with pytest.raises(InputError, match="scoring"):
        DeepWordBug(scoring="nope")
    with pytest.raises(InputError, match="beam_width"):
        HotFlip(beam_width=0)
