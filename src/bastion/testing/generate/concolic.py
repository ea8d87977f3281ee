"""Concolic testing (Sun, Wu, Ruan, Huang, Kwiatkowska & Kroening, "Concolic Testing for Deep Neural Networks",
ASE 2018; the DeepConcolic tool).

Concolic testing alternates *concrete* execution and *symbolic* analysis. Each iteration

1. picks an uncovered requirement of the criterion, stated as a condition on one neuron's value
   (:meth:`~bastion.testing.coverage.base.CoverageMetric.target`: ``lower < value <= upper``), and the test input
   closest to meeting it (the paper's ranking: for neuron coverage, the input on which the neuron's pre-activation is
   largest; for an interval, the one whose value is nearest to it). As in DeepConcolic, requirements of shallower
   layers come first (``shallow_first``), and a (input, requirement) pair is never tried twice;
2. searches a new input, close to the chosen one, that meets the requirement:

   * ``norm="linf"`` (the paper's main method): a linear program. A ReLU network is affine on the *linear region*
     of an input, the set of inputs with the same activation pattern (which ReLUs are on, which element of each
     max-pooling window is the max). The LP keeps the pattern of every ReLU and max-pooling layer executed before
     the target layer as it is on the chosen input ``x0``, asks the target neuron's pre-activation to meet the
     requirement with a small margin, keeps the input in the domain box and in the l∞ threat ball around its
     seed, and minimises ``t`` with ``|x - x0| <= t``: the closest input to ``x0`` in its region that meets the
     requirement (the paper's ``min ||x - x0||∞`` over the region's constraints).
   * ``norm="l0"`` (the paper's L0 heuristic): rank input features by their impact on the target neuron (each
     feature set alone to each of ``l0_values`` values spanning its allowed range, the best value kept), change
     the top-ranked features one after another until the requirement holds, then greedily revert those that are
     not needed. It only evaluates the model, so it works on any network;

3. hands the candidate to the shared loop, which re-executes it and keeps it when it covers something new.

The LP's affine maps are read off the network itself: at ``x0`` the Jacobian of every pre-activation with respect
to the input together with its value is the exact affine function on the linear region. The pattern layers'
Jacobians come from forward-mode automatic differentiation, batched over the input's basis vectors with
``torch.func.vmap``, the forward pass cut after the deepest call the target needs (cached per input and extended
when a deeper target comes); the target's own row (or its channel's rows) from reverse mode, one backward pass per
row. A target in the first ReLU layer therefore costs one backward pass, not a Jacobian of the whole network. Each
ReLU neuron before the target contributes the row ``s (J x + c) >= 0`` (``s`` its sign at ``x0``), each max-pooling
window ``(J_argmax - J_other) x + ... >= 0``. Rows that cannot bind inside the search box (their minimum over it is
already non-negative, tested in the model's precision with a relative slack of 1e-5) or whose neuron is constant on
the region (zero gradient) are dropped before solving. The LP then has ``D + 1`` variables (the input and ``t``)
and ``2 D`` distance rows plus the remaining pattern rows: for the digits CNN (D = 64) no pattern row for its first
ReLU layer, about 2,500 for the second and 3,500 for the dense one (out of 2,048 + 1,536 + 1,024 + 768 before
filtering). Only layers up to the target's are encoded, as in the paper. HiGHS
(``scipy.optimize.linprog(method="highs")``) solves it, in milliseconds to a tenth of a second here.

**The region encoded (``region``).** The paper's LP fixes the pattern of *every* neuron of the layers before the
target (``region="full"``). Only the target's *cone* matters to its value, though: the neurons with a path to it
(for a convolution neuron, those of its receptive field). With ``region="cone"`` (the default) only the cone's
pattern is fixed. On the union of regions that agree on the cone the target is still exactly the same affine
function, so the solution meets the requirement just as surely (and the loop re-executes it); the LP is a
relaxation of the paper's (every input it accepts is accepted here, so the distance found is never larger and the
requirement is solvable at least as often), and it is small: for the second convolution of a 28x28 CNN it has
about 2,000 pattern rows over the target's 8x8 input window instead of some 60,000 over all 784 pixels, which took
HiGHS minutes. The cone is read structurally, whatever the input (see :meth:`Concolic._cone`), and the Jacobians
are then computed for the cone's input features only.

Either LP is confined to a linear region around ``x0``: for a neuron of a deep layer, whose region is small, it
is often infeasible although another region would reach the requirement. Such a failure costs one iteration; the
pair is not tried again and the requirement is given up after ``tries`` attempts. With ``ascent=k`` (an extension,
off by default) an infeasible LP is followed by ``k`` signed-gradient steps on the target's value inside the
search box; if they reach a point meeting the requirement, the LP is solved again over *that* point's region, still
minimising the distance to ``x0``, so the answer is again an exact, closest-in-its-region solution. On the
32-32-64-64-200-200 MNIST CNN's third convolution this turned 4 of 150 attempts solved into 31 of 60.

Other choices: a kept test's origin is its seed (the threat ball is around the seed, the distance minimised to the
chosen input). A layer named ``"<module>:input"`` is read at the module's input. With ``granularity="channel"`` the
neuron is a channel's spatial mean: with an upper bound the LP fixes that channel's pattern and reads the mean
exactly; with none it asks the mean of the pre-activations to clear the bound, which suffices (a ReLU's output is at
least its input) but is stricter than needed. Non-l∞ threats are applied by the loop's projection after the LP, which
may undo the requirement (the test is then not kept); ``norm="l0"`` with an l0 threat keeps within its budget of
changed features. One linearisation counts as one query (a forward pass with its derivatives); the L0 heuristic's
evaluations count one query per input (``D * l0_values`` for the ranking, up to ``l0_max_changes`` more per step).

Supported for ``norm="linf"``: networks of ``Linear``, convolutions, ``ReLU``/``LeakyReLU``, ``MaxPool2d``
(``ceil_mode=False``), average pooling, ``Flatten``/``Unflatten``, ``BatchNorm`` (eval), ``Dropout`` (eval),
padding, ``Identity`` and :class:`~bastion.models.Normalize` modules before the layers under test. Anything else
there (another activation, a nonlinear function called in ``forward`` such as ``F.relu``, found by ``torch.fx``
when the model can be traced) is refused with an :class:`~bastion.errors.InputError` naming it; ``norm="l0"`` has
no such restriction.

Defaults: ``margin=1e-4`` is DeepConcolic's ``act_epsilon`` (the slack by which the LP solution must clear the
target's bound, so that re-execution in float32 still meets it); ``time_limit=600`` seconds per LP is DeepConcolic's
solver time limit; ``l0_values=2`` (each feature tried at the two ends of its range) and ``l0_max_changes=100`` are
DeepConcolic's ``gran`` and ``mani_range``; requirements of shallower layers first is DeepConcolic's
``shallow_first``. ``tries=3`` (a requirement is given up after three failed attempts from different inputs;
DeepConcolic retries it from every test in its buffer) is this implementation's choice, as is leaving out
DeepConcolic's random lower bound on the LP's distance variable (``LB_noise``), which only adds non-determinism.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bastion.errors import InputError
from bastion.models.normalize import Normalize
from bastion.testing.coverage.base import INPUT_SUFFIX, CoverageMetric, NeuronTarget, neuron_values
from bastion.testing.generate.base import GenerationContext, TestGenerator
from bastion.threat import LpBall, canonical_norm

__all__ = ["Attempt", "Concolic"]

_RELU: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)
_MAXPOOL: tuple[type[nn.Module], ...] = (nn.MaxPool2d,)
#: Modules that are affine maps of their input (in eval mode).
_AFFINE_OK: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ZeroPad2d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    Normalize,
)
#: Names of functions / tensor methods that make a network leave the piecewise-linear world the LP encodes (or
#: that hide an activation pattern from the module hooks).
_NONLINEAR_FUNCTIONS = frozenset(
    "relu relu_ relu6 leaky_relu leaky_relu_ prelu rrelu elu elu_ selu celu gelu silu mish softplus hardtanh "
    "hardswish hardsigmoid sigmoid tanh logsigmoid softmax log_softmax softsign tanhshrink threshold max_pool1d "
    "max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices adaptive_max_pool1d adaptive_max_pool2d "
    "clamp clamp_ clip clip_ maximum minimum max min amax amin abs abs_ exp log sqrt rsqrt pow sin cos square "
    "where sign".split()
)
_PROBE_BATCH = 256
#: a linearised call: its values (K,), their Jacobian (K, D) and the per-sample shape
_Linear = tuple[Tensor, Tensor, tuple[int, ...]]


class _Stop(Exception):
    """Raised by a forward hook to cut a forward pass once the values needed are read."""


@dataclass(frozen=True)
class Attempt:
    """What one iteration tried (:attr:`Concolic.last_attempt`).

    Attributes:
        input: index of the chosen input among seeds then kept tests (the loop's global index).
        origin: its seed.
        target: the requirement solved for.
        item: the requirement's item index in its layer.
        status: ``"solved"`` (a candidate was proposed), ``"infeasible"`` (no input of the region / heuristic meets
            it) or ``"failed"`` (the solver stopped without an answer).
        distance: l∞ distance of the candidate to the chosen input (``norm="linf"``), or the number of changed
            features (``norm="l0"``); None without a candidate.
        rows: number of constraint rows of the LP solved (0 for ``l0``).
    """

    input: int
    origin: int
    target: NeuronTarget
    item: int
    status: str
    distance: float | None = None
    rows: int = 0


@dataclass
class _Call:
    """One module call in the order of a forward pass."""

    name: str
    module: nn.Module
    leaf: bool


class _Structure:
    """The calls of a forward pass and, per layer under test, how to read its requirement (see :class:`Concolic`)."""

    def __init__(self, root: nn.Module, layers: list[str], calls: list[_Call]) -> None:
        self.root = root
        self.layers = layers
        self.calls = calls
        modules = dict(root.named_modules())
        self.target_call: dict[str, int] = {}
        #: per layer: what its value is, "in" (the module's input: a ReLU-like layer's pre-activation, or a layer
        #: named "<module>:input") or "out"; and the slope of its ReLU-like map (0 for ReLU), None for none
        self.read: dict[str, str] = {}
        self.slope: dict[str, float | None] = {}
        for layer in layers:
            name, reads_input = _module_name(layer)
            idx = [i for i, c in enumerate(calls) if c.name == name]
            if not idx:
                raise InputError(f"layer {layer!r} is not called during the forward pass: choose layers the model uses")
            self.target_call[layer] = idx[-1]  # the coverage probe keeps the last call's output, as here
            m = modules[name]
            relu = isinstance(m, _RELU) and not reads_input
            self.slope[layer] = _slope(m) if relu else None
            self.read[layer] = "in" if relu or reads_input else "out"
        self.checked = False

    def pattern_calls(self, layer: str) -> list[int]:
        """Indices of the ReLU and max-pooling calls the layer's value depends on: those completed before its call,
        and its own when the value is its output (a max-pooling layer's argmax)."""
        end = self.target_call[layer] + (self.read[layer] == "out")
        return [i for i, c in enumerate(self.calls[:end]) if isinstance(c.module, (*_RELU, *_MAXPOOL))]

    def check_linear(self) -> None:
        """Raise InputError when a module before a layer under test is outside what the LP encodes."""
        # a layer read at its input needs only what runs before its module; one read at its output, the module too
        end = max(k + (self.read[la] == "out" or self.slope[la] is not None) for la, k in self.target_call.items())
        for k, c in enumerate(self.calls[:end]):
            m = c.module
            if not c.leaf or isinstance(m, _AFFINE_OK):
                continue
            layer = min((la for la in self.layers if self.target_call[la] >= k), key=self.target_call.__getitem__)
            if isinstance(m, nn.LeakyReLU) and not 0.0 <= m.negative_slope <= 1.0:
                raise InputError(f"module {c.name!r}: LeakyReLU slopes outside [0, 1] are not supported")
            if isinstance(m, _RELU):
                if getattr(m, "inplace", False):
                    raise InputError(
                        f"module {c.name!r} is an in-place {type(m).__name__}: its hooks see the activation, not the "
                        "pre-activation the linear program needs; build it with inplace=False"
                    )
                continue
            if isinstance(m, nn.MaxPool2d):
                if m.ceil_mode or m.return_indices:
                    raise InputError(
                        f"concolic testing with norm='linf' supports MaxPool2d with ceil_mode=False only; module "
                        f"{c.name!r} ({m!r}) is not; use norm='l0'"
                    )
                continue
            raise InputError(
                f"concolic testing with norm='linf' solves a linear program over the linear region of a "
                f"piecewise-linear network, but module {c.name!r} ({type(m).__name__}) is executed before or at "
                f"the layer under test {layer!r}; supported are Linear, convolutions, ReLU, LeakyReLU, MaxPool2d, "
                "average pooling, Flatten, BatchNorm, Dropout, padding and Normalize. Use norm='l0' (which only "
                "evaluates the model) or test earlier layers (layers=[...])"
            )
        _functional_check(self.root, self.layers)


def _module_name(layer: str) -> tuple[str, bool]:
    """The module a layer name refers to, and whether the layer is that module's input (``"<module>:input"``)."""
    return (layer[: -len(INPUT_SUFFIX)], True) if layer.endswith(INPUT_SUFFIX) else (layer, False)


def _slope(m: nn.Module) -> float:
    return float(m.negative_slope) if isinstance(m, nn.LeakyReLU) else 0.0


def _functional_check(root: nn.Module, layers: list[str]) -> None:
    """Refuse nonlinear functions called in ``forward`` before a layer under test (torch.fx; skipped if untraceable)."""
    try:
        graph = torch.fx.symbolic_trace(root).graph
    except Exception:  # a model fx cannot trace is checked by its module hooks only
        return
    nodes = list(graph.nodes)
    last = -1
    for i, n in enumerate(nodes):
        if n.op == "call_module" and any(
            n.target == la or str(n.target).startswith(la + ".") for la in (_module_name(x)[0] for x in layers)
        ):
            last = i
    for n in nodes[: last + 1]:
        if n.op not in ("call_function", "call_method"):
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name in _NONLINEAR_FUNCTIONS:
            raise InputError(
                f"concolic testing with norm='linf' reads activation patterns from modules, but the model calls "
                f"the nonlinear function {name!r} (fx node {n.name!r}) in its forward before a layer under test; "
                "use modules (nn.ReLU(), nn.MaxPool2d(...)) instead, or norm='l0'"
            )


@contextmanager
def _hooks(root: nn.Module, names: set[str], fn: Callable[[str, nn.Module, Any, Any], Any]) -> Iterator[None]:
    """Forward hooks calling ``fn(name, module, inputs, output)`` on the modules ``names``; a value ``fn`` returns
    replaces the module's output (as a forward hook's does)."""
    modules = dict(root.named_modules())
    handles = []
    for name in names:

        def hook(m: nn.Module, inputs: Any, output: Any, name: str = name) -> Any:
            return fn(name, m, inputs, output)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first(t: Any) -> Tensor:
    out = t[0] if isinstance(t, (tuple, list)) else t
    if not isinstance(out, Tensor):
        raise InputError(f"a module returned {type(out).__name__}, not a tensor: concolic testing cannot read it")
    return out


def _pre_interval(target: NeuronTarget, slope: float | None) -> tuple[float, float] | None:
    """The requirement on the pre-activation of a ReLU-like neuron (None: no pre-activation meets it)."""
    lo, hi = float(target.lower), float(target.upper)
    if slope is None:
        return lo, hi
    if slope == 0.0:
        if hi < 0.0:
            return None
        return (-math.inf if lo < 0.0 else lo), hi

    def inv(v: float) -> float:
        return v if v >= 0.0 else v / slope

    return inv(lo), inv(hi)


class Concolic(TestGenerator):
    """Concolic test generation (Sun et al., ASE 2018); see the module docstring for the algorithm.

    Args:
        norm: ``"linf"`` (linear programming over the linear region, the paper's main method) or ``"l0"`` (the
            paper's feature-ranking heuristic).
        margin: how far past the requirement's bound the LP asks the target's value to go (DeepConcolic's
            ``act_epsilon``, 1e-4); narrowed for intervals shorter than four margins.
        tries: attempts, each from a different input, before an uncovered requirement is given up (3).
        time_limit: seconds HiGHS may spend on one LP (DeepConcolic's 600).
        l0_values: values each feature is tried at when ranking features, evenly spanning its allowed range
            (DeepConcolic's ``gran``, 2: both ends).
        l0_max_changes: most features one L0 step changes (DeepConcolic's ``mani_range``, 100).
        region: ``"cone"`` (fix the activation pattern of the target's cone only, the default) or ``"full"`` (of
            every neuron before the target's layer, as the paper); see the module docstring.
        ascent: when the LP over ``x0``'s region is infeasible, climb the target's value by this many
            signed-gradient steps in the search box and, if the climb meets the requirement, solve the LP again over
            the region reached (0, the default: the paper's method, no second try).

    Example:
        >>> suite = generate_tests(model, seeds, "nc", "concolic", threat=LpBall("linf", 0.3),
        ...                        budget=100)  # doctest: +SKIP
    """

    name = "concolic"
    paper = "Sun, Wu, Ruan, Huang, Kwiatkowska & Kroening, Concolic Testing for Deep Neural Networks, ASE 2018"

    def __init__(
        self,
        *,
        norm: str = "linf",
        margin: float = 1e-4,
        tries: int = 3,
        time_limit: float = 600.0,
        l0_values: int = 2,
        l0_max_changes: int = 100,
        region: str = "cone",
        ascent: int = 0,
    ) -> None:
        key = canonical_norm(norm)
        if region not in ("cone", "full"):
            raise InputError(f"region must be 'cone' or 'full', got {region!r}")
        if key not in ("linf", "l0"):
            raise InputError(f"concolic testing supports norm 'linf' (linear programming) or 'l0', got {norm!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < math.inf:
            raise InputError(f"margin must be a number >= 0, got {margin!r}")
        for what, v, low in (("tries", tries, 1), ("l0_values", l0_values, 2), ("l0_max_changes", l0_max_changes, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{what} must be an integer >= {low}, got {v!r}")
        if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0:
            raise InputError(f"time_limit must be a number of seconds > 0, got {time_limit!r}")
        self.norm = key
        self.margin = float(margin)
        self.tries = int(tries)
        self.time_limit = float(time_limit)
        self.l0_values = int(l0_values)
        self.l0_max_changes = int(l0_max_changes)
        if isinstance(ascent, bool) or not isinstance(ascent, int) or ascent < 0:
            raise InputError(f"ascent must be an integer >= 0, got {ascent!r}")
        self.region_mode = region
        self.ascent = int(ascent)
        self._reset()
        self._loaded = False
        self._ctx: Any = None

    # -- state ---------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._tried: dict[tuple[str, int], int] = {}  # attempts per requirement
        self._inhibited: dict[str, dict[int, set[int]]] = {}  # layer -> item -> inputs already tried on it
        self._reads: list[int] = []  # batch sizes of the ranking-value reads so far (see _update_values)
        self._last: Attempt | None = None
        self._budget_end = 0  # the query count at which this iteration's budget ends (see propose)
        self._drop_cache()

    def _drop_cache(self) -> None:
        self._values: dict[str, Tensor] = {}  # layer -> ranking values (inputs, neurons): views of _buffers
        self._buffers: dict[str, Tensor] = {}
        #: layer -> per item, the closest untried input's distance and index, and the inputs seen (see _choose)
        self._rank: dict[str, tuple[Tensor, Tensor, int]] = {}
        self._dirty: dict[str, set[int]] = {}  # layer -> items tried since their rank was computed
        self._structure: _Structure | None = None
        self._lin: tuple[int, dict[tuple[int, str], _Linear]] | None = None
        self._targets: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # layer -> requirements of its items

    def state_dict(self) -> dict[str, Any]:
        return {
            "tried": [[layer, item, n] for (layer, item), n in sorted(self._tried.items())],
            "inhibited": [
                [layer, item, sorted(inputs)]
                for layer, items in sorted(self._inhibited.items())
                for item, inputs in sorted(items.items())
            ],
            "reads": list(self._reads),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self._tried = {(str(la), int(it)): int(n) for la, it, n in state.get("tried", [])}
        for la, it, inputs in state.get("inhibited", []):
            self._inhibited.setdefault(str(la), {})[int(it)] = {int(i) for i in inputs}
        self._reads = [int(n) for n in state.get("reads", [])]
        self._loaded = True

    @property
    def last_attempt(self) -> Attempt | None:
        """What the latest iteration tried (None before the first)."""
        return self._last

    def given_up(self) -> list[tuple[str, int]]:
        """The requirements ``(layer, item)`` abandoned after ``tries`` failed attempts."""
        return sorted(k for k, n in self._tried.items() if n >= self.tries)

    # -- the iteration ---------------------------------------------------------------------------------------------
    def propose(self, ctx: GenerationContext) -> tuple[Tensor, Tensor] | None:
        self._bind(ctx)
        metric = ctx.metric
        if type(metric).target is CoverageMetric.target:
            raise InputError(
                f"concolic testing needs a criterion whose items are conditions on single neurons (NC, KMNC, NBC, "
                f"SNAC: CoverageMetric.target); the {metric.name!r} criterion ({type(metric).__name__}) has none"
            )
        n_inputs = ctx.seeds.shape[0] + ctx.tests.shape[0]
        new = max(0, n_inputs - max(sum(self._reads), self._cached()))
        left = ctx.queries_left
        self._budget_end = 0 if left is None else ctx.model.queries + left
        if left is not None and new + 2 > left:
            return None
        self._update_values(ctx)
        assert self._structure is not None
        if self.norm == "linf" and not self._structure.checked:
            self._structure.check_linear()
            self._structure.checked = True
        choice = self._choose(ctx)
        if choice is None:
            return None
        layer, item, target, interval, i = choice
        x0 = ctx.seeds[i] if i < ctx.seeds.shape[0] else ctx.tests[i - ctx.seeds.shape[0]]
        origin = i if i < ctx.seeds.shape[0] else int(ctx.origins[i - ctx.seeds.shape[0]])
        self._inhibited.setdefault(layer, {}).setdefault(item, set()).add(i)
        self._dirty.setdefault(layer, set()).add(item)
        self._tried[(layer, item)] = self._tried.get((layer, item), 0) + 1
        lo, hi = self._box(ctx, origin, x0)
        if self.norm == "linf":
            x, status, dist, rows = self._solve_lp(ctx, layer, target, i, x0, lo, hi)
        else:
            left = None if left is None else left - new - 1
            x, status, dist = self._l0_step(ctx, layer, target, interval, x0, origin, lo, hi, left)
            rows = 0
        self._last = Attempt(i, origin, target, item, status, dist, rows)
        if x is None:
            return ctx.seeds.new_zeros((0, *ctx.seeds.shape[1:])), torch.zeros(0, dtype=torch.long)
        return x.unsqueeze(0), torch.tensor([origin], dtype=torch.long)

    def _bind(self, ctx: GenerationContext) -> None:
        """Start on a new run: a fresh state unless a checkpoint was just loaded; caches always rebuilt."""
        known = self._ctx() if self._ctx is not None else None
        if known is ctx:
            return
        if not self._loaded:
            self._reset()
        self._drop_cache()
        self._loaded = False
        self._ctx = weakref.ref(ctx)

    def _cached(self) -> int:
        return next(iter(self._values.values())).shape[0] if self._values else 0

    # -- ranking values ----------------------------------------------------------------------------------------
    def _read(self, ctx: GenerationContext, x: Tensor, *, counted: bool) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer under test ``(ranking values, criterion values)``, each ``(N, P)``; records the call order.

        The ranking value of a ReLU-like layer is its pre-activation (for an uncovered neuron of neuron coverage the
        output is 0 on every input, the pre-activation says which input is closest); otherwise the value itself.
        """
        root = ctx.model.model
        record_calls = self._structure is None
        calls: list[_Call] = []
        seen: dict[str, tuple[Tensor, Tensor]] = {}  # module -> (input, output) of its last call

        def fn(name: str, m: nn.Module, inputs: Any, output: Any) -> None:
            if record_calls:
                calls.append(_Call(name, m, not any(True for _ in m.children())))
            if name in wanted:
                seen[name] = (_first(inputs).detach(), _first(output).detach())

        wanted = {_module_name(la)[0] for la in ctx.layers}
        names = {n for n, _ in root.named_modules() if n} if record_calls else wanted
        with torch.no_grad(), _hooks(root, names, fn):
            (ctx.model if counted else root)(x)
        if record_calls:
            self._structure = _Structure(root, list(ctx.layers), calls)
        st = self._structure
        assert st is not None
        post: dict[str, Tensor] = {}
        pre: dict[str, Tensor] = {}
        for la in ctx.layers:
            name, reads_input = _module_name(la)
            inp, out = seen[name]
            post[la] = inp if reads_input else out
            pre[la] = inp if st.read[la] == "in" else out
        gran = ctx.metric.granularity
        crit = ctx.metric.values(post)
        return {k: (neuron_values(pre[k], gran), crit[k]) for k in ctx.layers}

    def _update_values(self, ctx: GenerationContext) -> None:
        """Read the ranking values of the inputs not yet cached.

        Every read is recorded by its batch size (``_reads``, checkpointed): a resumed run re-reads the inputs of
        the earlier part uncharged and in the same batches, so that its values are bit for bit those of an
        uninterrupted run (a network's float results can depend on the batch they are computed in).
        """
        total = ctx.seeds.shape[0] + ctx.tests.shape[0]
        have = self._cached()
        if have >= total:
            return
        n_seeds = ctx.seeds.shape[0]

        def inputs(start: int, size: int) -> Tensor:
            if start + size <= n_seeds:
                return ctx.seeds[start : start + size]
            if start >= n_seeds:
                return ctx.tests[start - n_seeds : start - n_seeds + size]
            return torch.cat([ctx.seeds[start:], ctx.tests[: start + size - n_seeds]])

        plan: list[tuple[int, int, bool]] = []  # (first input, batch size, charged)
        pos = 0
        for size in self._reads:
            if pos >= have:
                plan.append((pos, size, False))
            pos += size
        for start in range(max(pos, have), total, _PROBE_BATCH):
            size = min(_PROBE_BATCH, total - start)
            plan.append((start, size, True))
            self._reads.append(size)
        # the values live in buffers grown by doubling, so that one more test costs its own read, not a copy
        n = have
        for start, size, charged in plan:
            for k, (v, _) in self._read(ctx, inputs(start, size), counted=charged).items():
                buf = self._buffers.get(k)
                if buf is None or buf.shape[0] < start + size:
                    grown = v.new_empty((max(2 * (start + size), 64), v.shape[1]))
                    if buf is not None:
                        grown[:n] = buf[:n]
                    self._buffers[k] = buf = grown
                buf[start : start + size] = v
            n = start + size
        self._values = {k: b[:n] for k, b in self._buffers.items()}

    def _table(self, ctx: GenerationContext, layer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every item's requirement on the ranking value: ``(neuron, lower, upper, solvable)``, each ``(items,)``."""
        if layer not in self._targets:
            st = self._structure
            assert st is not None
            n_items = int(ctx.metric.first[layer].numel())
            neurons, bounds, ok = [], [], []
            for item in range(n_items):
                t = ctx.metric.target(layer, item)
                interval = _pre_interval(t, st.slope[layer])  # None: e.g. a ReLU output below 0
                neurons.append(int(t.neuron))
                bounds.append(interval or (math.inf, -math.inf))
                ok.append(interval is not None)
            dev = self._values[layer].device
            b = torch.tensor(bounds, dtype=torch.float64).reshape(-1, 2).to(dev)
            self._targets[layer] = (
                torch.tensor(neurons, dtype=torch.long, device=dev), b[:, 0], b[:, 1],
                torch.tensor(ok, dtype=torch.bool, device=dev),
            )  # fmt: skip
        return self._targets[layer]

    def _distances(self, layer: str, items: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Per item of ``items``: the smallest distance of its ranking value to its requirement over the inputs from
        ``start`` on that were not tried on it yet, and the first input attaining it (``inf`` and 0 for none)."""
        neurons, lower, upper, _ = self._targets[layer]
        values = self._values[layer][start:]  # (N', P)
        inhibited = self._inhibited.get(layer, {})
        d_out = torch.full((items.numel(),), math.inf, dtype=torch.float64, device=values.device)
        i_out = torch.zeros(items.numel(), dtype=torch.long, device=values.device)
        if values.shape[0] == 0:
            return d_out, i_out
        step = max(1, 2**22 // values.shape[0])
        for s in range(0, items.numel(), step):
            chunk = items[s : s + step]
            v = values[:, neurons[chunk]].double()  # (N', Q)
            dist = (lower[chunk] - v).clamp(min=0) + (v - upper[chunk]).clamp(min=0)
            if inhibited:  # pairs tried before are out
                where = {item: q for q, item in enumerate(chunk.tolist())}
                for item in where.keys() & inhibited.keys():
                    rows = [r - start for r in inhibited[item] if r >= start]
                    dist[rows, where[item]] = math.inf
            d_out[s : s + step], i_out[s : s + step] = dist.min(dim=0)
        return d_out, i_out + start

    def _choose(self, ctx: GenerationContext) -> tuple[str, int, NeuronTarget, tuple[float, float], int] | None:
        """The shallowest layer's (requirement, input) pair closest to being met, never tried before.

        Per layer the best input of every item is kept (``_rank``) and updated with the inputs added since, and for
        the items tried since (their best input is then out); the answer is that of a scan over all pairs.
        """
        metric = ctx.metric
        st = self._structure
        assert st is not None
        for layer in sorted(ctx.layers, key=lambda la: (st.target_call[la], st.read[la] == "out")):  # shallowest first
            first = metric.first.get(layer)
            if first is None or not bool((first < 0).any()):
                continue
            _, lower, upper, ok = self._table(ctx, layer)
            n = self._values[layer].shape[0]
            if layer not in self._rank:
                every = torch.arange(ok.numel(), device=ok.device)
                self._rank[layer] = (*self._distances(layer, every, 0), n)
                self._dirty.pop(layer, None)
            d_best, i_best, seen = self._rank[layer]
            if seen < n:  # inputs added since: a strictly closer one takes over (ties keep the earlier input)
                d_new, i_new = self._distances(layer, torch.arange(ok.numel(), device=ok.device), seen)
                better = d_new < d_best
                d_best, i_best = torch.where(better, d_new, d_best), torch.where(better, i_new, i_best)
            dirty = self._dirty.pop(layer, set())
            if dirty:
                again = torch.tensor(sorted(dirty), dtype=torch.long, device=ok.device)
                d_best[again], i_best[again] = self._distances(layer, again, 0)
            self._rank[layer] = (d_best, i_best, n)
            open_mask = (first.to(ok.device) < 0) & ok
            closed = [item for (la, item), k in self._tried.items() if la == layer and k >= self.tries]
            if closed:
                open_mask[closed] = False
            d = torch.where(open_mask, d_best, math.inf)
            item = int(torch.argmin(d))
            if not math.isfinite(float(d[item])):
                continue
            i = int(i_best[item])
            return layer, item, metric.target(layer, item), (float(lower[item]), float(upper[item])), i
        return None

    def _box(self, ctx: GenerationContext, origin: int, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Per-feature bounds of the search: the domain, within the l∞ threat ball around the seed if there is one."""
        lo_d, hi_d = ctx.domain
        lo = torch.full_like(x0, lo_d)
        hi = torch.full_like(x0, hi_d)
        if isinstance(ctx.threat, LpBall) and ctx.threat.norm == "linf" and math.isfinite(ctx.threat.eps):
            s = ctx.seeds[origin]
            lo = torch.maximum(lo, s - ctx.threat.eps)
            hi = torch.minimum(hi, s + ctx.threat.eps)
        return lo, hi

    # -- L-infinity: linear programming ------------------------------------------------------------------------
    def _forward(self, ctx: GenerationContext, x0: Tensor, wanted: set[tuple[int, str]]) -> Callable[..., Any]:
        """``f(x_flat) -> values of the wanted calls`` (in sorted order), the forward pass stopped after the last."""
        st = self._structure
        assert st is not None
        root = ctx.model.model
        order = sorted(wanted)
        last = order[-1][0]
        names = {c.name for c in st.calls}
        shape = tuple(x0.shape)

        def f(xf: Tensor) -> tuple[Tensor, ...]:
            got: dict[tuple[int, str], Tensor] = {}
            count = [0]

            def fn(name: str, m: nn.Module, inputs: Any, output: Any) -> None:
                k = count[0]
                count[0] += 1
                for how in ("in", "out"):
                    if (k, how) in wanted:
                        got[(k, how)] = _first(inputs if how == "in" else output)[0]
                if k >= last:
                    raise _Stop  # nothing after the last wanted call is needed

            try:
                with _hooks(root, names, fn):
                    root(xf.view(1, *shape))
            except _Stop:
                pass
            return tuple(got[k] for k in order)

        return f

    def _linearize(
        self, ctx: GenerationContext, i: int, x0: Tensor, layer: str, columns: Tensor | None = None
    ) -> dict[tuple[int, str], _Linear]:
        """``{(call, "in"): (values (K,), Jacobian (K, D), per-sample shape)}`` of the ReLU-like and max-pooling calls
        that ``layer``'s value depends on, at input ``i`` (``x0``), in the model's dtype.

        Forward-mode differentiation (``jvp`` batched over the input's basis with ``vmap``), the forward pass cut
        after the deepest call needed. Cached for the latest input and extended when a deeper layer needs more.
        With ``columns`` (input indices) only those columns of the Jacobians are computed (K, len(columns)), not
        cached.
        """
        ctx.model.queries += 1  # one linearisation: one forward pass with derivatives
        st = self._structure
        assert st is not None
        cached = columns is None and i >= 0  # i < 0: a point that is not an input (an ascent's end), not cached
        if cached and (self._lin is None or self._lin[0] != i):
            self._lin = (i, {})
        have: dict[tuple[int, str], _Linear] = self._lin[1] if cached and self._lin is not None else {}
        missing = {(k, "in") for k in st.pattern_calls(layer)} - have.keys()
        if missing:
            order = sorted(missing)
            f = self._forward(ctx, x0, missing)
            x_flat = x0.detach().flatten()
            d = x_flat.numel()
            with torch.no_grad():
                primal = f(x_flat)
            size = sum(p.numel() for p in primal)
            basis = torch.eye(d, dtype=x_flat.dtype, device=x_flat.device)
            if columns is not None:
                basis = basis[columns]
            n = basis.shape[0]
            chunk = max(1, min(n, 2**25 // max(1, size)))
            from torch.func import jvp, vmap

            with warnings.catch_warnings():
                # torch loads its forward-AD decompositions with the deprecated torch.jit.script (once per process)
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                tangents = vmap(lambda v: jvp(f, (x_flat,), (v,))[1], chunk_size=chunk)(basis)
            for k, p, j in zip(order, primal, tangents):
                have[k] = (p.detach().flatten(), j.detach().reshape(n, -1).T, tuple(p.shape))
        return have

    def _target_rows(self, ctx: GenerationContext, shp: tuple[int, ...], target: NeuronTarget, device: Any) -> Tensor:
        """Indices, in the flattened value of the target's layer, of the rows that make up the target (one neuron,
        or a channel's map)."""
        j = int(target.neuron)
        if ctx.metric.granularity == "channel" and len(shp) >= 2:
            per = int(np.prod(shp[1:]))
            return torch.arange(j * per, (j + 1) * per, device=device)
        return torch.tensor([j], device=device)

    def _target_values(
        self, ctx: GenerationContext, x0: Tensor, layer: str, target: NeuronTarget
    ) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """The values (R,) and input Jacobian (R, D) of the target's rows (:meth:`_target_rows`) and the layer's
        per-sample shape: reverse mode, one backward pass per row."""
        st = self._structure
        assert st is not None
        full = self._forward(ctx, x0, {(st.target_call[layer], st.read[layer])})
        x_flat = x0.detach().flatten()
        with torch.no_grad():
            shp = tuple(full(x_flat)[0].shape)
        rows = self._target_rows(ctx, shp, target, x_flat.device)
        from torch.func import vjp, vmap

        val, pull = vjp(lambda xf: full(xf)[0].flatten()[rows], x_flat)  # type: ignore[misc]
        basis = torch.eye(rows.numel(), dtype=val.dtype, device=val.device)
        (jac,) = vmap(pull)(basis)
        return val.detach(), jac.detach(), shp

    def _cone(self, ctx: GenerationContext, x0: Tensor, layer: str, target: NeuronTarget) -> dict[int, Tensor] | None:
        """Per pattern call, which of its neurons the target depends on at all (a boolean mask over the call's
        flattened input; key -1: which input features), or None where that cannot be read (then the whole pattern
        is encoded).

        Read structurally, whatever the input: the forward pass is run with every ReLU-like call replaced by the
        identity and every max-pooling call by a sum over its window, so that every path from a neuron to the target
        is open, and the mask is where the target's gradient with respect to the call's input is non-zero.
        """
        st = self._structure
        assert st is not None
        pattern = st.pattern_calls(layer)
        if not pattern:
            return None
        if any(isinstance(st.calls[k].module, nn.MaxPool2d) and _pair(st.calls[k].module.dilation) != (1, 1)
               for k in pattern):  # fmt: skip
            return None
        root = ctx.model.model
        tk, how = st.target_call[layer], st.read[layer]
        wanted = set(pattern)
        captured: dict[int, Tensor] = {}
        got: list[Tensor] = []
        count = [0]

        def hook(name: str, m: nn.Module, inputs: Any, output: Any) -> Any:
            k = count[0]
            count[0] += 1
            inp = _first(inputs)
            if k in wanted:
                captured[k] = inp
            out = None
            if k <= tk and st.calls[k].leaf and isinstance(m, _RELU):
                out = inp * 1.0
            elif k <= tk and st.calls[k].leaf and isinstance(m, nn.MaxPool2d):
                ks = _pair(m.kernel_size)
                out = F.avg_pool2d(inp, ks, _pair(m.stride or m.kernel_size), _pair(m.padding)) * (ks[0] * ks[1])
            if k == tk:
                got.append(inp if how == "in" else (_first(output) if out is None else out))
                raise _Stop
            return out

        x = x0.detach().clone().unsqueeze(0).requires_grad_(True)
        captured[-1] = x
        with torch.enable_grad():
            try:
                with _hooks(root, {c.name for c in st.calls}, hook):
                    root(x)
            except _Stop:
                pass
            value = got[0][0].flatten()
            rows = self._target_rows(ctx, tuple(got[0][0].shape), target, value.device)
            order = sorted(captured)
            grads = torch.autograd.grad(value[rows].sum(), [captured[k] for k in order], allow_unused=True)
        masks: dict[int, Tensor] = {}
        for k, gr in zip(order, grads):
            n = captured[k][0].numel()
            masks[k] = torch.zeros(n, dtype=torch.bool, device=x.device) if gr is None else gr[0].flatten() != 0
        return masks if set(masks) == wanted | {-1} else None

    def _region(
        self, ctx: GenerationContext, layer: str, target: NeuronTarget, i: int, at: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float, tuple[float, float]]:
        """:meth:`region` in the model's dtype and device (rows ``(R, D + 1)``, ``g (D,)``); with ``at``, the
        linear region of that point instead of input ``i``'s."""
        self._bind(ctx)
        self._update_values(ctx)
        st = self._structure
        assert st is not None
        x0 = ctx.seeds[i] if i < ctx.seeds.shape[0] else ctx.tests[i - ctx.seeds.shape[0]]
        if at is not None:
            x0, i = at, -1
        cone = self._cone(ctx, x0, layer, target) if self.region_mode == "cone" else None
        xf = x0.detach().flatten()
        d = xf.numel()
        # with a cone, the rows are built on the input features the target depends on only (the Jacobians of the
        # cone's neurons are zero elsewhere), then widened to all D
        cols = None if cone is None else cone[-1].nonzero().flatten()
        lin = self._linearize(ctx, i, x0, layer, cols)
        xs = xf if cols is None else xf[cols]
        rows: list[Tensor] = []
        for k in st.pattern_calls(layer):
            val, jac, shp = lin[(k, "in")]
            keep = None if cone is None else cone[k]
            m = st.calls[k].module
            if isinstance(m, _RELU):
                if keep is not None:
                    val, jac = val[keep], jac[keep]
                c = val - jac @ xs
                sign = torch.where(val > 0, 1.0, -1.0).to(val.dtype)
                rows.append(torch.cat([jac * sign[:, None], (c * sign)[:, None]], dim=1))
            else:
                rows.append(_maxpool_rows(m, val, jac, val - jac @ xs, shp, keep))
        if cols is not None:
            for r, part in enumerate(rows):
                wide = part.new_zeros((part.shape[0], d + 1))
                wide[:, cols] = part[:, :-1]
                wide[:, d] = part[:, -1]
                rows[r] = wide
        rows.insert(0, xf.new_zeros((0, d + 1)))
        val, jac, shp = self._target_values(ctx, x0, layer, target)
        g, c0, channel_rows = _target_row(
            target, ctx.metric.granularity, st.slope[layer], val, jac, val - jac @ xf, shp
        )
        if channel_rows is not None:
            rows.append(channel_rows)
        bounds = _pre_interval(target, st.slope[layer]) or (math.inf, -math.inf)
        if st.slope[layer] is not None and ctx.metric.granularity == "channel" and len(shp) >= 2:
            bounds = (float(target.lower), float(target.upper))  # the channel's mean, not one pre-activation
        return torch.cat(rows), g, c0, bounds

    def region(
        self, ctx: GenerationContext, layer: str, target: NeuronTarget, i: int
    ) -> tuple[np.ndarray, np.ndarray, float, tuple[float, float]]:
        """The linear program's constraints for requirement ``target`` from input ``i`` (seeds, then kept tests).

        Returns ``(rows, g, c0, (lower, upper))``: each row ``[a, b]`` of ``rows`` (R, D + 1) is a constraint
        ``a·x + b >= 0`` of the linear region of input ``i`` (ReLU signs and max-pooling argmaxes of the layers
        before ``layer``, and for a channel target the pattern of that channel); ``g·x + c0`` is the target's value
        on the region (its pre-activation for a ReLU-like layer), to be brought into ``(lower, upper]``.
        """
        rows, g, c0, bounds = self._region(ctx, layer, target, i)
        return rows.double().cpu().numpy(), g.double().cpu().numpy(), c0, bounds

    def _solve_lp(
        self, ctx: GenerationContext, layer: str, target: NeuronTarget, i: int, x0: Tensor, lo: Tensor, hi: Tensor
    ) -> tuple[Tensor | None, str, float | None, int]:
        got = self._lp(ctx, layer, target, i, x0, lo, hi, None)
        if got[1] != "infeasible" or self.ascent == 0:
            return got
        # x0's region cannot meet the requirement: climb the target's value by gradient steps in the box and, when
        # the climb gets there, solve again over the region reached (the closest point to x0 there). The climb
        # (steps + 1 passes), the second linearisation and the loop's re-execution stay within the query budget.
        left = None if ctx.queries_left is None else self._budget_end - ctx.model.queries
        steps = self.ascent if left is None else min(self.ascent, left - 3)
        x1 = self._ascend(ctx, layer, target, x0, lo, hi, steps) if steps > 0 else None
        if x1 is None:
            return got
        again = self._lp(ctx, layer, target, i, x0, lo, hi, x1)
        return again if again[1] == "solved" else got

    def _ascend(
        self, ctx: GenerationContext, layer: str, target: NeuronTarget, x0: Tensor, lo: Tensor, hi: Tensor, steps: int
    ) -> Tensor | None:
        """Signed-gradient ascent (at most ``steps`` steps of 2.5 / ``ascent`` of the box's half-width, projected onto
        the box) on the target's distance to its requirement; the first point that meets it, or None."""
        st = self._structure
        assert st is not None
        f = self._forward(ctx, x0, {(st.target_call[layer], st.read[layer])})
        interval = _pre_interval(target, st.slope[layer])
        if interval is None:
            return None
        lo_t, hi_t = interval
        if st.slope[layer] is not None and ctx.metric.granularity == "channel":
            lo_t, hi_t = float(target.lower), float(target.upper)
        lo_f, hi_f = lo.flatten(), hi.flatten()
        step = 2.5 * float((hi_f - lo_f).max()) / 2 / self.ascent
        x = x0.detach().flatten().clone()
        rows: Tensor | None = None
        for _ in range(steps):
            ctx.model.queries += 1  # one forward and backward pass
            x.requires_grad_(True)
            with torch.enable_grad():
                out = f(x)[0]
                if rows is None:
                    rows = self._target_rows(ctx, tuple(out.shape), target, x.device)
                v = out.flatten()[rows].mean()
                if lo_t + self.margin < float(v.detach()) <= hi_t - self.margin:
                    return x.detach().view(x0.shape)
                gap = (lo_t - v).clamp(min=0) + (v - hi_t).clamp(min=0)
                (grad,) = torch.autograd.grad(-gap, x)
            x = torch.minimum(torch.maximum(x.detach() + step * grad.sign(), lo_f), hi_f)
        ctx.model.queries += 1
        with torch.no_grad():
            assert rows is not None
            v = f(x)[0].flatten()[rows].mean()
        return x.view(x0.shape) if lo_t + self.margin < float(v) <= hi_t - self.margin else None

    def _lp(
        self,
        ctx: GenerationContext,
        layer: str,
        target: NeuronTarget,
        i: int,
        x0: Tensor,
        lo: Tensor,
        hi: Tensor,
        at: Tensor | None,
    ) -> tuple[Tensor | None, str, float | None, int]:
        from scipy import sparse
        from scipy.optimize import linprog

        pattern, g, c0, (lo_t, hi_t) = self._region(ctx, layer, target, i, at)
        xf = x0.detach().flatten().double().cpu().numpy()
        d = xf.size
        if not bool(g.any()) or not lo_t < hi_t:
            return None, "infeasible", None, 0  # the target is constant on the region
        margin = self.margin
        if math.isfinite(lo_t) and math.isfinite(hi_t):
            margin = min(margin, (hi_t - lo_t) / 4)
        rows = [pattern]
        if math.isfinite(lo_t):
            rows.append(torch.cat([g, g.new_tensor([c0 - lo_t - margin])])[None, :])
        if math.isfinite(hi_t):
            rows.append(torch.cat([-g, g.new_tensor([hi_t - margin - c0])])[None, :])
        a = torch.cat(rows)
        gmat, cvec = a[:, :d], a[:, d]
        # Rows that cannot bind inside the box (their minimum over it is >= 0) are dropped, as are constant ones.
        # The test is made in the model's precision with a relative slack, so a row is only dropped when it is
        # clearly slack; the target rows are always kept.
        lo_b, hi_b = lo.flatten().to(a), hi.flatten().to(a)
        scale = cvec.abs() + gmat.abs() @ torch.maximum(lo_b.abs(), hi_b.abs())
        nonzero = gmat.abs().amax(dim=1) > 0
        if bool(((~nonzero) & (cvec < 0)).any()):
            return None, "infeasible", None, 0
        box_min = cvec + gmat.clamp(min=0) @ lo_b + gmat.clamp(max=0) @ hi_b
        keep = nonzero & (box_min < 1e-5 * scale)
        keep[pattern.shape[0] :] = True
        gmat_n = gmat[keep].double().cpu().numpy()
        cvec_n = cvec[keep].double().cpu().numpy()
        lo_n, hi_n = lo_b.double().cpu().numpy(), hi_b.double().cpu().numpy()
        r = gmat_n.shape[0]
        # variables z = [x (D), t]; A_ub z <= b_ub:  -a·x <= b;  x - t <= x0;  -x - t <= -x0
        eye = sparse.identity(d, format="csr")
        col = sparse.csr_matrix(np.ones((d, 1)))
        a_ub = sparse.vstack(
            [
                sparse.hstack([sparse.csr_matrix(-gmat_n), sparse.csr_matrix((r, 1))]),
                sparse.hstack([eye, -col]),
                sparse.hstack([-eye, -col]),
            ],
            format="csr",
        )
        b_ub = np.concatenate([cvec_n, xf, -xf])
        cost = np.zeros(d + 1)
        cost[d] = 1.0
        bounds = np.vstack([np.column_stack([lo_n, hi_n]), [[0.0, np.inf]]])
        res = linprog(
            cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs", options={"time_limit": self.time_limit}
        )
        if res.status == 2:
            return None, "infeasible", None, r
        if res.status != 0 or res.x is None:
            return None, "failed", None, r
        x = np.clip(res.x[:d], lo_n, hi_n)
        cand = torch.as_tensor(x, dtype=x0.dtype, device=x0.device).reshape(x0.shape)
        return cand, "solved", float(np.abs(x - xf).max()), r

    # -- L0: the feature-ranking heuristic ------------------------------------------------------------------------
    def _l0_step(
        self,
        ctx: GenerationContext,
        layer: str,
        target: NeuronTarget,
        interval: tuple[float, float],
        x0: Tensor,
        origin: int,
        lo: Tensor,
        hi: Tensor,
        left: int | None,
    ) -> tuple[Tensor | None, str, float | None]:
        flat = x0.flatten()
        d = flat.numel()
        shape = x0.shape
        budget = None
        if isinstance(ctx.threat, LpBall) and ctx.threat.norm == "l0" and math.isfinite(ctx.threat.eps):
            budget = int(ctx.threat.eps)
        seed = ctx.seeds[origin].flatten()
        j = int(target.neuron)
        lo_p, hi_p = interval

        def evaluate(xs: Tensor) -> tuple[Tensor, Tensor]:
            """Scores (higher: closer to the requirement) and whether it is met, per row of ``xs`` (B, D)."""
            scores, met = [], []
            for s in range(0, xs.shape[0], _PROBE_BATCH):
                got = self._read(ctx, xs[s : s + _PROBE_BATCH].reshape(-1, *shape), counted=True)[layer]
                v_rank, v_crit = got[0][:, j], got[1][:, j]
                scores.append(-((lo_p - v_rank).clamp(min=0) + (v_rank - hi_p).clamp(min=0)))
                met.append((v_crit > target.lower) & (v_crit <= target.upper))
            return torch.cat(scores), torch.cat(met)

        cost = d * self.l0_values + min(self.l0_max_changes, d)
        if left is not None and cost + 1 > left:
            return None, "failed", None
        # 1. rank features: each set alone to each of l0_values values of its allowed range
        levels = torch.linspace(0, 1, self.l0_values, dtype=flat.dtype, device=flat.device)
        lo_f, hi_f = lo.flatten(), hi.flatten()
        vals = lo_f[None, :] + levels[:, None] * (hi_f - lo_f)[None, :]  # (G, D)
        ar = torch.arange(d, device=flat.device)
        score = torch.empty(self.l0_values * d, dtype=flat.dtype, device=flat.device)
        for s in range(0, self.l0_values * d, _PROBE_BATCH):  # trial r: feature r % D set to value r // D
            r = torch.arange(s, min(s + _PROBE_BATCH, self.l0_values * d), device=flat.device)
            trial = flat.repeat(r.numel(), 1)
            trial[torch.arange(r.numel(), device=flat.device), r % d] = vals[r // d, r % d]
            score[r] = evaluate(trial)[0]
        score = score.view(self.l0_values, d)
        best_score, best_g = score.max(dim=0)
        best_val = vals[best_g, ar]
        movable = best_val != flat
        order = torch.argsort(-best_score.masked_fill(~movable, -math.inf), stable=True)
        order = order[: int(movable.sum())][: self.l0_max_changes]
        if order.numel() == 0:
            return None, "infeasible", None
        # 2. accumulate: change the top-ranked features one after another
        prefixes = flat.repeat(order.numel(), 1)
        mask = torch.tril(torch.ones(order.numel(), order.numel(), dtype=torch.bool, device=flat.device))
        full = torch.zeros(order.numel(), d, dtype=torch.bool, device=flat.device)
        full[:, order] = mask
        prefixes = torch.where(full, best_val[None, :], prefixes)
        _, met = evaluate(prefixes)
        if budget is not None:
            met &= (prefixes != seed[None, :]).sum(dim=1) <= budget
        if not bool(met.any()):
            return None, "infeasible", None
        k = int(met.nonzero()[0])
        x = prefixes[k].clone()
        changed = order[: k + 1].tolist()
        spent = cost
        # 3. refine: revert each change that the requirement does not need, until none can be reverted
        progress = True
        while progress and len(changed) > 1:
            progress = False
            for f in list(changed):
                if left is not None and spent + 2 > left:
                    break
                y = x.clone()
                y[f] = flat[f]
                spent += 1
                if bool(evaluate(y[None, :])[1][0]):
                    x = y
                    changed.remove(f)
                    progress = True
                    if len(changed) == 1:
                        break
        return x.view(shape), "solved", float((x != flat).sum())


def _maxpool_rows(
    m: nn.Module, val: Tensor, jac: Tensor, c: Tensor, shp: tuple[int, ...], keep: Tensor | None = None
) -> Tensor:
    """Rows ``u_argmax - u_other >= 0`` keeping each max-pooling window's argmax (input of shape (C, H, W)); with
    ``keep`` (a mask over the input's elements) only the rows of which both elements are kept."""
    assert isinstance(m, nn.MaxPool2d)
    ch, h, w = shp
    u = val.detach().view(1, ch, h, w)
    k, s, p, dil = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation))
    _, idx = F.max_pool2d(u, k, s, p, dil, ceil_mode=False, return_indices=True)  # (1, C, Ho, Wo)
    dev = val.device
    pos = torch.arange(h * w, dtype=torch.float64, device=dev).view(1, 1, h, w)
    pos = F.pad(pos, (p[1], p[1], p[0], p[0]), value=-1.0)
    win = F.unfold(pos, k, dilation=dil, stride=s)[0].long()  # (kk, L): window members, -1 for padding
    arg = idx.view(ch, -1)  # (C, L)
    base = (torch.arange(ch, device=dev) * h * w)[:, None, None]
    a = (base + arg[:, None, :]).expand(ch, win.shape[0], arg.shape[1])
    e = base + win[None, :, :]
    ok = (win[None, :, :] >= 0) & (win[None, :, :] != arg[:, None, :])
    if keep is not None:
        ok &= keep[a] & keep[e.clamp(min=0)]
    ai, ei = a[ok], e[ok]
    if ai.numel() == 0:
        return jac.new_zeros((0, jac.shape[1] + 1))
    return torch.cat([jac[ai] - jac[ei], (c[ai] - c[ei])[:, None]], dim=1)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _target_row(
    target: NeuronTarget,
    granularity: str,
    slope: float | None,
    val: Tensor,
    jac: Tensor,
    c: Tensor,
    shp: tuple[int, ...],
) -> tuple[Tensor, float, Tensor | None]:
    """The target's value as ``g·x + c0`` and, for a channel of a ReLU layer, the rows fixing that channel's pattern.

    ``val``, ``jac`` and ``c`` are the target's rows only (:meth:`Concolic._target_values`): one for an element
    neuron, the channel's map for a channel neuron. Element neurons: the pre-activation of a ReLU-like layer (its
    requirement translated by :func:`_pre_interval`), the output otherwise. Channel neurons (``granularity="channel"``
    on a map): the spatial mean; for a ReLU-like layer the mean of the outputs under the channel's current pattern
    (exact while the pattern holds), or, with no upper bound, the mean of the pre-activations, whose exceeding the
    bound implies the outputs' does.
    """
    if granularity != "channel" or len(shp) < 2:
        return jac[0], float(c[0]), None
    if slope is None or math.isinf(float(target.upper)):
        return jac.mean(dim=0), float(c.mean()), None
    active = val > 0
    factor = torch.where(active, 1.0, slope).to(val.dtype)
    sign = torch.where(active, 1.0, -1.0).to(val.dtype)
    rows = torch.cat([jac * sign[:, None], (c * sign)[:, None]], dim=1)
    return (jac * factor[:, None]).mean(dim=0), float((c * factor).mean()), rows
