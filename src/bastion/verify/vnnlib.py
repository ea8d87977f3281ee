"""VNN-LIB properties (the subset VNN-COMP uses) to :class:`~bastion.verify.spec.Spec`, and counterexamples back.

The VNN-LIB standard (Demarchi, Guidotti, Pulina, Tacchella et al., vnnlib.org; used by the VNN-COMP reports of
Bak, Liu, Johnson et al. 2021 and Brix et al. 2023) writes a property as SMT-LIB assertions over the inputs
``X_i`` and outputs ``Y_j`` of a network; the asserted formula describes the **counterexamples**: the property is
violated (``sat``) iff some input/output pair satisfies every assertion. Supported here:

* ``(declare-const X_i Real)`` and ``(declare-const Y_j Real)``;
* ``(assert F)``, several asserts being a conjunction, with ``F`` built from ``and``, ``or`` (nested freely) and
  comparisons ``<=``, ``>=``, ``=`` between linear expressions: numbers, declared variables, ``(+ e ...)``,
  ``(- e)``, ``(- e f ...)`` and ``(* c e)`` (products with at most one non-constant factor). ``<`` and ``>`` are
  read as ``<=`` and ``>=``: over the reals the closure differs from the strict set only on its boundary, and
  VNN-COMP counterexamples are checked with a tolerance anyway; this is the convention of the competition's own
  tools;
* comments from ``;`` to the end of the line; ``check-sat``, ``exit``, ``set-logic``, ``set-info`` and
  ``get-model`` commands are accepted and ignored.

A comparison that mentions only inputs must bound a single ``X_i`` (a box constraint); a comparison that mentions
outputs must not mention inputs. The formula is brought into disjunctive normal form, each disjunct being an input
box and a polyhedron over the outputs, and disjuncts that share a box are grouped into one
:class:`~bastion.verify.spec.Region` (the two VNN-COMP forms, "a box and an ``or`` of ``and`` s over ``Y``" and "an
``or`` of ``(and box Y...)``", both map to this). Every error names the line and column.

The file is read in one pass: a regular expression splits it into tokens and each parenthesised form is evaluated
as soon as it closes, with an explicit stack, so nesting depth and file length (VNN-COMP files reach tens of
thousands of lines) are limited by memory only.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bastion.errors import InputError
from bastion.verify.spec import Region, Spec

__all__ = ["format_counterexample", "format_vnnlib", "parse_vnnlib"]

_TOKEN = re.compile(r";[^\n]*|[()]|[^\s();]+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(\d+)")
_IGNORED = {"check-sat", "exit", "set-logic", "set-info", "get-model", "set-option"}
_MAX_DISJUNCTS = 1_000_000


class _Linear:
    """A linear expression ``sum coef[v] * v + const`` over variables named ``("X", i)`` / ``("Y", j)``."""

    __slots__ = ("coef", "const")

    def __init__(self, coef: dict[tuple[str, int], float] | None = None, const: float = 0.0) -> None:
        self.coef = coef if coef is not None else {}
        self.const = const

    def scaled(self, k: float) -> _Linear:
        return _Linear({v: k * c for v, c in self.coef.items()}, k * self.const)

    def add(self, other: _Linear, sign: float = 1.0) -> _Linear:
        coef = dict(self.coef)
        for v, c in other.coef.items():
            coef[v] = coef.get(v, 0.0) + sign * c
        return _Linear(coef, self.const + sign * other.const)


# An atom of the DNF: ("in", index, is_upper, value) bounds X_index; ("out", cols, vals, b) is sum vals*Y_cols <= b.
_Atom = tuple[Any, ...]
_Chunk = list[_Atom]  # atoms that always occur together (shared by every disjunct that contains them)
_Conj = list[_Chunk]
_Dnf = list[_Conj]  # [] is false, [[]] is true


class _Form:
    """A parenthesised form being read: its opening position and its evaluated children."""

    __slots__ = ("items", "pos")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.items: list[Any] = []


@dataclass
class _Summary:
    """The atoms of a chunk, sorted: input bounds as sparse index/value arrays, output rows as a list."""

    lo_idx: np.ndarray
    lo_val: np.ndarray
    hi_idx: np.ndarray
    hi_val: np.ndarray
    rows: list[tuple[np.ndarray, np.ndarray, float]]


def _summarise(chunk: _Chunk) -> _Summary:
    lo_i: list[int] = []
    lo_v: list[float] = []
    hi_i: list[int] = []
    hi_v: list[float] = []
    rows = []
    for atom in chunk:
        if atom[0] == "in":
            (hi_i if atom[2] else lo_i).append(atom[1])
            (hi_v if atom[2] else lo_v).append(atom[3])
        else:
            rows.append((atom[1], atom[2], atom[3]))
    return _Summary(
        np.asarray(lo_i, dtype=np.int64),
        np.asarray(lo_v, dtype=np.float64),
        np.asarray(hi_i, dtype=np.int64),
        np.asarray(hi_v, dtype=np.float64),
        rows,
    )


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.lines = [m.end() for m in re.finditer(r"\n", text)]
        self.inputs: set[int] = set()
        self.outputs: set[int] = set()
        self.asserts: list[_Dnf] = []

    def where(self, pos: int) -> str:
        line = bisect.bisect_right(self.lines, pos)
        col = pos - (self.lines[line - 1] if line else 0)
        return f"{self.source}:{line + 1}:{col + 1}"

    def error(self, pos: int, msg: str) -> InputError:
        return InputError(f"{self.where(pos)}: {msg}")

    # ------------------------------------------------------------------------------------------- reading
    def run(self) -> None:
        stack: list[_Form] = []
        for m in _TOKEN.finditer(self.text):
            token = m.group()
            first = token[0]
            if first == ";":
                continue
            start = m.start()
            if first == "(":
                stack.append(_Form(start))
            elif first == ")":
                if not stack:
                    raise self.error(start, "unexpected ')' without a matching '('")
                form = stack.pop()
                value = self.evaluate(form)
                if stack:
                    stack[-1].items.append(value)
            else:
                if not stack:
                    raise self.error(start, f"unexpected {token!r} outside of a parenthesised command")
                stack[-1].items.append((token, start))
        if stack:
            raise self.error(stack[-1].pos, "'(' is never closed")

    # ------------------------------------------------------------------------------------------- evaluating
    def head(self, form: _Form) -> str:
        if not form.items:
            raise self.error(form.pos, "empty form '()'")
        first = form.items[0]
        if len(first) != 2:
            raise self.error(form.pos, "a form must start with an operator or a command name")
        return first[0]

    def evaluate(self, form: _Form) -> Any:
        """Evaluate a closed form whose children are evaluated already; returns a tagged value."""
        head = self.head(form)
        args = form.items[1:]
        if head == "declare-const":
            return self.declare(form, args)
        if head == "assert":
            if len(args) != 1:
                raise self.error(form.pos, f"assert takes one formula, got {len(args)}")
            self.asserts.append(self.as_dnf(args[0], form.pos))
            return ("cmd", None, form.pos)
        if head in _IGNORED:
            return ("cmd", None, form.pos)
        if head in ("and", "or"):
            dnfs = [self.as_dnf(a, form.pos) for a in args]
            return ("dnf", self.conj(dnfs, form.pos) if head == "and" else [c for d in dnfs for c in d], form.pos)
        if head in ("<=", ">=", "<", ">", "="):
            return ("dnf", self.compare(head, args, form.pos), form.pos)
        if head in ("+", "-", "*"):
            return ("lin", self.arith(head, args, form.pos), form.pos)
        raise self.error(form.items[0][1], f"unsupported operator or command {head!r}")

    def declare(self, form: _Form, args: list[Any]) -> Any:
        if len(args) != 2 or any(len(a) != 2 for a in args):
            raise self.error(form.pos, "expected (declare-const NAME Real)")
        (name, npos), (sort, spos) = args
        if sort != "Real":
            raise self.error(spos, f"variable {name} has sort {sort!r}; only Real is supported")
        m = _VAR.fullmatch(name)
        if m is None:
            raise self.error(npos, f"variable {name!r}: names must be X_<i> (inputs) or Y_<j> (outputs)")
        index = int(m.group(2))
        bucket = self.inputs if m.group(1) == "X" else self.outputs
        if index in bucket:
            raise self.error(npos, f"variable {name} declared twice")
        bucket.add(index)
        return ("cmd", None, form.pos)

    # Children are raw tokens (text, pos) or evaluated forms (tag, value, pos); both end with their position.
    def as_linear(self, item: Any, pos: int) -> _Linear:
        if len(item) == 2:
            token, tpos = item
            if _NUMBER.fullmatch(token):
                return _Linear(const=float(token))
            m = _VAR.fullmatch(token)
            if m is None:
                raise self.error(tpos, f"unknown symbol {token!r}")
            kind, index = m.group(1), int(m.group(2))
            if index not in (self.inputs if kind == "X" else self.outputs):
                raise self.error(tpos, f"variable {token} is used before it is declared")
            return _Linear({(kind, index): 1.0})
        if item[0] == "lin":
            return item[1]
        raise self.error(item[-1], "expected a number or a linear expression")

    def as_dnf(self, item: Any, pos: int) -> _Dnf:
        if len(item) == 3 and item[0] == "dnf":
            return item[1]
        raise self.error(item[-1], "expected a formula (a comparison, 'and' or 'or')")

    def arith(self, head: str, args: list[Any], pos: int) -> _Linear:
        if not args:
            raise self.error(pos, f"'{head}' needs arguments")
        terms = [self.as_linear(a, pos) for a in args]
        if head == "+":
            out = _Linear()
            for t in terms:
                out = out.add(t)
            return out
        if head == "-":
            if len(terms) == 1:
                return terms[0].scaled(-1.0)
            out = terms[0]
            for t in terms[1:]:
                out = out.add(t, -1.0)
            return out
        factor, variable = 1.0, None
        for t in terms:
            if t.coef:
                if variable is not None:
                    raise self.error(pos, "a product of two variables is not linear")
                variable = t
            else:
                factor *= t.const
        return _Linear(const=factor) if variable is None else variable.scaled(factor)

    def compare(self, op: str, args: list[Any], pos: int) -> _Dnf:
        if len(args) < 2:
            raise self.error(pos, f"'{op}' compares at least two expressions")
        terms = [self.as_linear(a, pos) for a in args]
        atoms: list[_Dnf] = []
        for left, right in itertools.pairwise(terms):  # chains (<= a b c) mean a <= b and b <= c
            if op in ("<=", "<"):
                atoms.append(self.leq(left.add(right, -1.0), pos))
            elif op in (">=", ">"):
                atoms.append(self.leq(right.add(left, -1.0), pos))
            else:
                diff = left.add(right, -1.0)
                atoms += [self.leq(diff, pos), self.leq(diff.scaled(-1.0), pos)]
        return atoms[0] if len(atoms) == 1 else self.conj(atoms, pos)

    def leq(self, e: _Linear, pos: int) -> _Dnf:
        """The DNF of ``e <= 0``."""
        coef = {v: c for v, c in e.coef.items() if c != 0.0}
        if not coef:
            return [[]] if e.const <= 0 else []
        xs = [v for v in coef if v[0] == "X"]
        if xs and len(xs) != len(coef):
            raise self.error(pos, "a constraint mixing inputs (X) and outputs (Y) is not supported")
        if xs:
            if len(xs) > 1:
                raise self.error(
                    pos,
                    "input constraints must bound a single X_i (a box); general linear input constraints are "
                    "not supported",
                )
            (_, i), c = xs[0], coef[xs[0]]
            # c x + const <= 0: an upper bound when c > 0, a lower bound when c < 0
            return [[[("in", i, c > 0, -e.const / c)]]]
        cols = np.array([j for _, j in coef], dtype=np.int64)
        vals = np.array(list(coef.values()), dtype=np.float64)
        return [[[("out", cols, vals, -e.const)]]]

    def conj(self, dnfs: list[_Dnf], pos: int) -> _Dnf:
        """The DNF of a conjunction: single-disjunct operands are merged into one shared chunk."""
        fixed: _Chunk = []
        multi: list[_Dnf] = []
        for d in dnfs:
            if not d:
                return []
            if len(d) == 1:
                for chunk in d[0]:
                    fixed.extend(chunk)
            else:
                multi.append(d)
        result: _Dnf = [[fixed] if fixed else []]
        for d in multi:
            if len(result) * len(d) > _MAX_DISJUNCTS:
                raise self.error(pos, f"the formula expands to more than {_MAX_DISJUNCTS} disjuncts")
            result = [r + c for r in result for c in d]
        return result

    # ------------------------------------------------------------------------------------------- building
    def spec(self, num_inputs: int | None, num_outputs: int | None) -> Spec:
        n = self.count(self.inputs, "X", num_inputs)
        m = self.count(self.outputs, "Y", num_outputs)
        dnf = self.conj(self.asserts, 0) if self.asserts else [[]]
        summaries: dict[int, _Summary] = {}
        groups: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray, list[tuple[Tensor, Tensor]]]] = {}
        boxes: dict[tuple[int, ...], tuple[bytes, bytes] | None] = {}
        for k, conj in enumerate(dnf):
            rows: list[tuple[np.ndarray, np.ndarray, float]] = []
            parts = []
            for chunk in conj:
                # a chunk shared by many disjuncts (the box asserted at top level) is summarised once
                s = summaries.get(id(chunk))
                if s is None:
                    s = summaries[id(chunk)] = _summarise(chunk)
                if s.lo_idx.size or s.hi_idx.size:
                    parts.append(s)
                rows.extend(s.rows)
            # disjuncts bounded by the same chunks share one box (the usual "box and an `or` over Y" form)
            box_key = tuple(id(s) for s in parts)
            if box_key not in boxes:
                boxes[box_key] = self.box(parts, n, k, groups)
            key = boxes[box_key]
            if key is None:
                continue  # an empty box: this disjunct has no counterexample
            a = np.zeros((len(rows), m))
            b = np.zeros(len(rows))
            for r, (cols, vals, rhs) in enumerate(rows):
                np.add.at(a[r], cols, vals)
                b[r] = rhs
            groups[key][2].append((torch.from_numpy(a), torch.from_numpy(b)))
        regions = [Region(torch.from_numpy(lo), torch.from_numpy(hi), unsafe) for lo, hi, unsafe in groups.values()]
        return Spec(regions, m, (n,))

    def box(
        self,
        parts: list[_Summary],
        n: int,
        k: int,
        groups: dict[tuple[bytes, bytes], tuple[np.ndarray, np.ndarray, list[tuple[Tensor, Tensor]]]],
    ) -> tuple[bytes, bytes] | None:
        """The box of disjunct ``k`` from its bound chunks; registers its group and returns its key (None: empty)."""
        lower = np.full(n, -np.inf)
        upper = np.full(n, np.inf)
        for s in parts:
            np.maximum.at(lower, s.lo_idx, s.lo_val)
            np.minimum.at(upper, s.hi_idx, s.hi_val)
        if (lower > upper).any():
            return None
        unbounded = np.flatnonzero(~np.isfinite(lower) | ~np.isfinite(upper))
        if unbounded.size:
            i = int(unbounded[0])
            raise InputError(
                f"{self.source}: input X_{i} has no {'lower' if np.isinf(lower[i]) else 'upper'} bound in disjunct "
                f"{k} of the property; every input needs a finite box"
            )
        key = (lower.tobytes(), upper.tobytes())
        groups.setdefault(key, (lower, upper, []))
        return key

    def count(self, declared: set[int], kind: str, expected: int | None) -> int:
        size = max(declared) + 1 if declared else 0
        missing = sorted(set(range(size)) - declared)
        if missing:
            raise InputError(f"{self.source}: {kind}_{missing[0]} is not declared but {kind}_{size - 1} is")
        if expected is not None and size != expected:
            what = "inputs" if kind == "X" else "outputs"
            raise InputError(f"{self.source}: the property declares {size} {what} ({kind}_i), the model has {expected}")
        if size == 0:
            raise InputError(f"{self.source}: no {kind}_i variables are declared")
        return size


def parse_vnnlib(
    path_or_text: str | os.PathLike[str],
    *,
    num_inputs: int | None = None,
    num_outputs: int | None = None,
) -> Spec:
    """Read a VNN-LIB property (see the module docstring for the subset) into a :class:`Spec`.

    Args:
        path_or_text: a ``.vnnlib`` file (``.gz`` compressed files too) or the property's text itself (any string
            that contains a parenthesis or a line break).
        num_inputs: number of model inputs; checked against the declared ``X_i`` when given.
        num_outputs: number of model outputs; checked against the declared ``Y_j`` when given.

    Returns:
        The spec, with ``input_shape == (num_inputs,)`` (use :meth:`Spec.with_input_shape` for the model's shape).
        Regions whose box is empty are dropped; a property with no region left can never be violated.

    Raises:
        InputError: the file is missing or malformed; the message gives ``file:line:column``.
    """
    if isinstance(path_or_text, os.PathLike) or (
        isinstance(path_or_text, str) and "(" not in path_or_text and "\n" not in path_or_text
    ):
        path = Path(path_or_text)
        if not path.is_file():
            raise InputError(f"VNN-LIB file {os.fspath(path)!r} not found")
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"VNN-LIB file {os.fspath(path)!r} is not UTF-8 text ({exc})") from None
        source = os.fspath(path)
    elif isinstance(path_or_text, str):
        text, source = path_or_text, "<vnnlib>"
    else:
        raise InputError(f"parse_vnnlib needs a path or the property text, got {type(path_or_text).__name__}")
    parser = _Parser(text, source)
    parser.run()
    return parser.spec(num_inputs, num_outputs)


Number = float | int


def _num(v: float) -> str:
    """A decimal literal (no exponent, which some VNN-LIB readers reject) that reads back as exactly ``v``."""
    return np.format_float_positional(float(v), unique=True, trim="0")


def format_counterexample(x: Tensor | Sequence[Number] | np.ndarray, y: Tensor | Sequence[Number] | np.ndarray) -> str:
    """A counterexample in the VNN-COMP result form ``((X_0 v)\n (X_1 v)\n ... (Y_0 v))``.

    Values are written as the shortest decimals that read back as the same float64 (hence also the same float32).

    Args:
        x: one input (any shape; flattened in row-major order as VNN-LIB numbers inputs).
        y: the model's outputs on it.

    Returns:
        The text (without the leading ``sat`` line and without a trailing newline).
    """
    xs = np.asarray(x.detach().cpu().double() if isinstance(x, Tensor) else x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y.detach().cpu().double() if isinstance(y, Tensor) else y, dtype=np.float64).reshape(-1)
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise InputError("format_counterexample: the counterexample contains NaN or Inf")
    parts = [f"(X_{i} {_num(v)})" for i, v in enumerate(xs.tolist())]
    parts += [f"(Y_{j} {_num(v)})" for j, v in enumerate(ys.tolist())]
    if not parts:
        raise InputError("format_counterexample: empty counterexample")
    return "(" + "\n ".join(parts) + ")"


def format_vnnlib(spec: Spec, *, comment: str | None = None) -> str:
    """Write a spec as a VNN-LIB property that :func:`parse_vnnlib` (and VNN-COMP tools) read back.

    One region is written in the usual competition form: box assertions, then an ``or`` of ``and`` s over the
    outputs; several regions as one ``or`` of ``(and box... (or (and Y...)...))``.

    Args:
        spec: the property.
        comment: text written as ``;`` comment lines at the top.

    Returns:
        The file's text.
    """
    n, m = spec.num_inputs, spec.num_outputs
    lines = [f"; {line}" for line in (comment or "").splitlines()]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(m)]

    def row(a: Tensor, b: float) -> str:
        terms = [f"(* {_num(c)} Y_{j})" for j, c in enumerate(a.tolist()) if c != 0.0]
        lhs = terms[0] if len(terms) == 1 else f"(+ {' '.join(terms)})" if terms else "0.0"
        return f"(<= {lhs} {_num(b)})"

    def unsafe(region: Region) -> str:
        ands = [
            "(and " + " ".join(row(a[k], float(b[k])) for k in range(a.shape[0])) + ")"
            if a.shape[0]
            else "(<= 0.0 0.0)"
            for a, b in region.unsafe
        ]
        return "(or " + " ".join(ands) + ")" if ands else "(<= 1.0 0.0)"

    def box(region: Region) -> list[str]:
        lo, hi = region.lower.tolist(), region.upper.tolist()
        return [c for i in range(n) for c in (f"(>= X_{i} {_num(lo[i])})", f"(<= X_{i} {_num(hi[i])})")]

    if len(spec.regions) == 1:
        region = spec.regions[0]
        lines += [f"(assert {c})" for c in box(region)]
        lines.append(f"(assert {unsafe(region)})")
    elif not spec.regions:
        lines.append("(assert (<= 1.0 0.0))")
    else:
        disjuncts = ["  (and " + " ".join(box(r)) + " " + unsafe(r) + ")" for r in spec.regions]
        lines.append("(assert (or\n" + "\n".join(disjuncts) + "\n))")
    return "\n".join(lines) + "\n"
