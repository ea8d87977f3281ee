"""Coverage-guided testing on MNIST: coverage per criterion, each generator's coverage gain, and coverage speed.

Two models, trained here on the first 8,000 MNIST test images (the shared data has no training set) and cached in
``benchmarks/.cache``:

* ``lenet``: the zoo ``cnn`` (LeNet-5 class: two 5x5 convolutions with max-pooling, 32/64 channels, 128 hidden);
* ``large``: the 32-32-64-64-200-200 CNN of Carlini & Wagner (S&P 2017) and DeepConcolic's MNIST experiments
  (3x3 convolutions, max-pooling after each pair, two dense layers of 200).

Three tables:

1. coverage of the 2,000 evaluation images under every registered criterion (profiling criteria profiled on the
   8,000 training images);
2. for every registered image generator: coverage of ``--seeds`` seeds, coverage after ``--iterations`` iterations,
   seconds per kept test and the fraction of adversarial tests (inside the l∞ ball of ``--eps`` for concolic and
   fuzzing; DeepXplore's transformations are not an Lp ball and report disagreements instead);
3. the time of bastion's batched coverage against per-sample Python loops over the same hooks (the issue's target
   is 10x a naive per-sample loop), measured side by side in one process.

Run from the repository root::

    python benchmarks/testing_mnist.py                         # both models, defaults
    python benchmarks/testing_mnist.py --models lenet --iterations 100 --seeds 100 --output /tmp/testing.md

The published reference points are DeepConcolic's (Sun et al., ASE 2018, Table 2): neuron coverage of concolic
testing 97.89 % (L∞) / 97.24 % (L0) on MNIST, against DeepXplore's 80.5-82.5 %.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.defenses.training import train
from bastion.errors import BastionError
from bastion.models import build_model, load_model, save_model
from bastion.testing import GENERATORS, METRICS, generate_tests, make_metric, measure
from bastion.testing.coverage import LayerProbe
from bastion.threat import LpBall

#: Criteria parameters of the benchmark (the papers' defaults otherwise). MC/DC pairs every neuron of a layer with
#: every neuron of the next: on convolution maps that is 3e8 pairs, so convolution channels are its neurons here.
METRIC_PARAMS: dict[str, dict[str, object]] = {
    "kmnc": {"k": 100},
    **{name: {"granularity": "channel"} for name in ("ss", "sv", "vs", "vv")},
}
#: Generators that work on images, with the options used here.
GENERATOR_OPTIONS: dict[str, dict[str, object]] = {"concolic": {}, "deepxplore": {}, "fuzz": {}}


def large_cnn() -> nn.Module:
    """32-32-64-64-200-200 (Carlini & Wagner 2017's MNIST network, as in DeepConcolic)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10),
    )  # fmt: skip


MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet": lambda: build_model("cnn", common.INPUT_SHAPE, common.NUM_CLASSES),
    "large": large_cnn,
}
TRAIN = {"epochs": 8, "batch_size": 64, "lr": 1e-3, "seed": 0}


def get_model(name: str, split: common.Split, log: Callable[[str], None]) -> nn.Module:
    digest = hashlib.sha256(json.dumps({"model": name, **TRAIN}, sort_keys=True).encode()).hexdigest()[:10]
    path = common.CACHE_DIR / f"testing_{name}_{digest}.pt"
    if path.exists():
        if name == "lenet":
            return load_model(path).eval()
        model = large_cnn()
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(TRAIN["seed"])
    model = MODELS[name]()
    t0 = time.perf_counter()
    train(model, split.train, epochs=TRAIN["epochs"], batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
          seed=TRAIN["seed"], progress=False)  # fmt: skip
    log(f"{name}: trained in {time.perf_counter() - t0:.0f} s, clean accuracy "
        f"{common.accuracy(model, split.x_eval, split.y_eval):.4f}")  # fmt: skip
    common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if name == "lenet":
        save_model(model, path)
    else:
        torch.save(model.state_dict(), path)
    return model.eval()


def coverage_table(models: dict[str, nn.Module], split: common.Split) -> str:
    rows = []
    for name in METRICS:
        if name.startswith("lstm"):
            continue
        row = [name]
        for model in models.values():
            metric = make_metric(name, **METRIC_PARAMS.get(name, {}))  # type: ignore[arg-type]
            t0 = time.perf_counter()
            try:
                (report,) = measure(model, split.eval, [metric], profile=split.train, progress=False)
            except BastionError as exc:  # a criterion that does not apply to this model: say why, go on
                row.append(f"not computed: {str(exc).split(';')[0]}")
                continue
            row.append(
                f"{100 * report.ratio:.2f} % ({report.covered}/{report.total}, {time.perf_counter() - t0:.1f} s)"
            )
        rows.append(row)
    return common.markdown_table(["criterion", *models], rows)


