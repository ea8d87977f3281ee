from __future__ import annotations

import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from bastion.errors import ModelError
from bastion.models import ZOO, build_model, cnn, load_model, mlp, resnet, save_model
from bastion.models.io import ExportedModule

# Tiny tensors: extra intra-op threads only wait on each other (see tests/conftest.py).

SHAPE = (1, 8, 8)


class NotWeights:
    """An arbitrary object; weights_only loading must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _trained_like(model: nn.Module) -> nn.Module:
    # Random non-default buffers, so that the round trip also covers batch-norm statistics.
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    shape = {"pointnet": (64, 3), "audiocnn": (1, 800)}.get(name, SHAPE)  # a point cloud, a waveform, else images
    model = _trained_like(build_model(name, shape, 10, mean=0.2, std=0.3))
    path = tmp_path / f"{name}.pt"
    save_model(model, path, arch=name, config=model.bastion_spec["config"])  # type: ignore[attr-defined]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "bastion-model" and raw["version"] == 1 and raw["arch"] == name
    assert raw["config"]["input_shape"] == list(shape)
    x = torch.rand(4, *shape)
    expected = model(x)
    for spec in (f"zoo:{name}@{path}", str(path), path):
        loaded = load_model(spec)
        assert not loaded.training
        torch.testing.assert_close(loaded(x), expected)


def test_save_uses_recorded_config_and_per_channel_stats(tmp_path: Path) -> None:
    model = _trained_like(resnet((3, 8, 8), 4, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4], width=4))
    save_model(model, tmp_path / "sub" / "r.pt")
    loaded = load_model(f"zoo:resnet@{tmp_path / 'sub' / 'r.pt'}", input_shape=(3, 8, 8), num_classes=4)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))


def test_save_refuses_a_config_that_does_not_rebuild_the_model(tmp_path: Path) -> None:
    model = cnn(SHAPE, 10)
    with pytest.raises(ModelError, match="do not fit"):
        save_model(model, tmp_path / "m.pt", arch="cnn", config={"input_shape": [1, 8, 8], "num_classes": 3})
    with pytest.raises(ModelError, match="JSON"):
        save_model(
            model,
            tmp_path / "m.pt",
            arch="cnn",
            config={"input_shape": [1, 8, 8], "num_classes": 10, "x": {1}},
        )
    with pytest.raises(ModelError, match="arch="):
        save_model(nn.Linear(3, 2), tmp_path / "m.pt")
    with pytest.raises(ModelError, match=r"\.pt2"):
        save_model(model, tmp_path / "m.pt2")


def test_mismatched_arch_or_shape_args(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_model(mlp(SHAPE, 10, hidden=(16,)), path)
    with pytest.raises(ModelError, match="holds a 'mlp' model"):
        load_model(f"zoo:cnn@{path}")
    with pytest.raises(ModelError, match="input_shape"):
        load_model(str(path), input_shape=(1, 28, 28))
    with pytest.raises(ModelError, match="has 10 outputs"):
        load_model(str(path), num_classes=12)  # the data needs more classes than the model has
    load_model(str(path), num_classes=3)  # data that uses only some of the model's classes is fine


def test_bare_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cnn(SHAPE, 10, mean=0.5, std=0.2).eval()
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelError, match="input_shape and num_classes must be given"):
        load_model(f"zoo:cnn@{path}")
    with pytest.raises(ModelError, match="bare state dict"):
        load_model(str(path))
    loaded = load_model(f"zoo:cnn@{path}", input_shape=SHAPE, num_classes=10)
    x = torch.rand(3, *SHAPE)
    torch.testing.assert_close(loaded(x), model(x))
    # Wrong shape arguments give a readable error, not a torch traceback.
    with pytest.raises(ModelError, match="do not fit") as info:
        load_model(f"zoo:cnn@{path}", input_shape=(1, 28, 28), num_classes=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ModelError, match="do not fit"):
        load_model(f"zoo:mlp@{path}", input_shape=SHAPE, num_classes=10)


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": OrderedDict(), "extra": NotWeights()}, path)
    with pytest.raises(ModelError, match="never unpickles"):
        load_model(f"zoo:cnn@{path}", input_shape=SHAPE, num_classes=10)
    whole = tmp_path / "whole.pt"
    torch.save(cnn(SHAPE, 10), whole)  # a pickled module, not weights
    with pytest.raises(ModelError, match="never unpickles"):
        load_model(str(whole))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("missing.pt", "not found"),
        ("zoo:cnn@missing.pt", "not found"),
        ("zoo:cnn", "zoo:NAME@PATH"),
        ("zoo:vgg@x.pt", "unknown architecture"),
        ("missing.pt2", "not found"),
        ("model.onnx", "not found"),
        ("", "non-empty"),
        ("no_such_module_xyz:build", "not found"),
        ("missing_dir/file.py:build", "not found"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_model(spec)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelError, match="cannot read"):
        load_model(str(junk))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": cnn(SHAPE, 10).state_dict(), "epoch": 3}, ckpt)
    with pytest.raises(ModelError, match="training checkpoint"):
        load_model(f"zoo:cnn@{ckpt}", input_shape=SHAPE, num_classes=10)
    bad_pt2 = tmp_path / "bad.pt2"
    bad_pt2.write_bytes(b"nope")
    with pytest.raises(ModelError, match=r"torch\.export"):
        load_model(str(bad_pt2))


def test_export_round_trip_static_and_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_like(resnet(SHAPE, 10, width=4))
    example = torch.rand(2, *SHAPE)
    x = torch.rand(5, *SHAPE)
    expected = model(x)

    static = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(model, (example,)), static)
    loaded = load_model(str(static), num_classes=10)
    assert isinstance(loaded, ExportedModule)
    assert loaded.batch_size == 2 and loaded.input_shape == SHAPE
    # Batches of other sizes are run in chunks of the exported size.
    torch.testing.assert_close(loaded(x), expected)
    torch.testing.assert_close(loaded(x[:2]), expected[:2])
    assert loaded(x[:0]).shape == (0, 10)
    # eval()/train() must not reach the exported graph, which refuses them.
    loaded.train()
    loaded.eval()

    dynamic = tmp_path / "dynamic.pt2"
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), dynamic)
    loaded = load_model(str(dynamic), input_shape=SHAPE)
    assert isinstance(loaded, ExportedModule) and loaded.batch_size is None
    torch.testing.assert_close(loaded(x), expected)

    with pytest.raises(ModelError, match="returns 10 logits"):
        load_model(str(static), num_classes=11)


def test_export_gradients_flow_through_chunks(tmp_path: Path) -> None:
    model = cnn(SHAPE, 10).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, *SHAPE),)), path)
    loaded = load_model(str(path))
    x = torch.rand(3, *SHAPE, requires_grad=True)
    loaded(x)[:, 0].sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    model(ref)[:, 0].sum().backward()
    assert x.grad is not None and ref.grad is not None
    torch.testing.assert_close(x.grad, ref.grad)


def _write_module(folder: Path, name: str) -> None:
    (folder / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from bastion.models import mlp

            def build():
                torch.manual_seed(0)
                return mlp((4,), 3, hidden=(5,))

            def not_a_model():
                return 42

            def needs_args(width):
                return mlp((4,), 3, hidden=(width,))

            def broken():
                raise RuntimeError("boom")

            def probabilities():
                return torch.nn.Sequential(mlp((4,), 3), torch.nn.Softmax(dim=1))
            """
        )
    )


