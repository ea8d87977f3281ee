"""``bastion report``: the self-contained HTML robustness report of a store's runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bastion.cli.common import positive_int

EPILOG_REPORT = """\
examples:
  bastion evaluate --model zoo:mlp@digits-mlp.pt --data digits --limit 200 --eps 0.05,0.1 --attack fgsm,pgd \\
      --store runs.db
  bastion certify --model zoo:mlp@digits-mlp.pt --data digits --limit 200 --eps 0.02 --store runs.db
  bastion report --store runs.db --out report/          # every run; open report/index.html
  bastion report --store runs.db --out report/ --run 2 --run 3 --json
  bastion report --store runs.db --out report/ --regenerate   # adversarial images: re-run the attacks

The page is one file (figures embedded as PNG, no script, no server). The store keeps the distance of each
adversarial example but not the input itself; --regenerate loads the run's model again from its stored spec (only
if its fingerprint matches) and re-runs the attack behind each gallery example to draw it. A model spec may name
Python code (package.module:factory), which loading it runs: use --regenerate on stores you trust.
"""


def cmd_report(args: argparse.Namespace) -> int:
    from bastion.report.html import write_report

    result = write_report(
        args.store, args.out, runs=args.run or None, gallery=args.gallery, regenerate=args.regenerate,
        title=args.title,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"wrote {result.index} ({len(result.runs)} run(s), {result.figures} figure(s), {result.seconds:.1f} s)")
        for note in result.notes:
            print(f"note: {note}")
    return 0


def _gallery(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def add_parsers(sub: Any, fmt: Any) -> None:
    """Register ``bastion report`` on the ``bastion`` sub-parser ``sub``."""
    p = sub.add_parser(
        "report", help="write a self-contained HTML robustness report of a store's runs", epilog=EPILOG_REPORT,
        formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("--store", required=True, help="the SQLite store written with --store by other commands")
    p.add_argument("--out", required=True, help="output folder; the page is OUT/index.html")
    p.add_argument(
        "--run", action="append", default=[], metavar="KEY",
        help="run id or key to include, repeatable (default: every run, newest first)",
    )  # fmt: skip
    p.add_argument(
        "--gallery", type=_gallery, default=8, metavar="N",
        help="closest adversarial examples shown per run (0: none; default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--regenerate", action="store_true",
        help="re-run the attacks behind the gallery on the run's stored model spec to show adversarial images",
    )  # fmt: skip
    p.add_argument("--title", default=None, help="title of the page")
    p.add_argument("--json", action="store_true", help="print the paths written (and run ids) as JSON")
    p.set_defaults(func=cmd_report)
