"""Small models shared by the testing tests: a hand-set two-layer ReLU network, trained digits CNNs, a query counter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bastion.data import Dataset, load_digits
from bastion.defenses.training import train
from bastion.models import build_model


class Counting(nn.Module):
    """An independent count of every input the wrapped model sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        self.count += int(x.shape[0])
        return self.model(x)


def tiny() -> nn.Sequential:
    """Layer "1" = relu(x); layer "3" = relu([h0 + h1, h0 - h1]), h the output of "1"; then the logits."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    weights = ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]], [[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        for lin, w in zip((net[0], net[2], net[4]), weights):
            lin.weight.copy_(torch.tensor(w))
            lin.bias.zero_()
    return net.eval()


def digits_cnns(seeds: tuple[int, ...] = (0,), n_seeds: int = 40) -> tuple[list[nn.Module], Dataset]:
    """Zoo CNNs trained 2 epochs on the 80 % digits split (one per seed), and the first held-out images as seeds.

    Module fixtures run before the autouse one-thread fixture, so training sets one thread itself; the global RNG is
    left as it was.
    """
    train_set, test_set = load_digits().train_test_split(0.2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = []
    try:
        with torch.random.fork_rng():
            for s in seeds:
                torch.manual_seed(s)
                model = build_model("cnn", (1, 8, 8), 10)
                train(model, train_set, epochs=2, progress=False, seed=s)
                models.append(model)
    finally:
        torch.set_num_threads(threads)
    return models, test_set.subset(range(n_seeds))
