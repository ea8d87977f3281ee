"""Speed-up of ``bastion.scale.ray_evaluate`` on local Ray workers over ``bastion.evaluate`` in one process.

The job: PGD (bastion's defaults: 40 steps, random start) at l∞ eps 0.1, 0.2 and 0.3 on the benchmark MNIST ``cnn``
of ``common.py`` (cached), on the first ``--n`` images of the 2,000-image evaluation split, batch size 100. The single
process runs with one torch thread; each Ray worker too (one CPU per task), so the figure is the gain of running
batches side by side, not of more threads per batch. Three times are reported for the Ray run:

* ``ray.init``: starting a local Ray instance (once per session; a cluster started with ``ray start`` has paid it);
* cold: the first sharded run, which starts the worker processes (each imports torch and bastion) and ships the
  model (a spec string: each worker loads the file once);
* warm: the same job again in the same session (worker processes kept by Ray, model reloaded once per worker).

"workers busy" is the time the workers spent inside ``evaluate`` on their shards, summed (the run's ``seconds`` in
the store); busy / wall is the parallelism Ray kept up, which does not depend on how fast each batch runs: up to the
number of workers, less by the overheads (worker start, model loading, shipping shards, the driver's store writes).
On a machine loaded by other processes the speed-up falls short of it, since the workers then share the cores with
those processes.

Records are checked equal to the single-process run's, sample by sample. Other processes on the machine slow both
sides down (the load average is printed with the figures).

Run from the repository root::

    python benchmarks/ray_scaling.py                  # --n 1000 --workers 2
    python benchmarks/ray_scaling.py --n 2000 --workers 2 --shards 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bastion.attacks import PGD
from bastion.evaluate import evaluate
from bastion.store import Store
from bastion.threat import LpBall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="evaluation images (the first n of the 2,000)")
    ap.add_argument("--workers", type=int, default=2, help="local Ray workers (CPUs of the Ray instance)")
    ap.add_argument("--shards", type=int, default=None, help="shards (default: one batch each)")
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args(argv)
    try:
        import ray
    except ImportError:
        raise SystemExit("Ray is not installed: pip install 'bastion[ray]'") from None
    from bastion.scale import ray_evaluate

    torch.set_num_threads(1)  # other helpers share the CPU; one thread per process on both sides
    print(f"# Ray scaling\n\n{common.machine_summary()}\n{common.load_average()} (before)")
    split = common.load_split()
    model = common.get_model(split)
    spec = str(common._cache_path())  # the cached model file: what each worker loads
    data = split.eval.subset(slice(0, args.n))
    threats = [LpBall("linf", e) for e in (0.1, 0.2, 0.3)]

    def job() -> list[PGD]:
        return [PGD()]

    t0 = time.perf_counter()
    single = evaluate(model, data, threats, job(), batch_size=args.batch_size, progress=False, checks=False)
    t_single = time.perf_counter() - t0
    print(f"single process: {t_single:.1f} s   {common.load_average()}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    t_init = time.perf_counter() - t0
    times, busy, results = [], [], []
    for k in range(2):
        db = tmp / f"run{k}.db"  # a fresh store each time: the second run must not resume the first
        t0 = time.perf_counter()
        results.append(
            ray_evaluate(spec, data, threats, job(), batch_size=args.batch_size, shards=args.shards, progress=False,
                         checks=False, store=db)
        )  # fmt: skip
        times.append(time.perf_counter() - t0)
        with Store(db) as store:
            busy.append(store.run(results[-1].run_id).seconds)  # the workers' time inside evaluate, summed
        print(f"ray run: {times[-1]:.1f} s, workers busy {busy[-1]:.1f} s   {common.load_average()}", flush=True)
    ray.shutdown()

    def key(res: object) -> list[tuple[object, ...]]:
        return sorted((r.threat, r.index, r.status, r.adv_distance, r.attack) for r in res.records)  # type: ignore[attr-defined]

    same = all(key(r) == key(single) for r in results)
    print()
    print(
        common.markdown_table(
            ["run", "seconds", "speed-up", "workers busy (s)", "busy / wall"],
            [
                ["single process (1 thread)", f"{t_single:.1f}", "1.00", f"{t_single:.1f}", "1.00"],
                [f"ray.init ({args.workers} CPUs)", f"{t_init:.1f}", "-", "-", "-"],
                *[
                    [
                        f"ray, {args.workers} workers, {name}",
                        f"{t:.1f}",
                        f"{t_single / t:.2f}",
                        f"{b:.1f}",
                        f"{b / t:.2f}",
                    ]
                    for name, t, b in zip(("cold", "warm"), times, busy)
                ],
            ],
        )
    )
    print(f"\nrecords equal to the single-process run: {same}; robust accuracy {results[1].worst_case}")
    print(f"n = {args.n}, batch size {args.batch_size}, {common.load_average()} (after)")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
