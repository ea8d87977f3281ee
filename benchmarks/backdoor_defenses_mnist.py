"""Backdoor defences on MNIST (issue 14, part 2): detection quality, attack success after mitigation, wall time.

The first 8,000 MNIST test images are the training set, the last 2,000 the test set (``common.py``). The training
set is poisoned with BadNets (Gu et al. 2017) — :class:`bastion.poisoning.BadNets` with its defaults (3x3
checkerboard in the bottom-right corner) when that module is importable, else a 3x3 white patch made here — at a
poison rate of 10 % and of 33 % of the training set, in two label maps:

* **all-to-all** (class ``y`` → ``y + 1``): every class then holds that fraction of poison, all drawn from one source
  class: the protocol of ART's MNIST notebooks for spectral signatures and activation clustering (33 % poison) and of
  the papers (Tran et al., NeurIPS 2018; Chen et al., SafeAI 2019). The data-level detectors run here: spectral
  signatures (``ε`` = the rate), activation clustering (FastICA, the paper; and PCA), sphere sanitisation in
  feature space. Mitigation: retrain from scratch on the samples not flagged and measure the attack success (ASR).
* **all-to-one** (target 0): the model-level defences run here. Neural Cleanse (Wang et al., S&P 2019) on 1,000
  clean test images (does it flag class 0? anomaly index; mitigation: unlearning on those images), fine-pruning
  (Liu et al., RAID 2018; prune until clean accuracy drops 4 points, fine-tune), STRIP (Gao et al., ACSAC 2019) on
  500 clean and 500 triggered test images of the other classes, with the other 500 clean test images as its held-out
  set (FRR 1 %; both the paper's α-blend and the authors' saturated sum). The data-level detectors are also run on
  this training set to show how they fare when the poison is the *majority* of the target class (10 % of the training
  set relabelled 0 is about 52 % of class 0; 33 % is about 80 %).

Every model is the zoo ``cnn`` with channels 16/32 and hidden 128, trained with bastion's trainer (Adam, lr 3e-3,
batch 64, seed 0, 4 epochs). Reported per defence: precision/recall/F1 of the flagged training samples (or of the
flagged test inputs for STRIP), ASR before and after mitigation, clean accuracy after, and wall time of the defence
(and of the retraining). ART's MNIST notebooks demonstrate spectral signatures and activation clustering in the
all-to-all setting at 33 % poison; no figure of theirs is copied here.

**Peer side by side** (``--modes peer``): ART's ``SpectralSignatureDefense`` and ``ActivationDefence``
(adversarial-robustness-toolbox, a benchmark-only peer: ``pip install --no-deps adversarial-robustness-toolbox six``)
and bastion's spectral signatures and activation clustering on the *same* poisoned model and data: all-to-one
BadNets with ``rate_of="target"`` (``--peer-rates``, default 33 % of the target class, the ``percent_poison`` of
ART's notebooks, and 10 %). ART reads the activations of the model's *last* layer (``nb_layers - 1``: the logits
of a PyTorch ``nn.Sequential``; ART has no layer option for these two defences), so ART is run twice: with its own
layer choice, and on a ``PyTorchClassifier`` of the network without its last ``Linear`` (the penultimate features
bastion uses). ART's defaults: spectral ``expected_pp_poison`` = the rate (its default 0.33), ``eps_multiplier`` 1.5;
activation clustering 2-means (``MiniBatchKMeans``) on 10 PCA dimensions (ART's default reduction) and FastICA (the
paper's), ``cluster_analysis="smaller"``. Reported: precision/recall/F1 against the poison indices and wall time.
Two differences in the peer's algorithms show in the numbers: ART's spectral score is the *uncentred* projection
``|v · R_i|`` (it centres only for the SVD), a one-tailed test, where bastion scores the paper's centred squared
projection ``((R_i - mean) · v)²``; and ART's ``"smaller"`` analysis flags the smaller cluster of *every* class,
where bastion's activation clustering flags a class only under the paper's size and silhouette rules.
``python benchmarks/backdoor_defenses_mnist.py --modes peer`` ran in 980 s at load 7-13 on the two shared cores.

``--quick`` (4,000 training images, 3 epochs, shorter Neural Cleanse epochs, no PCA variant) took 23 minutes on two
CPU cores shared with four to six other jobs (load average 6-7; a training pass took 2 s to 100 s depending on the
load), two thirds of it in Neural Cleanse; on idle cores expect a fraction of that. The full run (8,000 images, 4
epochs, longer Neural Cleanse epochs, PCA variant) does about three times the work.

Run from the repository root::

    python benchmarks/backdoor_defenses_mnist.py --quick
    python benchmarks/backdoor_defenses_mnist.py --rates 0.33 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.data import Dataset
from bastion.defenses.training import accuracy, train
from bastion.models import build_model
from bastion.poisoning.base import attack_success_rate
from bastion.poisoning.defenses import (
    activation_clustering,
    fine_prune,
    neural_cleanse,
    sanitize,
    spectral_signatures,
    strip_scan,
    unlearn,
)

TARGET = 0
CNN: dict[str, Any] = {"channels": (16, 32), "hidden": 128}
LR = 3e-3
#: Neural Cleanse: the paper's schedule (init cost 1e-3, patience 5, x1.5, 99 %, Adam 0.1) on epochs of 10 steps of 32
#: (the reference: 31) and an early-stop patience of 15 epochs (the reference: 25), so that a scan of a 28x28 model
#: takes minutes on two CPU cores; --quick shortens them further.
NC_FULL: dict[str, Any] = {"samples_per_epoch": 320, "epochs": 300, "early_stop_patience": 15}
NC_QUICK: dict[str, Any] = {"samples_per_epoch": 128, "epochs": 150, "early_stop_patience": 10}


# ------------------------------------------------------------------------------------------------ the attack
def _own_badnets(
    data: Dataset, rate: float, mode: str, seed: int
) -> tuple[Dataset, Tensor, Callable[[Tensor], Tensor]]:
    """A 3x3 white patch on ``rate`` of the training set, relabelled to 0 (all-to-one) or y + 1 (all-to-all)."""

    def stamp(x: Tensor) -> Tensor:
        out = x.clone()
        out[..., -3:, -3:] = 1.0
        return out

    gen = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(data.y != TARGET).reshape(-1) if mode == "all-to-one" else torch.arange(len(data))
    pick = torch.sort(pool[torch.randperm(pool.numel(), generator=gen)[: round(rate * len(data))]]).values
    x, y = data.x.clone(), data.y.clone()
    x[pick] = stamp(x[pick])
    y[pick] = TARGET if mode == "all-to-one" else (y[pick] + 1) % data.num_classes
    return Dataset(x, y, num_classes=data.num_classes, name=f"{data.name} [badnets {rate:g}]"), pick, stamp


def poison(data: Dataset, rate: float, mode: str, seed: int = 0) -> tuple[Dataset, Tensor, Any, str]:
    """(poisoned data, poison positions, trigger, where the attack came from)."""
    try:
        from bastion.poisoning import BadNets
    except ImportError:
        return (*_own_badnets(data, rate, mode, seed), "own 3x3 white patch")
    pd = BadNets(rate=rate, target=TARGET, mode=mode, seed=seed)(data)
    return pd.data, pd.poison_indices, pd.trigger, "bastion.poisoning.BadNets (3x3 checkerboard)"


def asr(model: nn.Module, test: Dataset, trigger: Any, mode: str) -> float:
    """Attack success: triggered test inputs (of the other classes, all-to-one) classified as the attacker wants."""
    if mode == "all-to-one":
        return attack_success_rate(model, test, trigger, TARGET)
    apply = trigger.apply if hasattr(trigger, "apply") else trigger
    with torch.no_grad():
        pred = common.predict(model, apply(test.x))
    return float((pred == (test.y + 1) % test.num_classes).double().mean())


def fit(data: Dataset, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model("cnn", data.feature_shape, data.num_classes, **CNN)
        train(model, data, epochs=epochs, batch_size=64, lr=LR, seed=seed, progress=False)
    return model.eval(), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ the ART peer
def _art_classifier(model: nn.Module, penultimate: bool, shape: tuple[int, ...]) -> Any:
    from art.estimators.classification import PyTorchClassifier

    net = model
    if penultimate:  # the zoo cnn is an nn.Sequential ending in Linear: drop it, so ART's "last layer" is the features
        if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
            raise SystemExit("the ART penultimate variant needs an nn.Sequential ending in nn.Linear")
        net = nn.Sequential(*list(model.children())[:-1])
    return PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=10,
                             clip_values=(0.0, 1.0))  # fmt: skip


def _pr(suspected: Tensor, poison: Tensor, n: int) -> tuple[float, float, float]:
    from bastion.poisoning.defenses import detection_metrics

    return detection_metrics(suspected, poison, n)


def art_detectors(rate: float) -> list[tuple[str, Callable[[Any, Any, Any], Any]]]:
    """(name, f(classifier, x numpy, y one-hot) -> is_clean list) for ART's two defences."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense

    def ss(clf: Any, x: Any, y: Any) -> Any:
        d = SpectralSignatureDefense(clf, x, y, batch_size=256, eps_multiplier=1.5, expected_pp_poison=rate)
        return d.detect_poison()[1]

    def ac(reduce: str) -> Callable[[Any, Any, Any], Any]:
        def run(clf: Any, x: Any, y: Any) -> Any:
            d = ActivationDefence(clf, x, y)
            return d.detect_poison(nb_clusters=2, nb_dims=10, reduce=reduce, cluster_analysis="smaller")[1]

        return run

    return [("ART spectral", ss), ("ART ac-pca", ac("PCA")), ("ART ac-ica", ac("FastICA"))]


