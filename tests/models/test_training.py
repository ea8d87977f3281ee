"""End-to-end check that the zoo cnn learns the bundled 8x8 digits quickly."""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from bastion.models import cnn, eval_mode


# Intra-op threads do not pay off on 8x8 images, and on a busy machine they make training ten times slower
# (spin-waiting OpenMP workers), so the test runs single-threaded.
def test_cnn_learns_digits() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)

    accuracy, wall, cpu = _train_and_test(xt, yt, torch.from_numpy(x_te), y_te)
    print(f"cnn on digits: test accuracy {accuracy:.4f} after {wall:.2f} s of training ({cpu:.2f} s CPU)")
    assert len(x_tr) == 1437
    assert accuracy >= 0.95
    # CPU time rather than wall time, so that a busy machine does not fail the test.
    assert cpu < 20


def _train_and_test(
    xt: torch.Tensor, yt: torch.Tensor, x_te: torch.Tensor, y_te: np.ndarray
) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(12):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    with eval_mode(model), torch.no_grad():
        pred = model(x_te).argmax(dim=1).numpy()
    return float((pred == y_te).mean()), wall, cpu