def generator_table(models: dict[str, nn.Module], split: common.Split, args: argparse.Namespace) -> str:
    rows = []
    seeds = split.eval.subset(slice(0, args.seeds))
    for method, options in GENERATOR_OPTIONS.items():
        if method not in GENERATORS or method not in args.methods:
            continue
        for model_name, model in models.items():
            threat = None if method == "deepxplore" else LpBall("linf", args.eps)
            if method == "concolic":
                options = {**options, "tries": args.tries, "norm": args.concolic_norm, "ascent": args.ascent}
            t0 = time.perf_counter()
            suite = generate_tests(model, seeds, "nc", method, threat=threat, budget=args.iterations, seed=0,
                                   progress=args.progress, **options)  # fmt: skip
            seconds = time.perf_counter() - t0
            per_test = f"{seconds / suite.n_tests:.2f}" if suite.n_tests else "-"
            rows.append([method, model_name, f"{100 * suite.seed_coverage.ratio:.2f} %",
                         f"{100 * suite.coverage.ratio:.2f} %", str(suite.n_tests), per_test,
                         f"{100 * suite.adversarial_fraction:.1f} %", f"{seconds:.0f}"])  # fmt: skip
    header = ["method", "model", f"NC of {args.seeds} seeds", f"NC after {args.iterations} it.", "tests",
              "s / test", "adversarial", "s total"]  # fmt: skip
    return common.markdown_table(header, rows)


def speed_table(models: dict[str, nn.Module], split: common.Split, n: int) -> str:
    """Batched coverage against two per-sample loops over the same hooks (alternating runs, median of 3).

    * vectorised per-sample: bastion's own update, one input at a time (what batching alone saves);
    * naive per-neuron: one input at a time and one neuron at a time in Python, as the reference implementations
      (DeepXplore's ``update_coverage``, DeepConcolic's NC loop) compute neuron coverage.
    """
    rows = []
    x = split.x_eval[:n]
    for name, model in models.items():
        layers = make_metric("nc").bind(model)

        def batched(model: nn.Module = model) -> None:
            measure(model, x, [make_metric("nc")], progress=False)

        def per_sample(model: nn.Module = model, layers: list[str] = layers) -> None:
            metric = make_metric("nc")
            metric.bind(model)
            with torch.no_grad(), LayerProbe(model, layers) as probe:
                for i in range(x.shape[0]):
                    metric.update(probe.run(x[i : i + 1])[1], torch.tensor([i]))

        def naive(model: nn.Module = model, layers: list[str] = layers) -> None:
            covered: dict[tuple[str, int], bool] = {}
            with torch.no_grad(), LayerProbe(model, layers) as probe:
                for i in range(x.shape[0]):
                    for layer, out in probe.run(x[i : i + 1])[1].items():
                        for j, v in enumerate(out.flatten().tolist()):
                            if v > 0.0 and not covered.get((layer, j)):
                                covered[(layer, j)] = True

        times: dict[str, list[float]] = {"batched": [], "per-sample": [], "naive": []}
        for _ in range(3):
            for label, fn in (("batched", batched), ("per-sample", per_sample), ("naive", naive)):
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
        b, p, q = (sorted(times[k])[1] for k in ("batched", "per-sample", "naive"))
        rows.append([name, str(n), f"{b:.3f}", f"{p:.3f} ({p / b:.1f}x)", f"{q:.3f} ({q / b:.1f}x)"])
    header = ["model", "inputs", "batched s", "vectorised per-sample s (ratio)", "naive per-neuron s (ratio)"]
    return common.markdown_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=list(GENERATOR_OPTIONS), choices=list(GENERATOR_OPTIONS))
    ap.add_argument("--only", choices=("coverage", "generate", "speed"), default=None, help="one table only")
    ap.add_argument("--seeds", type=int, default=100, help="seed inputs of each generator")
    ap.add_argument("--iterations", type=int, default=200, help="generation iterations")
    ap.add_argument("--eps", type=float, default=0.3, help="l∞ radius of concolic and fuzzing tests")
    ap.add_argument("--tries", type=int, default=3, help="concolic: attempts per requirement before it is given up")
    ap.add_argument(
        "--concolic-norm",
        choices=("linf", "l0"),
        default="linf",
        help="concolic: the l∞ linear program or the L0 heuristic (tests stay in the l∞ --eps ball)",
    )
    ap.add_argument("--ascent", type=int, default=0, help="concolic: gradient steps before a second LP (0: off)")
    ap.add_argument("--speed-n", type=int, default=100, help="inputs of the speed comparison")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--output", type=Path, help="also write the Markdown report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    log("# Coverage-guided testing on MNIST\n")
    log(common.machine_summary())
    split = common.load_split()
    models = {name: get_model(name, split, log) for name in args.models}
    if args.only in (None, "coverage"):
        log("\n### Coverage of the 2,000 evaluation images\n")
        log(coverage_table(models, split))
    if args.only in (None, "generate"):
        log(f"\n### Test generation from {args.seeds} seeds, {args.iterations} iterations (criterion nc)\n")
        log(generator_table(models, split, args))
    if args.only in (None, "speed"):
        log("\n### Batched coverage vs a per-sample loop (nc)\n")
        log(speed_table(models, split, args.speed_n))
    log(f"\n- {common.load_average()} at the end")
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