def run_peer(train_set: Dataset, test: Dataset, rate: float, args: argparse.Namespace, log: Any) -> list[dict]:
    """bastion vs ART on one all-to-one BadNets model, ``rate`` of the poisoned target class."""
    import numpy as np

    from bastion.poisoning import BadNets

    pd = BadNets(rate=rate, target=TARGET, rate_of="target", seed=0)(train_set)
    data, pidx = pd.data, pd.poison_indices
    model, t_train = fit(data, args.epochs)
    scen = f"peer all-to-one {rate:.0%} of class {TARGET}"
    asr0, acc0 = asr(model, test, pd.trigger, "all-to-one"), accuracy(model, test)
    log(f"[{scen}] {len(pidx)} poisons ({len(pidx) / len(data):.1%} of the set); trained in {t_train:.0f} s: "
        f"clean {acc0:.4f}, ASR {asr0:.4f}")  # fmt: skip
    base = {"scenario": scen, "attack": "bastion.poisoning.BadNets(rate_of='target')", "asr_before": asr0}
    rows: list[dict] = [{**base, "defence": "none", "clean_after": acc0}]
    ours: list[tuple[str, Callable[[], Any]]] = [
        ("bastion spectral", lambda: spectral_signatures(model, data, poison_fraction=rate, poison_indices=pidx)),
        ("bastion ac-ica", lambda: activation_clustering(model, data, reduce="ica", poison_indices=pidx)),
        ("bastion ac-pca", lambda: activation_clustering(model, data, reduce="pca", poison_indices=pidx)),
    ]
    for name, call in ours:
        t0 = time.perf_counter()
        res = call()
        sec = time.perf_counter() - t0
        rows.append({**base, "defence": name, "precision": res.precision, "recall": res.recall, "f1": res.f1,
                     "flagged": int(res.suspected.numel()), "seconds": sec})  # fmt: skip
        log(f"  {name:<26} P {res.precision:.3f} R {res.recall:.3f} F1 {res.f1:.3f} in {sec:.1f} s")
    x = data.x.cpu().numpy().astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.y.cpu().numpy()]
    for penultimate in (False, True):
        clf = _art_classifier(model, penultimate, data.feature_shape)
        layer = "penultimate" if penultimate else "its default layer: logits"
        for name, detect in art_detectors(rate):
            t0 = time.perf_counter()
            is_clean = np.asarray(detect(clf, x, y))
            sec = time.perf_counter() - t0
            suspected = torch.from_numpy(np.nonzero(is_clean == 0)[0]).long()
            prec, rec, f1 = _pr(suspected, pidx, len(data))
            label = f"{name} ({layer})"
            rows.append({**base, "defence": label, "precision": prec, "recall": rec, "f1": f1,
                         "flagged": int(suspected.numel()), "seconds": sec})  # fmt: skip
            log(f"  {label:<26} P {prec:.3f} R {rec:.3f} F1 {f1:.3f} in {sec:.1f} s")
    return rows


