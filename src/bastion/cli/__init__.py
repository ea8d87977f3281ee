"""The ``bastion`` command line: a thin layer over the Python API.

Every command parses its arguments, makes one call of the API, shows progress and prints a table (or JSON with
``--json``). Errors caused by bad input are printed as one line, without a traceback, with exit status 2.

One module per command group, each registering its commands with ``add_parsers(sub, fmt)``: :mod:`.evaluate`
(demo, evaluate, runs, attacks), :mod:`.smooth`, :mod:`.train` and :mod:`.verify` (certify, assess, vnncomp);
:mod:`.testing` (test coverage, test generate); :mod:`.globalopt` (verify-global); :mod:`.estimate` (estimate clever,
estimate splitting); :mod:`.measure` (measure: generalisation measures); :mod:`.reliability` (reliability,
weight-robustness); :mod:`.poison` (poison: poisoned training sets);
:mod:`.backdoor` (backdoor-scan); :mod:`.universal` (universal, patch: data-level attacks); :mod:`.report`
(report: the HTML robustness report); :mod:`.text` (text attack, text train); :mod:`.pointcloud` (pointcloud attack);
:mod:`.audio` (audio attack); :mod:`.applications` (reprogram, explain, fingerprint: novel applications);
:mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence

from bastion.cli import (
    applications,
    audio,
    backdoor,
    estimate,
    evaluate,
    globalopt,
    measure,
    pointcloud,
    poison,
    reliability,
    report,
    smooth,
    testing,
    text,
    train,
    universal,
    verify,
)
from bastion.cli.evaluate import demo_model
from bastion.errors import BastionError

__all__ = ["build_parser", "demo_model", "main"]


# --------------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (like every other bastion error), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from bastion import __version__

    parser = _Parser(
        prog="bastion",
        description="Adversarial robustness of deep learning models: attack, evaluate, store and resume.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `bastion COMMAND --help` for the options and examples of each command",
    )
    parser.add_argument("--version", action="version", version=f"bastion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    groups = (
        evaluate,
        smooth,
        train,
        verify,
        globalopt,
        testing,
        estimate,
        measure,
        reliability,
        poison,
        backdoor,
        universal,
        report,
        applications,
        pointcloud,
        audio,
        text,
    )
    for group in groups:
        group.add_parsers(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BastionError as exc:
        print(f"bastion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"bastion {args.command}: interrupted; re-run the same command to resume (with --store)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
