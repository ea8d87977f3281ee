"""The shared machinery of the text attacks: one ``__call__`` for all of them, and the resumable batch runner.

Why not :class:`bastion.attacks.base.Attack`: that base validates real-valued tensors against an input domain,
projects onto an l_p (or flow) set and measures distances with tensor norms; a sentence is a list of discrete
tokens, its threat set (:class:`~bastion.text.threat.TextThreat`) is a set of edit sequences, and projection has
no meaning there. :class:`TextAttack` follows the same contract in the discrete setting:

- validates the inputs (sentences, labels, model, threat) and raises :class:`~bastion.errors.InputError` on bad
  ones: an image model given text, an empty sentence, a wrong type, a threat that does not allow the attack's edits;
- puts the model in eval mode and restores it;
- skips samples the model already misclassifies (they count as successes with nothing changed, as in the image
  base);
- runs the attack's :meth:`TextAttack.run` per sample through a :class:`SampleContext` that counts every model
  query (one sentence scored = one query) and every gradient evaluation, and enforces ``max_queries``;
- then **checks the output against the threat set** (an output outside it is discarded, with a warning: nothing
  can over-report) and **re-predicts** it to decide success.

Attacks are untargeted (the papers' setting): success is a prediction different from the true label.
"""

from __future__ import annotations

import inspect
import math
import random
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bastion.errors import BastionWarning, InputError
from bastion.models.checks import eval_mode, model_fingerprint
from bastion.results import SampleRecord
from bastion.store import Store, resumable_run
from bastion.text.corpus import TextDataset, check_sentences, detokenize
from bastion.text.models import TextClassifier
from bastion.text.threat import TextThreat

__all__ = ["TEXT_ATTACKS", "SampleContext", "TextAttack", "TextAttackResult", "TextAttackSummary", "attack_texts"]

#: Every concrete text attack, by its registry name.
TEXT_ATTACKS: dict[str, type[TextAttack]] = {}


class _OutOfQueries(Exception):
    """Raised inside a run when the sample's query budget is spent; the best sentence so far is kept."""


def check_text_model(model: object) -> TextClassifier:
    """``model`` if it is a :class:`~bastion.text.models.TextClassifier`, else an InputError saying why."""
    if not isinstance(model, TextClassifier):
        raise InputError(
            f"model is a {type(model).__name__}, not a bastion.text.TextClassifier: text attacks need a word-level "
            "text model with a vocabulary (image models take tensors, not sentences)"
        )
    return model


def check_labels(labels: object, n: int, num_classes: int) -> list[int]:
    if torch.is_tensor(labels):
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise InputError(f"labels must be a 1-D integer tensor or a list of int, got {labels.dtype} tensor")
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InputError(f"labels must be a list of int (one per sentence), got {type(labels).__name__}")
    if len(labels) != n:
        raise InputError(f"{n} sentences but {len(labels)} labels")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise InputError(f"labels must lie in [0, {num_classes}) for this model, got {bad[0]}")
    return list(labels)