# ---------------------------------------------------------------------------------------------------- the runs
def detectors(quick: bool) -> list[tuple[str, Callable[..., Any]]]:
    out: list[tuple[str, Callable[..., Any]]] = [
        ("spectral", lambda m, d, p, rate: spectral_signatures(m, d, poison_fraction=rate, poison_indices=p)),
        ("ac-ica", lambda m, d, p, rate: activation_clustering(m, d, reduce="ica", poison_indices=p)),
    ]
    if not quick:
        out.append(("ac-pca", lambda m, d, p, rate: activation_clustering(m, d, reduce="pca", poison_indices=p)))
    out.append(("sanitize-feat", lambda m, d, p, rate: sanitize(d, model=m, space="feature", poison_indices=p)))
    return out


def run_all_to_all(train_set: Dataset, test: Dataset, rate: float, args: argparse.Namespace, log: Any) -> list[dict]:
    data, pidx, trigger, source = poison(train_set, rate, "all-to-all")
    model, t_train = fit(data, args.epochs)
    base = {"scenario": f"all-to-all {rate:.0%}", "attack": source}
    asr0, acc0 = asr(model, test, trigger, "all-to-all"), accuracy(model, test)
    log(f"[all-to-all {rate:.0%}] {len(pidx)} poisons; trained in {t_train:.0f} s: clean {acc0:.4f}, ASR {asr0:.4f}")
    rows = [{**base, "defence": "none", "asr_before": asr0, "asr_after": asr0, "clean_after": acc0}]
    for name, detect in detectors(args.quick):
        t0 = time.perf_counter()
        res = detect(model, data, pidx, rate)
        seconds = time.perf_counter() - t0
        retrained, t_re = fit(res.sanitized(data), args.epochs)
        row = {
            **base, "defence": name, "precision": res.precision, "recall": res.recall, "f1": res.f1,
            "flagged": int(res.suspected.numel()), "asr_before": asr0,
            "asr_after": asr(retrained, test, trigger, "all-to-all"), "clean_after": accuracy(retrained, test),
            "seconds": seconds, "retrain_seconds": t_re,
        }  # fmt: skip
        log(f"  {name:<14} P {res.precision:.3f} R {res.recall:.3f} in {seconds:.1f} s -> ASR {row['asr_after']:.4f}")
        rows.append(row)
    return rows


