"""Fingerprinting (IPGuard, AsiaCCS 2021; conferrable adversarial examples, ICLR 2021) on digits models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bastion.applications import Conferrable, IPGuard, conferrability, match_rate, roc_auc, suspect_models, verify
from bastion.data import load_digits
from bastion.errors import InputError
from bastion.store import Store

#: The separation the tests require of copies and fine-tuned copies from independently trained models.
MIN_AUC = 0.9


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread for a module-scoped fixture (the suite's autouse fixture only covers the tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setting(digits_mlp64):
    model, _, _ = digits_mlp64
    train, test = load_digits().train_test_split(test_fraction=0.2, seed=0)
    with torch.random.fork_rng(), one_thread():
        suspects, roles = suspect_models(
            model, train, other_arch="mlp", n_independent=2, epochs=10, finetune_epochs=3, seed=3
        )
    return model, train, test, suspects, roles


def test_suspects_cover_the_derived_and_independent_models(setting) -> None:
    _, _, _, suspects, roles = setting
    assert {k for k, v in roles.items() if v} == {"copy", "fine-tuned", "pruned", "distilled"}
    assert sum(not v for v in roles.values()) == 4
    pruned = suspects["pruned"]
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, torch.nn.Linear))
    total = sum(m.weight.numel() for m in pruned.modules() if isinstance(m, torch.nn.Linear))
    assert zeros >= 0.45 * total


def test_ipguard_separates_copies_and_fine_tuned_copies_from_independent_models(setting) -> None:
    model, _, test, suspects, roles = setting
    fp = IPGuard(n=60, steps=300).generate(model, test)
    assert len(fp) >= 50
    # every point is re-verified on the source, lies in the domain, and sits close to a decision boundary
    with torch.no_grad():
        logits = model(fp.x)
    assert torch.equal(logits.argmax(dim=1), fp.labels)
    assert float(fp.x.min()) >= 0 and float(fp.x.max()) <= 1
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) < 1.0
    assert match_rate(fp, model) == 1.0
    keep = {n: r for n, r in roles.items() if n in ("copy", "fine-tuned") or not r}
    res = verify(fp, {n: suspects[n] for n in keep}, roles=keep, progress=False)
    assert res.auc is not None and res.auc >= MIN_AUC, res.table()
    rates = res.rates
    assert rates["copy"] == 1.0 and rates["fine-tuned"] > max(v for n, v in rates.items() if not keep[n])


def test_conferrable_examples_are_more_conferrable_than_pgd_examples(setting) -> None:
    from bastion.attacks import PGD
    from bastion.threat import LpBall

    model, train, test, _, _ = setting
    gen = Conferrable(n=30, candidates=60, steps=30, n_surrogates=2, n_references=2, epochs=5, seed=1)
    with torch.random.fork_rng():
        surrogates, references = gen.ensembles(model, train)
    fp = gen.generate(model, test, surrogates=surrogates, references=references)
    assert len(fp) >= 20
    # inside the l-inf ball around the seeds, adversarial for the source, ranked by conferrability
    seeds = test.x[fp.seeds]
    assert float((fp.x - seeds).abs().amax()) <= gen.eps + 1e-6
    assert float((fp.labels != model(seeds).argmax(dim=1)).float().mean()) == 1.0
    assert bool((fp.scores > 0).all()) and bool((fp.scores[:-1] >= fp.scores[1:]).all())
    assert torch.allclose(fp.scores, conferrability(fp.x, model, surrogates, references))
    # the baseline at equal budget: PGD examples from the same seeds, as many steps, the same ball
    pool = torch.randperm(len(test), generator=torch.Generator().manual_seed(gen.seed))[: gen.candidates]
    x0 = test.x[pool]
    y0 = model(x0).argmax(dim=1)
    pgd = PGD(steps=30)(model, x0, y0, threat=LpBall("linf", gen.eps))
    base = conferrability(pgd.x_adv[pgd.success], model, surrogates, references).sort(descending=True).values
    assert float(fp.scores.mean()) > float(base[: len(fp)].mean()) + 0.05  # PGD's most conferrable, as many
    assert match_rate(fp, model) == 1.0


@pytest.mark.slow
def test_conferrable_fingerprints_separate_derived_from_independent_models(setting) -> None:
    model, train, test, suspects, roles = setting
    fp = Conferrable(n=50, steps=50, seed=1).generate(model, test, train=train)
    res = verify(fp, suspects, roles=roles, progress=False)  # distilled and pruned copies included
    assert res.auc is not None and res.auc >= 0.75, res.table()
    assert res.rates["copy"] == 1.0


def test_threshold_from_references_and_the_store(setting, tmp_path: Path) -> None:
    model, _, test, suspects, _ = setting
    fp = IPGuard(n=30, steps=200).generate(model, test)
    refs = [suspects["independent-mlp-0"]]
    path = tmp_path / "fp.db"
    res = verify(fp, {"copy": suspects["copy"], "other": suspects["independent-mlp-1"]}, references=refs, store=path,
                 source=model, progress=False)  # fmt: skip
    assert res.threshold_from == "references" and res.threshold == pytest.approx(match_rate(fp, refs[0]))
    assert res.suspects[0].copy and res.auc is None
    with Store(path) as store:
        (run,) = store.runs()
        assert run.kind == "fingerprint" and run.n_records == 2 and run.status == "complete"
    again = verify(fp, {"copy": suspects["copy"], "other": suspects["independent-mlp-1"]}, references=refs,
                   store=path, source=model, progress=False)  # fmt: skip
    assert again.run_id == res.run_id and again.rates == res.rates


def test_conferrability_score_is_the_papers_product(setting) -> None:
    model, _, test, suspects, _ = setting
    x = test.x[:5]
    s = conferrability(x, model, [suspects["copy"]], [suspects["copy"]])
    with torch.no_grad():
        p = model(x).softmax(dim=1).amax(dim=1)
    assert torch.allclose(s, p * (1 - p), atol=1e-6)  # surrogate = reference = source: σ = p_t (1 - p_t)
    two = conferrability(x, model, [suspects["copy"], suspects["copy"]], [suspects["copy"], suspects["distilled"]])
    assert bool((two <= s + 1e-6).all())  # the max over references can only lower σ


def test_bad_input_is_refused(setting) -> None:
    model, _, test, _, _ = setting
    fp = IPGuard(n=5, steps=20).generate(model, test)
    with pytest.raises(InputError, match="positive"):
        roc_auc([], [0.1])
    assert roc_auc([0.9, 0.8], [0.1, 0.8]) == pytest.approx(0.875)
    with pytest.raises(InputError, match="not given"):
        verify(fp, {"a": model}, roles={"b": True}, progress=False)
    with pytest.raises(InputError, match="threshold"):
        verify(fp, {"a": model}, threshold=1.5, progress=False)
    with pytest.raises(InputError, match="non-empty"):
        verify(fp, {}, progress=False)
    with pytest.raises(InputError, match="k must"):
        IPGuard(k=-1)
    with pytest.raises(InputError, match="lambdas"):
        Conferrable(lambdas=(1.0, 1.0))
    with pytest.raises(InputError, match="train="):
        Conferrable().generate(model, test)
    with pytest.raises(InputError, match="Dataset"):
        IPGuard().generate(model, test.x)  # type: ignore[arg-type]
