"""The zoo's recurrent classifier (``lstm``: LSTM or GRU over image rows or sequences) and the sequence digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.data import load_data, load_digits, load_digits_sequences
from bastion.errors import DataError, ModelError
from bastion.models import Normalize, build_model, load_model, save_model
from bastion.models.zoo import LastStep, Rows


def test_lstm_reads_image_rows_and_sequences() -> None:
    torch.manual_seed(0)
    model = build_model("lstm", (1, 8, 8), 10).eval()
    assert [type(m) for m in model] == [Normalize, Rows, nn.LSTM, LastStep, nn.Linear]
    lstm = model[2]
    assert (lstm.input_size, lstm.hidden_size, lstm.batch_first) == (8, 64, True)
    x = torch.rand(5, 1, 8, 8)
    out = model(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(model(x[:, 0]), out)  # (N, 8, 8) = (N, T, F) too
    seq = build_model("lstm", (8, 8), 10).eval()
    seq.load_state_dict(model.state_dict())
    torch.testing.assert_close(seq(x[:, 0]), out)
    # several channels: a step is the row of every channel, one after the other
    rows = Rows(4, 15, 3)
    img = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(rows(img)[:, 1], torch.cat([img[:, 0, 1], img[:, 1, 1], img[:, 2, 1]], dim=1))
    gru = build_model("lstm", (3, 32, 32), 4, hidden=6, num_layers=2, cell="gru", mean=[0.1, 0.2, 0.3], std=0.5)
    assert isinstance(gru[2], nn.GRU) and gru[2].num_layers == 2 and gru(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_lstm_save_load_and_fx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lstm", (8, 8), 10, hidden=16, cell="gru", mean=0.3, std=0.4).eval()
    path = tmp_path / "gru.pt"
    save_model(model, path)
    x = torch.rand(3, 8, 8)
    for spec in (f"zoo:lstm@{path}", str(path)):
        torch.testing.assert_close(load_model(spec)(x), model(x))
    graph = torch.fx.symbolic_trace(build_model("lstm", (3, 8, 8), 4, mean=[0.1, 0.2, 0.3], std=0.5).eval())
    assert graph(torch.rand(2, 3, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("shape", "kwargs", "needle"),
    [
        ((64,), {}, r"\(T, F\) for sequences or \(C, H, W\)"),
        ((8, 8), {"cell": "rnn"}, "cell must be one of lstm, gru"),
        ((8, 8), {"hidden": 0}, "hidden must be a positive int"),
        ((8, 8), {"num_layers": 0}, "num_layers"),
        ((8, 8), {"mean": [0.1] * 8}, "one normalisation mean and std"),
        ((1, 8, 8), {"mean": [0.1, 0.2]}, "channels"),
    ],
)
def test_lstm_bad_arguments(shape: tuple[int, ...], kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ModelError, match=needle):
        build_model("lstm", shape, 10, **kwargs)  # type: ignore[arg-type]


def test_sequence_digits() -> None:
    seq, images = load_data(" digits-seq "), load_digits()
    assert seq.name == "digits-seq" and seq.feature_shape == (8, 8) and len(seq) == 1797
    assert torch.equal(seq.x, images.x[:, 0]) and torch.equal(seq.y, images.y)
    assert torch.equal(load_digits_sequences().x[3, 2], images.x[3, 0, 2])  # step 2 of sample 3 = its row 2
    with pytest.raises(DataError, match="'digits-seq'"):
        load_data("digits-sequence")
