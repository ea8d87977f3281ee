"""The Dataset container: construction checks, subsets, batching, splits and fingerprints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bastion.data import Dataset, load_digits
from bastion.errors import DataError, InputError


def make(n: int = 10, num_classes: int = 3, name: str = "toy") -> Dataset:
    x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 1, 2, 2) / (n * 4)
    y = torch.arange(n) % num_classes
    return Dataset(x, y, num_classes, name)


def test_construction_normalises_and_freezes() -> None:
    ds = Dataset(np.full((3, 2), 128, dtype=np.uint8), np.array([0, 1, 1], dtype=np.int32), 2, "u8")  # type: ignore[arg-type]
    assert isinstance(ds.x, torch.Tensor) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64
    assert torch.allclose(ds.x, torch.full((3, 2), 128 / 255))
    assert ds.domain == (0.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"  # type: ignore[misc]


def test_basic_properties_and_repr() -> None:
    ds = make()
    assert len(ds) == 10
    assert ds.feature_shape == (1, 2, 2)
    assert ds.class_counts().tolist() == [4, 3, 3]
    assert repr(ds) == "Dataset(name='toy', n=10, feature_shape=(1, 2, 2), num_classes=3, domain=(0.0, 1.0))"


def test_construction_validates_with_the_name_in_the_message() -> None:
    with pytest.raises(DataError, match=r"data set 'bad'.*outside the 2 classes"):
        Dataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]), 2, "bad")
    with pytest.raises(DataError, match=r"data set 'bad'.*input domain"):
        Dataset(torch.full((3, 2), 2.0), torch.tensor([0, 1, 1]), 2, "bad")
    with pytest.raises(DataError, match="name must be a string"):
        Dataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]), 2, 7)  # type: ignore[arg-type]


def test_subset_accepts_every_index_form() -> None:
    ds = make()
    expected = ds.x[[1, 3, 5]]
    for idx in ([1, 3, 5], np.array([1, 3, 5]), torch.tensor([1, 3, 5]), slice(1, 6, 2), [-9, -7, -5]):
        sub = ds.subset(idx)
        assert torch.equal(sub.x, expected), idx
        assert sub.y.tolist() == [1, 0, 2]
        assert sub.num_classes == 3 and sub.name == "toy"
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 3, 5]] = True
    assert torch.equal(ds.subset(mask).x, expected)
    assert torch.equal(ds.subset(mask.numpy()).x, expected)
    assert len(ds.subset([])) == 0
    assert torch.equal(ds.subset(slice(None, None, -1)).y, ds.y.flip(0))


def test_subset_rejects_bad_indices() -> None:
    ds = make()
    with pytest.raises(InputError, match="position 10, outside the 10 samples"):
        ds.subset([0, 10])
    with pytest.raises(InputError, match="integer positions"):
        ds.subset(torch.tensor([0.5]))
    with pytest.raises(InputError, match="boolean mask of length 3"):
        ds.subset(np.array([True, False, True]))
    with pytest.raises(InputError, match="single value"):
        ds.subset(3)  # type: ignore[arg-type]


def test_batches_cover_in_order() -> None:
    ds = make(10)
    seen = list(ds.batches(4))
    assert [len(i) for i, _, _ in seen] == [4, 4, 2]
    idx = torch.cat([i for i, _, _ in seen])
    assert idx.tolist() == list(range(10))
    assert torch.equal(torch.cat([x for _, x, _ in seen]), ds.x)
    assert torch.equal(torch.cat([y for _, _, y in seen]), ds.y)
    for i, x, y in seen:
        assert i.dtype == torch.int64
        assert torch.equal(x, ds.x[i]) and torch.equal(y, ds.y[i])


def test_batches_over_given_indices() -> None:
    ds = make(10)
    order = [7, 2, 9, 0, 4]
    got = list(ds.batches(2, indices=order))
    assert [i.tolist() for i, _, _ in got] == [[7, 2], [9, 0], [4]]
    assert torch.equal(got[0][1], ds.x[[7, 2]])
    assert list(ds.batches(3, indices=torch.tensor([], dtype=torch.int64))) == []
    assert [i.tolist() for i, _, _ in ds.batches(5, indices=np.array([3, 1]))] == [[3, 1]]
    with pytest.raises(InputError, match="batch_size"):
        next(ds.batches(0))
    with pytest.raises(InputError, match="outside"):
        next(ds.batches(2, indices=[11]))


def test_split() -> None:
    ds = make(10)
    first, rest = ds.split(3)
    assert len(first) == 3 and len(rest) == 7
    assert torch.equal(torch.cat([first.x, rest.x]), ds.x)
    assert first.name == "toy[:3]" and rest.name == "toy[3:]"
    empty, everything = ds.split(0)
    assert len(empty) == 0 and len(everything) == 10
    assert len(empty.fingerprint()) == 64
    for bad in (-1, 11, 2.5):
        with pytest.raises(InputError, match="n_first"):
            ds.split(bad)  # type: ignore[arg-type]


def test_train_test_split_is_stratified_deterministic_and_disjoint() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    x = torch.rand(100, 3, generator=torch.Generator().manual_seed(0))
    ds = Dataset(x, y, 3, "s")
    train, test = ds.train_test_split(0.2, seed=1)
    assert len(test) == 20 and len(train) == 80
    assert test.class_counts().tolist() == [10, 6, 4]
    assert train.name == "s (train)" and test.name == "s (test)"
    # Every sample lands in exactly one part: compare the multiset of rows.
    rows = torch.cat([train.x, test.x])
    assert torch.equal(rows[rows[:, 0].argsort()], x[x[:, 0].argsort()])

    again_train, again_test = ds.train_test_split(0.2, seed=1)
    assert torch.equal(again_test.x, test.x) and torch.equal(again_train.y, train.y)
    _, other = ds.train_test_split(0.2, seed=2)
    assert not torch.equal(other.x, test.x)
    assert other.class_counts().tolist() == [10, 6, 4]


def test_train_test_split_uneven_and_invalid() -> None:
    ds = make(7, num_classes=3)
    train, test = ds.train_test_split(0.3)
    assert len(test) == 3 and len(train) == 4
    for bad in (0.0, 1.0, -0.1, "x"):
        with pytest.raises(InputError, match="test_fraction"):
            ds.train_test_split(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="at least 2"):
        make(1, num_classes=1).train_test_split()


def test_fingerprint_is_stable_and_sensitive() -> None:
    ds = make(6)
    # A fixed digest: the fingerprint must not change between runs, processes or library versions.
    assert ds.fingerprint() == make(6).fingerprint() == FINGERPRINT_OF_MAKE_6
    assert len(ds.fingerprint()) == 64

    x2 = ds.x.clone()
    x2[3, 0, 1, 1] += 1e-3
    assert Dataset(x2, ds.y, 3, "toy").fingerprint() != ds.fingerprint()
    y2 = ds.y.clone()
    y2[0] = 2
    assert Dataset(ds.x, y2, 3, "toy").fingerprint() != ds.fingerprint()
    reshaped = Dataset(ds.x.reshape(6, 4), ds.y, 3, "toy")
    assert reshaped.fingerprint() != ds.fingerprint()
    # Metadata is deliberately not part of the fingerprint.
    assert Dataset(ds.x, ds.y, 5, "renamed").fingerprint() == ds.fingerprint()


FINGERPRINT_OF_MAKE_6 = "268feaa568e8d624466164d7475d95fb8d51d1cfa1200b83e4b30f1425941c77"


def test_load_digits() -> None:
    ds = load_digits()
    assert len(ds) == 1797
    assert ds.feature_shape == (1, 8, 8)
    assert ds.num_classes == 10 and ds.name == "digits"
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert int(ds.class_counts().min()) >= 170
    # Pins the exact values, so that reading the bundled table directly stays equal to scikit-learn's loader.
    assert ds.fingerprint() == DIGITS_FINGERPRINT


DIGITS_FINGERPRINT = "741401e07a5bbf52815cbee1156bd4c022b256a827bdf5a84f7f5fbf0cb0191e"


@pytest.mark.slow
def test_load_digits_fallback_through_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    import bastion.data.loaders as loaders

    monkeypatch.setattr(loaders, "_bundled_digits_table", lambda: None)
    assert load_digits().fingerprint() == DIGITS_FINGERPRINT