def run_all_to_one(train_set: Dataset, test: Dataset, rate: float, args: argparse.Namespace, log: Any) -> list[dict]:
    data, pidx, trigger, source = poison(train_set, rate, "all-to-one")
    model, t_train = fit(data, args.epochs)
    base = {"scenario": f"all-to-one {rate:.0%}", "attack": source}
    asr0, acc0 = asr(model, test, trigger, "all-to-one"), accuracy(model, test)
    share = float((data.y[pidx] == TARGET).sum()) / float((data.y == TARGET).sum())
    log(
        f"[all-to-one {rate:.0%}] {len(pidx)} poisons ({share:.0%} of class {TARGET}); trained in {t_train:.0f} s: "
        f"clean {acc0:.4f}, ASR {asr0:.4f}"
    )
    rows: list[dict] = [{**base, "defence": "none", "asr_before": asr0, "asr_after": asr0, "clean_after": acc0}]
    # Data-level detectors, detection only: the poison is the majority of the target class here.
    for name, detect in detectors(True):
        t0 = time.perf_counter()
        res = detect(model, data, pidx, share)
        rows.append(
            {**base, "defence": name, "precision": res.precision, "recall": res.recall, "f1": res.f1,
             "flagged": int(res.suspected.numel()), "asr_before": asr0, "seconds": time.perf_counter() - t0}
        )  # fmt: skip
        log(f"  {name:<14} P {res.precision:.3f} R {res.recall:.3f}")
    defender, held = test.split(1000)  # defender's clean data: the first 1,000 test images; measured on the rest
    # Neural Cleanse, then unlearning.
    nc_opts = NC_QUICK if args.quick else NC_FULL
    t0 = time.perf_counter()
    nc = neural_cleanse(model, defender, progress=False, **nc_opts)
    t_nc = time.perf_counter() - t0
    row = {
        **base, "defence": "neural-cleanse", "flagged_classes": nc.flagged,
        "anomaly_index_target": float(nc.anomaly_index[TARGET]), "norm_target": float(nc.norms[TARGET]),
        "median_norm": nc.median, "asr_before": attack_success_rate(model, held, trigger, TARGET), "seconds": t_nc,
    }  # fmt: skip
    if nc.flagged:
        t0 = time.perf_counter()
        repaired = unlearn(model, defender, nc, epochs=args.unlearn_epochs)
        row.update(
            asr_after=attack_success_rate(repaired, held, trigger, TARGET), clean_after=accuracy(repaired, held),
            retrain_seconds=time.perf_counter() - t0,
        )  # fmt: skip
    log(
        f"  neural-cleanse flagged {nc.flagged} (class {TARGET}: L1 {row['norm_target']:.1f}, median "
        f"{nc.median:.1f}, index {row['anomaly_index_target']:.2f}) in {t_nc:.0f} s -> ASR {row.get('asr_after')}"
    )
    rows.append(row)
    # Fine-pruning.
    t0 = time.perf_counter()
    fp = fine_prune(
        model, defender, test=held, trigger=trigger, target=TARGET, fine_tune_epochs=args.finetune_epochs,
        progress=False,
    )  # fmt: skip
    rows.append(
        {**base, "defence": "fine-prune", "pruned": len(fp.pruned), "asr_before": fp.asr_before,
         "asr_pruned": fp.asr_pruned, "asr_after": fp.asr_after, "clean_before": fp.clean_acc_before,
         "clean_after": fp.clean_acc_after, "seconds": time.perf_counter() - t0}
    )  # fmt: skip
    log(f"  fine-prune {len(fp.pruned)}/{fp.n_channels} channels: ASR {fp.asr_before:.4f} -> {fp.asr_after:.4f}")
    # STRIP on the held-out test images: 500 clean + 500 triggered (other classes); the rest is its clean pool.
    pool, screened = held.split(500)
    x = screened.x[screened.y != TARGET][:500]
    apply = trigger.apply if hasattr(trigger, "apply") else trigger
    n = int(x.shape[0])
    inputs = Dataset(torch.cat([x, apply(x)]), torch.cat([screened.y[screened.y != TARGET][:n]] * 2), 10, "strip")
    for mode in ("blend", "add"):
        t0 = time.perf_counter()
        res = strip_scan(model, inputs, pool, mode=mode, poison_indices=torch.arange(n, 2 * n), progress=False)
        flagged = res.flagged
        passed = ~flagged[n:]
        with torch.no_grad():
            hits = common.predict(model, inputs.x[n:]) == TARGET
        rows.append(
            {**base, "defence": f"strip-{mode}", "precision": res.precision, "recall": res.recall, "f1": res.f1,
             "false_rejection": float(flagged[:n].double().mean()), "asr_before": float(hits.double().mean()),
             "asr_after": float((hits & passed).double().mean()), "seconds": time.perf_counter() - t0}
        )  # fmt: skip
        log(f"  strip-{mode}: TPR {res.recall:.3f}, FRR {float(flagged[:n].double().mean()):.3f}")
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = ["scenario", "defence", "precision", "recall", "f1", "asr_before", "asr_after", "clean_after", "seconds"]
    lines = ["| " + " | ".join(cols) + " | notes |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        notes = []
        if "flagged_classes" in r:
            notes.append(f"flagged {r['flagged_classes']}, target index {r['anomaly_index_target']:.2f}")
        if "pruned" in r:
            notes.append(f"{r['pruned']} channels pruned, ASR after pruning only {r['asr_pruned']:.3f}")
        if "false_rejection" in r:
            notes.append(f"clean rejected {r['false_rejection']:.3f}; ASR = triggered inputs passing STRIP")
        if "retrain_seconds" in r:
            notes.append(f"retrain {r['retrain_seconds']:.0f} s")
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " | " + "; ".join(notes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,000 training images, 3 epochs, fast Neural Cleanse")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.10, 0.33])
    parser.add_argument(
        "--modes", nargs="+", default=["all-to-all", "all-to-one"], choices=["all-to-all", "all-to-one", "peer"]
    )
    parser.add_argument("--peer-rates", type=float, nargs="+", default=[0.33, 0.10],
                        help="peer mode: poison rates as fractions of the poisoned target class")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 4; 3 with --quick)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="fine-pruning's fine-tuning epochs")
    parser.add_argument("--unlearn-epochs", type=int, default=2, help="Neural Cleanse unlearning epochs")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared CPUs)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 4
    torch.set_num_threads(args.threads)
    split = common.load_split()
    train_set = split.train.subset(slice(0, 4000)) if args.quick else split.train
    started = time.perf_counter()
    rows: list[dict] = []
    for mode in args.modes:
        if mode == "peer":
            for rate in args.peer_rates:
                rows += run_peer(train_set, split.eval, rate, args, print)
            continue
        for rate in args.rates:
            run = run_all_to_all if mode == "all-to-all" else run_all_to_one
            rows += run(train_set, split.eval, rate, args, print)
    print()
    print(f"# backdoor defences on MNIST ({len(train_set)} training images, {args.epochs} epochs)")
    print(table(rows))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
