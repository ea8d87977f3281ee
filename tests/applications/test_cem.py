"""Contrastive explanations (CEM, Dhurandhar et al., NeurIPS 2018) on the digits MLP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bastion.applications import CEM, autoencoder_from_vae
from bastion.errors import InputError
from bastion.models import BlackBox
from bastion.store import Store


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
def explained(digits_mlp64):
    model, x, _ = digits_mlp64
    with one_thread():
        return model, x[:12], CEM(steps=100, c_steps=3).explain(model, x[:12], progress=False)


def test_pertinent_negatives_change_the_class(explained) -> None:
    model, x, res = explained
    assert res.pn is not None and res.pn_delta is not None and res.pn_found is not None
    assert float(res.pn_found.float().mean()) >= 0.9
    # only additions, inside the domain
    assert float(res.pn_delta.min()) >= 0 and float(res.pn.max()) <= 1 + 1e-6
    assert torch.allclose(res.pn, x + res.pn_delta)
    # re-predicted: every PN reported found is classified differently from the input
    with torch.no_grad():
        pred = model(res.pn).argmax(dim=1)
    assert torch.equal(pred, res.pn_pred)
    assert bool((pred[res.pn_found] != res.clean_pred[res.pn_found]).all())
    # sparse: far fewer features than the whole image are switched on
    assert res.summary()["pn_support"] < 0.35


def test_pertinent_positives_keep_the_class_with_a_sparse_part(explained) -> None:
    model, x, res = explained
    assert res.pp is not None and res.pp_found is not None
    assert float(res.pp_found.float().mean()) >= 0.9
    # a part of the input: every feature between the absent value and the input's own
    assert float(res.pp.min()) >= 0 and bool((res.pp <= x + 1e-6).all())
    with torch.no_grad():
        pred = model(res.pp).argmax(dim=1)
    assert torch.equal(pred, res.pp_pred)
    assert bool((pred[res.pp_found] == res.clean_pred[res.pp_found]).all())
    s = res.summary()
    assert s["pp_support"] < 0.5 * s["input_support"]  # much sparser than the input


def test_the_autoencoder_term_keeps_explanations_closer_to_the_data(digits_mlp64) -> None:
    from bastion.reliability.vae import train_vae

    model, x, _ = digits_mlp64
    torch.manual_seed(0)
    vae = train_vae(x, epochs=15, hidden=(64,), progress=False)
    ae = autoencoder_from_vae(vae)
    plain = CEM(mode="PN", steps=60, c_steps=2).explain(model, x[:8], progress=False)
    guided = CEM(mode="PN", steps=60, c_steps=2, autoencoder=ae).explain(model, x[:8], progress=False)

    def recon(t: torch.Tensor) -> float:
        with torch.no_grad():
            return float((t - ae(t)).flatten(1).square().sum(dim=1).mean())

    assert guided.pn_found is not None and bool(guided.pn_found.any())
    assert plain.pn is not None and guided.pn is not None
    assert recon(guided.pn) < recon(plain.pn)


def test_cem_writes_the_store_and_resumes(digits_mlp64, tmp_path: Path) -> None:
    model, x, _ = digits_mlp64
    path = tmp_path / "cem.db"
    first = CEM(mode="PP", steps=20, c_steps=1).explain(model, x[:4], store=path, progress=False, batch_size=2)
    with Store(path) as store:
        (run,) = store.runs()
        assert run.kind == "explain" and run.status == "complete" and run.n_records == 4
        recs = store.records(run.id, "cem:PP")
        assert [bool(r.extra["found"]) for r in recs] == first.pp_found.tolist()
    again = CEM(mode="PP", steps=20, c_steps=1).explain(model, x[:4], store=path, progress=False, batch_size=2)
    assert again.run_id == first.run_id and again.pp_found.tolist() == first.pp_found.tolist()
    assert first.computed is not None and bool(first.computed.all())
    assert again.computed is not None and not bool(again.computed.any())  # nothing was optimised again


def test_bad_input_is_refused(digits_mlp64) -> None:
    model, x, _ = digits_mlp64
    with pytest.raises(InputError, match="white-box"):
        CEM(steps=1).explain(BlackBox(model), x[:2], progress=False)
    with pytest.raises(InputError, match="mode"):
        CEM(mode="PX")
    with pytest.raises(InputError, match="kappa"):
        CEM(kappa=-1.0)
    with pytest.raises(InputError):
        CEM(steps=1).explain(model, x[:2] + 2.0, progress=False)  # outside the domain
    with pytest.raises(InputError, match="autoencoder"):
        CEM(autoencoder=3)  # type: ignore[arg-type]