class SampleContext:
    """The model as an attack sees it while attacking one sentence: counted queries and gradients.

    Attributes:
        tokens: the original sentence.
        label: its true label.
        threat: the threat model.
        rng: the attack's random generator for this sample (seeded per sample).
        best: the sentence the attack would return now; kept when the query budget runs out.
        queries: sentences scored so far.
        grad_calls: gradient evaluations so far.
    """

    def __init__(
        self,
        model: TextClassifier,
        tokens: list[str],
        label: int,
        threat: TextThreat,
        rng: random.Random,
        max_queries: int | None,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.tokens = tokens
        self.label = label
        self.threat = threat
        self.rng = rng
        self.max_queries = max_queries
        self.batch_size = batch_size
        self.best: list[str] = list(tokens)
        self.queries = 0
        self.grad_calls = 0

    @property
    def budget(self) -> int:
        """Most words that may change in this sentence."""
        return self.threat.budget(len(self.tokens))

    def queries_left(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.queries

    @torch.no_grad()
    def probs(self, sentences: Sequence[Sequence[str]]) -> torch.Tensor:
        """Class probabilities (M, K) of ``sentences``, M queries (raises when the budget is spent)."""
        if not sentences:
            return torch.zeros(0, self.model.num_classes)
        left = self.queries_left()
        if left is not None and len(sentences) > left:
            raise _OutOfQueries
        self.queries += len(sentences)
        out = []
        for i in range(0, len(sentences), self.batch_size):
            ids = self.model.encode(sentences[i : i + self.batch_size])
            out.append(torch.softmax(self.model(ids).float(), dim=1).cpu())
        return torch.cat(out)

    def fooled(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-row: the prediction differs from the true label."""
        return probs.argmax(dim=1) != self.label

    def embedding_grad(self, sentence: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs (K,), grad (L, D))``: the cross-entropy loss's gradient with respect to the word embeddings.

        One gradient evaluation (not counted as a query); positions past the model's ``max_len`` get zeros.
        """
        ids = self.model.encode([list(sentence)])
        with torch.enable_grad():
            emb = self.model.embed(ids).detach().requires_grad_(True)
            logits = self.model.forward_embedded(emb, ids)
            loss = F.cross_entropy(logits, torch.tensor([self.label], device=logits.device))
            (grad,) = torch.autograd.grad(loss, emb)
        self.grad_calls += 1
        g = torch.zeros(len(sentence), grad.shape[-1])
        g[: grad.shape[1]] = grad[0].detach().cpu()
        return torch.softmax(logits.detach().float(), dim=1)[0].cpu(), g

    def word_vector(self, words: Sequence[str]) -> torch.Tensor:
        """The model's own embeddings (M, D) of ``words`` (unknown words share the unknown row)."""
        ids = torch.tensor([self.model.vocab.index(w) for w in words], dtype=torch.long)
        return self.model.embedding.weight.detach()[ids.to(self.model.embedding.weight.device)].cpu()


@dataclass
class TextAttackResult:
    """The outcome of a text attack on a batch of sentences.

    Attributes:
        original: the clean token lists.
        adversarial: the best sentence found for each (the original where the attack failed), inside the threat.
        labels: the true labels.
        success: re-verified: the model's prediction on ``adversarial`` differs from the label (clean
            misclassifications included, with nothing changed).
        attacked: the clean prediction was correct, so the attack ran.
        clean_pred, adv_pred: predictions on the clean and adversarial sentences.
        queries: sentences scored per sample (clean and re-verification queries included).
        grad_calls: gradient evaluations per sample.
        words_changed, chars_changed: tokens changed and their summed Levenshtein distance.
        seconds: wall time.
        attack: repr of the attack; threat: the threat's key.
    """

    original: list[list[str]]
    adversarial: list[list[str]]
    labels: list[int]
    success: torch.Tensor
    attacked: torch.Tensor
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    queries: torch.Tensor
    grad_calls: torch.Tensor
    words_changed: torch.Tensor
    chars_changed: torch.Tensor
    seconds: float = 0.0
    attack: str = ""
    threat: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Attack success rate over the samples the model classified correctly (the papers' ASR)."""
        n = int(self.attacked.sum())
        return float((self.success & self.attacked).sum()) / n if n else 0.0

    @property
    def adversarial_texts(self) -> list[str]:
        return [detokenize(t) for t in self.adversarial]

    def records(self, indices: Sequence[int], name: str) -> list[SampleRecord]:
        """One :class:`SampleRecord` per sample (``adv_distance``: words changed, for a success)."""
        share = self.seconds / max(len(indices), 1)
        out = []
        for j, idx in enumerate(indices):
            ok = bool(self.success[j])
            out.append(SampleRecord(
                index=int(idx), threat=self.threat, label=self.labels[j], clean_pred=int(self.clean_pred[j]),
                status="falsified" if ok else "unknown", adv_distance=float(self.words_changed[j]) if ok else None,
                attack=name, seconds=share, queries=int(self.queries[j]),
                extra={"attacked": bool(self.attacked[j]), "adv_pred": int(self.adv_pred[j]),
                       "words_changed": int(self.words_changed[j]), "chars_changed": int(self.chars_changed[j]),
                       "grad_calls": int(self.grad_calls[j]), "text": detokenize(self.original[j]),
                       "adv_text": detokenize(self.adversarial[j])},
            ))  # fmt: skip
        return out


class TextAttack(ABC):
    """Base class of the text attacks (see the module docstring for the contract).

    Class attributes: ``name`` (registry key), ``needs`` (``"substitutions"`` and/or ``"chars"``: the edits the
    attack makes, which the threat must allow), ``access`` (``"white-box"`` or ``"score"``) and ``paper``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    access: ClassVar[str] = "score"
    paper: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and not inspect.isabstract(cls):
            TEXT_ATTACKS[cls.name] = cls

    @property
    def uses_gradients(self) -> bool:
        """The attack reads the model's gradients (a white-box attack, as configured)."""
        return self.access == "white-box"

    @abstractmethod
    def run(self, ctx: SampleContext) -> list[str]:
        """The adversarial token list for ``ctx.tokens`` (aligned with it); set ``ctx.best`` as it improves."""

    def default_threat(self, embedding: Any) -> TextThreat:
        """The threat model of the attack's paper (used by the CLI when no threat is given)."""
        return TextThreat.synonyms(embedding)

    def check_threat(self, threat: object) -> TextThreat:
        if not isinstance(threat, TextThreat):
            raise InputError(
                f"threat must be a bastion.text.TextThreat (word/character edits), got {type(threat).__name__}; "
                "l_p balls are for tensors"
            )
        if "substitutions" in self.needs and not threat.substitutions:
            raise InputError(f"{type(self).__name__} substitutes words but the threat allows no substitutions")
        if "chars" in self.needs and threat.char_edits == 0:
            raise InputError(f"{type(self).__name__} edits characters but the threat has char_edits=0")
        return threat

    def __call__(
        self,
        model: TextClassifier,
        texts: Sequence[str] | Sequence[Sequence[str]],
        labels: Sequence[int] | torch.Tensor,
        *,
        threat: TextThreat,
        seed: int | None = 0,
        max_queries: int | None = None,
        progress: bool = False,
    ) -> TextAttackResult:
        """Attack ``model`` on the sentences ``texts`` with true ``labels`` inside ``threat``.

        Args:
            model: a :class:`~bastion.text.models.TextClassifier`.
            texts: sentences (str, tokenised here) or token lists.
            labels: true labels.
            threat: the :class:`~bastion.text.threat.TextThreat`.
            seed: seed of the attack's random choices (per sample: ``seed + i``); ``None``: unseeded.
            max_queries: most sentences the attack may score per sample (the re-verification query not
                included), or ``None``.
            progress: show a tqdm bar over the samples.
        """
        model = check_text_model(model)
        threat = self.check_threat(threat)
        tokens = check_sentences(texts)
        ys = check_labels(labels, len(tokens), model.num_classes)
        if max_queries is not None and (isinstance(max_queries, bool) or not isinstance(max_queries, int)
                                        or max_queries < 1):  # fmt: skip
            raise InputError(f"max_queries must be a positive integer or None, got {max_queries!r}")
        from tqdm.auto import tqdm

        n = len(tokens)
        start = time.perf_counter()
        adv = [list(t) for t in tokens]
        queries = torch.zeros(n, dtype=torch.long)
        grads = torch.zeros(n, dtype=torch.long)
        with eval_mode(model):
            clean = model.predict_proba(tokens).argmax(dim=1)
            queries += 1
            attacked = clean == torch.tensor(ys)
            for i in tqdm(range(n), desc=self.name, unit="sentence", disable=not progress, leave=False):
                if not bool(attacked[i]):
                    continue
                rng = random.Random(None if seed is None else seed + i)
                ctx = SampleContext(model, tokens[i], ys[i], threat, rng, max_queries)
                try:
                    out = self.run(ctx)
                except _OutOfQueries:
                    out = ctx.best
                queries[i] += ctx.queries
                grads[i] += ctx.grad_calls
                problems = threat.violations(tokens[i], out)
                if problems:
                    warnings.warn(
                        f"{type(self).__name__} returned a sentence outside the threat ({problems[0]}); "
                        "it counts as not broken",
                        BastionWarning,
                        stacklevel=2,
                    )
                    out = list(tokens[i])
                adv[i] = list(out)
            changed = [j for j in range(n) if adv[j] != tokens[j]]
            adv_pred = clean.clone()
            if changed:  # re-verification: one query per changed sentence
                adv_pred[changed] = model.predict_proba([adv[j] for j in changed]).argmax(dim=1)
                queries[changed] += 1
        success = adv_pred != torch.tensor(ys)
        words = torch.tensor([threat.words_changed(a, b) for a, b in zip(tokens, adv)], dtype=torch.long)
        chars = torch.tensor([threat.chars_changed(a, b) for a, b in zip(tokens, adv)], dtype=torch.long)
        # a failed attack returns the clean sentence, so the reported edits are those of successes only
        for j in range(n):
            if not bool(success[j]):
                adv[j] = list(tokens[j])
                words[j] = chars[j] = 0
        return TextAttackResult(
            original=tokens, adversarial=adv, labels=ys, success=success, attacked=attacked, clean_pred=clean,
            adv_pred=torch.where(success, adv_pred, clean), queries=queries, grad_calls=grads,
            words_changed=words, chars_changed=chars, seconds=time.perf_counter() - start, attack=repr(self),
            threat=threat.key,
        )  # fmt: skip

    def options(self) -> dict[str, Any]:
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


@dataclass
class TextAttackSummary:
    """What :func:`attack_texts` returns (and stores as the run's summary)."""

    attack: str
    threat: str
    n: int
    attacked: int
    clean_accuracy: float
    success_rate: float
    robust_accuracy: float
    mean_words_changed: float
    mean_fraction_changed: float
    mean_chars_changed: float
    mean_queries: float
    seconds_per_sample: float
    examples: list[dict[str, Any]] = field(default_factory=list)
    run_id: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def attack_texts(
    attack: TextAttack,
    model: TextClassifier,
    data: TextDataset,
    *,
    threat: TextThreat,
    store: Store | str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_queries: int | None = None,
    progress: bool = True,
    n_examples: int = 5,
) -> TextAttackSummary:
    """Run ``attack`` over ``data`` batch by batch, writing per-sample records to ``store`` as it goes.

    A killed run resumes where it stopped when called again with the same store (the run's key is the model's
    and the data's fingerprints, the attack's repr, the threat's key, the seed and ``max_queries``).

    Returns:
        The summary: ASR over the correctly classified samples, robust accuracy, mean words/characters changed
        and queries over the successes (queries over the attacked samples), seconds per sample.
    """
    from tqdm.auto import tqdm

    model = check_text_model(model)
    if not isinstance(data, TextDataset):
        raise InputError(f"data must be a bastion.text.TextDataset, got {type(data).__name__}")
    threat = attack.check_threat(threat)
    key = threat.key
    started = time.perf_counter()
    with resumable_run(
        store, kind="text-attack",
        payload={"attack": repr(attack), "threat": key, "seed": seed, "max_queries": max_queries},
        fingerprints=lambda: (model_fingerprint(model), data.fingerprint()), n_samples=len(data), threats=[key],
        config={"source": data.source},
    ) as run:  # fmt: skip
        todo = run.todo(len(data))
        with tqdm(total=len(data), initial=len(data) - len(todo), desc=attack.name, unit="sentence",
                  disable=not progress) as bar:  # fmt: skip
            for b in range(0, len(todo), batch_size):
                idx = todo[b : b + batch_size]
                t0 = time.perf_counter()
                res = attack(model, [data.tokens[i] for i in idx], [data.labels[i] for i in idx], threat=threat,
                             seed=seed + idx[0], max_queries=max_queries)  # fmt: skip
                run.write(res.records(idx, attack.name), seconds=time.perf_counter() - t0)
                bar.update(len(idx))
                recs = run.records(key)
                att = [r for r in recs if r.extra.get("attacked")]
                bar.set_postfix(asr=f"{_mean([r.status == 'falsified' for r in att]):.3f}", refresh=False)
        recs = sorted(run.records(key), key=lambda r: r.index)
        att = [r for r in recs if r.extra.get("attacked")]
        ok = [r for r in att if r.status == "falsified"]
        summary = TextAttackSummary(
            attack=repr(attack), threat=key, n=len(recs), attacked=len(att),
            clean_accuracy=len(att) / max(len(recs), 1), success_rate=len(ok) / max(len(att), 1),
            robust_accuracy=(len(att) - len(ok)) / max(len(recs), 1),
            mean_words_changed=_mean([r.extra["words_changed"] for r in ok]),
            mean_fraction_changed=_mean([r.extra["words_changed"] / len(data.tokens[r.index]) for r in ok]),
            mean_chars_changed=_mean([r.extra["chars_changed"] for r in ok]),
            mean_queries=_mean([float(r.queries or 0) for r in att]),
            seconds_per_sample=_mean([r.seconds for r in att]),
            examples=[{"index": r.index, "text": r.extra["text"], "adv_text": r.extra["adv_text"], "label": r.label,
                       "adv_pred": r.extra["adv_pred"]} for r in ok[:n_examples]],
        )  # fmt: skip
        return run.finish(summary, started=started)