def test_entry_point_from_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_module(tmp_path, "bastion_test_factory_mod")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("bastion_test_factory_mod:build", input_shape=(4,), num_classes=3)
    assert isinstance(model, nn.Sequential) and not model.training
    torch.manual_seed(0)
    torch.testing.assert_close(model(torch.ones(2, 4)), mlp((4,), 3, hidden=(5,))(torch.ones(2, 4)))
    with pytest.raises(ModelError, match=r"not a torch\.nn\.Module"):
        load_model("bastion_test_factory_mod:not_a_model")
    with pytest.raises(ModelError, match="no arguments"):
        load_model("bastion_test_factory_mod:needs_args")
    with pytest.raises(ModelError, match="boom"):
        load_model("bastion_test_factory_mod:broken")
    with pytest.raises(ModelError, match="no attribute"):
        load_model("bastion_test_factory_mod:nothing")
    with pytest.raises(ModelError, match="returns 3 logits"):
        load_model("bastion_test_factory_mod:build", input_shape=(4,), num_classes=10)
    with pytest.raises(ModelError, match="fails on a batch"):
        load_model("bastion_test_factory_mod:build", input_shape=(7,))


def test_entry_point_from_file_path(tmp_path: Path) -> None:
    _write_module(tmp_path, "factory_file")
    model = load_model(f"{tmp_path / 'factory_file.py'}:build")
    assert model(torch.rand(2, 4)).shape == (2, 3)
    with pytest.warns(UserWarning, match="probabilities"):
        load_model(f"{tmp_path / 'factory_file.py'}:probabilities", input_shape=(4,))
    (tmp_path / "syntax_error.py").write_text("def build(:\n")
    with pytest.raises(ModelError, match="importing"):
        load_model(f"{tmp_path / 'syntax_error.py'}:build")
