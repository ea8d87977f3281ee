"""The reliability assessment model on MNIST, with the operational profile in a VAE's latent space.

Zhao, Huang, Banks, Cox, Flynn, Schewe & Huang, "Assessing the Reliability of Deep Learning Classifiers Through
Robustness Evaluation and Operational Profiles", AISafety workshop at IJCAI 2021, Section 5 (reference: ReAsDL
``main.py`` / ``mnist.py``), which reports 0.43 s per cell on MNIST (0.04 s on its 2-D data).

The setting:

* data: the MNIST *test* set in ``shared/data/mnist`` (the only MNIST file here, see ``common.py``): its first 8,000
  images train the classifier and the VAE, its last 2,000 are the operational (evaluation) data, whose labels are
  the cells' labels;
* classifier: the reference's ``mnist_SimpleMlp`` shape, 784-256-10 with ReLU, behind the reference's
  normalisation (mean 0.1307, std 0.3081): the zoo ``mlp`` with ``hidden=(256,)``, trained with bastion's trainer
  (Adam 1e-3, 10 epochs, batch 64, seed 0) and cached in ``benchmarks/.cache``;
* profile: :class:`bastion.reliability.vae.VAE` (fully connected, 784-400-8, Kingma & Welling) trained on the 8,000
  training images (30 epochs, cached), its posterior mean as the encoder; a Gaussian KDE of the 2,000 operational
  codes, bandwidth by 5-fold cross-validation (fitted once, then passed to every run), 100 half-size bootstrap
  refits for the masses' variance. The reference code uses a convolutional VAE at 32x32 with the same latent
  dimension 8 (``z_size = 8``), and a grid in the latent space decoded to images; here the cells live in the input
  space (see below) and the latent space only weighs them;
* cells: l∞ balls of radius eps around the 2,000 operational points (:class:`bastion.reliability.BallCells`),
  the K heaviest under the profile (``top:K``; the mass of a ball is the KDE density at its centre's code, so the
  ranking does not depend on eps). eps = r/2 for the exact l∞ r-separation r of the 2,000 points
  (:func:`bastion.reliability.r_separation`), and the smaller radii given by ``--eps``;
* per cell (:func:`bastion.reliability.assess_reliability`): the prediction at the centre, CROWN certification,
  PGD (40 steps, random start), then 10,000 uniform samples (the paper's count) in every cell not certified.

For every (eps, K) the table gives the pfd (probability mode: λ = the sampled failure rate), its variance, the
upper bound at 97.5 %, the ACU, how many cells each method decided, the work seconds per cell (what the assessment
spends inside the cells) and the wall time of the whole call (profile, bootstrap, cells). The "pfd worst-case"
column re-reads the same records with λ = 1 for every falsified cell (a failure is known to exist in it).

What to expect. The l∞ r-separation of the 2,000 operational images is 0.988 (Yang et al. report about 0.7 on the
full MNIST), so r/2 = 0.494: such a ball around a digit reaches a flat grey image, PGD falsifies every cell and
uniform samples are mostly misclassified noise (pfd about 0.5). Hence the smaller radii 0.1 and 0.03, at which
CROWN certifies most cells at 0.03 and PGD falsifies most at 0.1. Uniform sampling almost never hits the failures
PGD finds, so in probability mode the pfd there is about the profile mass of the misclassified centres (λ near 1
in those cells, 0 elsewhere); the worst-case column counts every falsified cell instead. Splitting
(``--splitting``) is the paper's tool for those rare failures, but it costs tens of seconds per cell on 2 CPU
cores, and here it still found no failure in the cells it tried.

Run from the repository root::

    python benchmarks/reliability_mnist.py                           # eps = r/2, 0.1, 0.03; K = 100, 1000
    python benchmarks/reliability_mnist.py --eps 0.03 --cells 1000 --figure rel_mnist.png
    python benchmarks/reliability_mnist.py --quick                   # under a minute: small models, few cells
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.defenses.training import train
from bastion.models import build_model, load_model, save_model
from bastion.reliability import OperationalProfile, RAMResult, assess_reliability, plot_profile, r_separation
from bastion.reliability.vae import VAE, train_vae

#: MNIST's per-pixel mean and standard deviation, as the reference's ``data_normalization``.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _digest(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def get_classifier(split: common.Split, *, hidden: int, epochs: int, log=print) -> nn.Module:
    """The 784-hidden-10 MLP, loaded from the cache or trained on the 8,000 training images and cached."""
    recipe = {"arch": "mlp", "hidden": hidden, "epochs": epochs, "lr": 1e-3, "batch_size": 64, "seed": 0,
              "mean": MNIST_MEAN, "std": MNIST_STD, "n_train": common.N_TRAIN}  # fmt: skip
    path = common.CACHE_DIR / f"reliability_mnist_mlp{hidden}_{_digest(recipe)}.pt"
    if path.exists():
        model = load_model(path).eval()
        log(f"classifier: loaded {path.name}")
    else:
        torch.manual_seed(recipe["seed"])
        model = build_model("mlp", common.INPUT_SHAPE, common.NUM_CLASSES, mean=MNIST_MEAN, std=MNIST_STD,
                            hidden=(hidden,))  # fmt: skip
        t0 = time.perf_counter()
        train(model, split.train, epochs=epochs, batch_size=64, lr=1e-3, seed=0, progress=False)
        log(f"classifier: trained {recipe} in {time.perf_counter() - t0:.1f} s")
        common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
        save_model(model, path)
        model.eval()
    acc = common.accuracy(model, split.x_eval, split.y_eval)
    log(f"classifier: 784-{hidden}-10 MLP, accuracy {acc:.4f} on the {common.N_EVAL} operational images")
    return model


def get_vae(split: common.Split, *, latent_dim: int, hidden: int, epochs: int, log=print) -> VAE:
    """The VAE of the profile, loaded from the cache or trained on the 8,000 training images and cached."""
    recipe = {"latent_dim": latent_dim, "hidden": hidden, "epochs": epochs, "batch_size": 128, "lr": 1e-3,
              "seed": 0, "n_train": common.N_TRAIN}  # fmt: skip
    path = common.CACHE_DIR / f"reliability_mnist_vae{latent_dim}_{_digest(recipe)}.pt"
    if path.exists():
        vae = VAE.load(path)
        log(f"VAE: loaded {path.name}")
    else:
        t0 = time.perf_counter()
        vae = train_vae(split.train.x, latent_dim=latent_dim, hidden=(hidden,), epochs=epochs, seed=0, progress=False)
        log(f"VAE: trained {recipe} in {time.perf_counter() - t0:.1f} s")
        common.CACHE_DIR.mkdir(parents=True, exist_ok=True)
        vae.save(path)
    log(f"VAE: 784-{hidden}-{latent_dim}, final negative ELBO {vae.history[-1]:.2f} nats per training image")
    return vae.eval()


def worst_case_pfd(result: RAMResult) -> float:
    """The pfd with λ = 1 for each falsified cell, 0 for a certified one, the sampled rate otherwise."""
    lam = np.array([1.0 if r.extra["falsified"] else float(r.extra["rate"]) for r in result.records])
    return float(np.sum(result.masses() * lam))


def _figure_path(base: str, eps_label: str, several: bool) -> Path:
    path = Path(base)
    return path.with_name(f"{path.stem}-eps{eps_label}{path.suffix}") if several else path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", default="r/2,0.1,0.03", help="cell radii, comma-separated; 'r/2' for half the l∞ "
                    "r-separation of the operational data (default r/2,0.1,0.03)")  # fmt: skip
    ap.add_argument("--cells", default="100,1000", help="K of the top-K cells, comma-separated (default 100,1000)")
    ap.add_argument("--samples", type=int, default=10_000, help="uniform samples per cell (default 10,000)")
    ap.add_argument("--n-boot", type=int, default=100, help="bootstrap refits of the profile (default 100)")
    ap.add_argument("--bandwidth", type=float, default=None, help="KDE bandwidth (default: 5-fold cross-validation)")
    ap.add_argument("--latent-dim", type=int, default=8, help="VAE latent dimension (default 8, the reference's)")
    ap.add_argument("--vae-hidden", type=int, default=400, help="VAE hidden width (default 400)")
    ap.add_argument("--vae-epochs", type=int, default=30, help="VAE training epochs (default 30)")
    ap.add_argument("--hidden", type=int, default=256, help="classifier hidden width (default 256, the reference's)")
    ap.add_argument("--epochs", type=int, default=10, help="classifier training epochs (default 10)")
    ap.add_argument("--mode", default="probability", choices=["probability", "worst-case"])
    ap.add_argument("--no-certify", action="store_true", help="skip CROWN")
    ap.add_argument("--no-attack", action="store_true", help="skip PGD")
    ap.add_argument("--splitting", default=None, metavar="PARTICLES,STEPS", help="also run multilevel splitting "
                    "(Webb et al.) with this many particles and MH steps per level in cells whose samples saw no "
                    "failure, as the paper does (slow on a CPU: tens of seconds per cell)")  # fmt: skip
    ap.add_argument("--store", default=None, help="result store (SQLite; resumes an interrupted run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--device", default=None, help="run the assessment on this device (default: CPU)")
    ap.add_argument("--figure", default=None, help="write the profile figure (mass against λ) of the largest K here; "
                    "with several eps, one file per eps with '-eps<value>' added to the name")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the summaries here")
    ap.add_argument("--quick", action="store_true", help="a run of under a minute: small models (trained for "
                    "one epoch each), eps 0.03 and 0.1, K = 20, 1,000 samples, 10 bootstrap refits")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.eps, args.cells, args.samples, args.n_boot = "0.1,0.03", "20", 1_000, 10
        args.epochs, args.vae_epochs = 1, 1
    eps_specs = [e.strip() for e in args.eps.split(",") if e.strip()]
    try:
        fixed = [float(e) for e in eps_specs if e != "r/2"]
        ks = [int(k) for k in args.cells.split(",")]
        split_opts = [int(v) for v in args.splitting.split(",")] if args.splitting else []
    except ValueError as exc:
        ap.error(f"--eps takes numbers or 'r/2', --cells and --splitting integers, all comma-separated ({exc})")
    if not eps_specs or any(e <= 0 for e in fixed) or not ks or min(ks) < 1 or len(split_opts) not in (0, 2):
        ap.error("give --eps > 0 (or r/2), --cells K >= 1, and --splitting as PARTICLES,STEPS")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(common.machine_summary() + "; " + common.load_average())
    split = common.load_split()
    log(f"data: MNIST test set, first {common.N_TRAIN} images = training (classifier, VAE), last {common.N_EVAL} = "
        "operational data (cells, profile, labels)")  # fmt: skip
    model = get_classifier(split, hidden=args.hidden, epochs=args.epochs, log=log)
    vae = get_vae(split, latent_dim=args.latent_dim, hidden=args.vae_hidden, epochs=args.vae_epochs, log=log)
    device = torch.device(args.device) if args.device else torch.device("cpu")
    # the operational data stay on the CPU (cells and masses are built there); the models may be elsewhere
    model, vae = model.to(device), vae.to(device)
    op = split.eval

    r_sep = None
    if any(e == "r/2" for e in eps_specs):
        t0 = time.perf_counter()
        r_sep = r_separation(split.x_eval, split.y_eval, "linf")
        log(f"r-separation (l∞, exact, {common.N_EVAL} operational points): r = {r_sep:.4f}, r/2 = {r_sep / 2:.4f} "
            f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    radii = [(e, r_sep / 2 if e == "r/2" else float(e)) for e in eps_specs]  # type: ignore[operator]
    splitting: dict[str, int] | bool = False
    if split_opts:
        splitting = {"n_particles": split_opts[0], "mh_steps": split_opts[1]}

    bandwidth = args.bandwidth
    if bandwidth is None:
        t0 = time.perf_counter()
        prof = OperationalProfile.fit(split.x_eval, encoder=vae, seed=args.seed)
        bandwidth = prof.bandwidth
        log(
            f"profile: KDE on the {common.N_EVAL} latent codes, cross-validated bandwidth {bandwidth:.4g} "
            f"(grid {prof.cv_bandwidths[0]:.3g}..{prof.cv_bandwidths[-1]:.3g}; {time.perf_counter() - t0:.1f} s)"
        )
    else:
        log(f"profile: KDE on the {common.N_EVAL} latent codes, bandwidth {bandwidth:.4g} (given)")

    rows: list[list[str]] = []
    summaries = []
    for label, eps in radii:
        last: RAMResult | None = None
        for k in ks:
            t0 = time.perf_counter()
            result = assess_reliability(
                model, op, cells=f"top:{k}", eps=eps, encoder=vae, bandwidth=bandwidth, n_boot=args.n_boot,
                samples_per_cell=args.samples, mode=args.mode, certify=None if args.no_certify else "crown",
                attack=None if args.no_attack else "pgd", splitting=splitting, store=args.store, progress=True,
                seed=args.seed,
                config={"benchmark": "reliability_mnist"},
            )  # fmt: skip
            wall = time.perf_counter() - t0
            last = result
            dec = result.decided
            pgd = dec.get("pgd", 0)
            decided = f"{dec.get('crown', 0)} / {dec.get('centre', 0)} / {pgd} / {dec.get('sampling', 0)}"
            if splitting:
                decided += f" / {dec.get('splitting', 0)}"
            rows.append([
                f"{eps:.4g}" + (" (r/2)" if label == "r/2" else ""), str(result.n_cells), f"{result.pfd:.4g}",
                f"{result.variance:.3g}", f"{result.upper:.4g}", f"{result.acu:.4g}", f"{worst_case_pfd(result):.4g}",
                f"{result.n_certified} / {result.n_falsified} / {result.n_unknown}", decided,
                f"{result.mass_covered:.3f}", f"{result.seconds_per_cell:.4f}", f"{wall:.1f}",
            ])  # fmt: skip
            summaries.append({"eps": eps, "eps_spec": label, "K": k, "wall_s": wall,
                              "pfd_worst_case": worst_case_pfd(result), **result.to_dict()})  # fmt: skip
            log("| " + " | ".join(rows[-1]) + " |")
            if result.n_cells and result.n_falsified == result.n_cells:
                log(
                    f"  note: every cell of radius {eps:.4g} is falsified (an l∞ ball this large around an MNIST "
                    "digit holds inputs the model misclassifies, found at the centre, by PGD or by sampling)"
                )
        if args.figure and last is not None:
            path = _figure_path(args.figure, f"{eps:.4g}", len(radii) > 1)
            log(f"figure: {plot_profile(last, path)}")

    print(
        f"\nMNIST, 784-{args.hidden}-10 MLP, VAE latent dim {args.latent_dim}, KDE bandwidth {bandwidth:.4g}, "
        f"{args.samples} samples per cell, {args.n_boot} bootstrap refits, mode {args.mode}"
        + (f", l∞ r-separation r = {r_sep:.4f}" if r_sep is not None else "")
        + "\n"
    )
    header = [
        "eps", "K", "pfd", "variance", "upper (97.5 %)", "ACU", "pfd worst-case", "certified / falsified / unknown",
        "crown / centre / pgd / sampling" + (" / splitting" if splitting else ""), "mass covered", "s per cell",
        "wall s",
    ]  # fmt: skip
    print(common.markdown_table(header, rows))
    print(f"\ntotal wall time {time.perf_counter() - t_all:.1f} s; {common.load_average()}")
    if args.json:
        clean = [{k: v for k, v in s.items() if not (isinstance(v, float) and math.isnan(v))} for s in summaries]
        Path(args.json).write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
