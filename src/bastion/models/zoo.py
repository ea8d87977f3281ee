"""Small reference architectures.

Every factory has the signature ``f(input_shape, num_classes, *, mean=0.0, std=1.0, **arch_kwargs)`` and
returns an ``nn.Sequential`` whose first layer is :class:`~bastion.models.normalize.Normalize`, so that inputs
stay in ``[0, 1]``. The feed-forward architectures use only operators that the verifiers support: Linear, Conv2d,
ReLU, Flatten, BatchNorm2d, MaxPool2d, AdaptiveAvgPool2d and the residual addition of :class:`BasicBlock`. The
recurrent :func:`lstm` (an ``nn.LSTM`` or ``nn.GRU`` over the rows of an image, or over a sequence) is there for
coverage-guided testing of recurrent networks (:mod:`bastion.testing.coverage.rnn`), not for the verifiers.

Each model built here remembers how it was built in the attribute ``bastion_spec`` (``{"arch": ..., "config":
...}``), which :func:`bastion.models.io.save_model` uses when no explicit ``arch``/``config`` is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from bastion.errors import ModelError
from bastion.models.normalize import Normalize

__all__ = [
    "ZOO", "BasicBlock", "LastStep", "Rows", "audiocnn", "build_model", "cnn", "lstm", "mlp", "pointnet", "resnet",
]  # fmt: skip

MeanStd = float | Sequence[float]


def _check_input_shape(input_shape: Any, arch: str, *, image: bool) -> tuple[int, ...]:
    what = "(C, H, W), e.g. (1, 28, 28)" if image else "(D,) or (C, H, W)"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise ModelError(f"{arch}: input_shape must be a tuple {what} without the batch dimension, got {input_shape!r}")
    dims = tuple(input_shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ModelError(
            f"{arch}: input_shape must be a tuple of positive ints {what} without the batch dimension, "
            f"got {input_shape!r}"
        )
    if image and len(dims) != 3:
        raise ModelError(
            f"{arch}: input_shape must be an image shape {what} without the batch dimension, got {dims}; "
            "use 'mlp' for flat inputs"
        )
    return dims


def _check_num_classes(num_classes: Any, arch: str) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"{arch}: num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def _normalize_layer(mean: MeanStd, std: MeanStd, channels: int, arch: str) -> Normalize:
    layer = Normalize(mean, std)
    if layer.channels not in (1, channels):
        raise ModelError(
            f"{arch}: mean/std have {layer.channels} values but the input has {channels} channels "
            "(dimension 1 of the batch); give one value, or one per channel"
        )
    return layer


def _jsonable(value: MeanStd) -> float | list[float]:
    if isinstance(value, Tensor):
        flat = [float(v) for v in value.reshape(-1).tolist()]
        return flat[0] if len(flat) == 1 else flat
    if isinstance(value, (int, float)):
        return float(value)
    return [float(v) for v in value]


def _positive_ints(value: Any, name: str, arch: str, *, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ModelError(f"{arch}: {name} must be a sequence of positive ints, got {value!r}")
    out = tuple(value)
    if (not out and not allow_empty) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ModelError(f"{arch}: {name} must be a sequence of positive ints, got {value!r}")
    return out


def _positive_int(value: Any, name: str, arch: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{arch}: {name} must be a positive int, got {value!r}")
    return value


def _remember(model: nn.Module, arch: str, config: dict[str, Any]) -> nn.Module:
    # A plain attribute: not part of the state dict, survives deepcopy, ignored by torch.export.
    model.bastion_spec = {"arch": arch, "config": config}  # type: ignore[assignment]
    return model


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    hidden: Sequence[int] | int = (256, 256),
) -> nn.Sequential:
    """Fully connected ReLU network.

    Args:
        input_shape: shape of one input without the batch dimension, ``(D,)`` or ``(C, H, W)``.
        num_classes: number of output logits.
        mean: normalisation mean (one value, or one per channel / feature).
        std: normalisation standard deviation (one value, or one per channel / feature).
        hidden: widths of the hidden layers; ``()`` gives a linear classifier.

    Returns:
        ``Sequential(Normalize, Flatten, [Linear, ReLU]*, Linear)``.
    """
    dims = _check_input_shape(input_shape, "mlp", image=False)
    k = _check_num_classes(num_classes, "mlp")
    widths = _positive_ints(hidden, "hidden", "mlp", allow_empty=True)
    layers: list[nn.Module] = [_normalize_layer(mean, std, dims[0], "mlp"), nn.Flatten()]
    fan_in = 1
    for d in dims:
        fan_in *= d
    for w in widths:
        layers += [nn.Linear(fan_in, w), nn.ReLU()]
        fan_in = w
    layers.append(nn.Linear(fan_in, k))
    model = nn.Sequential(*layers)
    config = {
        "input_shape": list(dims),
        "num_classes": k,
        "mean": _jsonable(mean),
        "std": _jsonable(std),
        "hidden": list(widths),
    }
    _remember(model, "mlp", config)
    return model


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    kernel_size: int = 3,
) -> nn.Sequential:
    """LeNet-style convolutional network.

    Two blocks of ``Conv2d (same padding) -> ReLU -> MaxPool2d(2)``, then ``Linear -> ReLU -> Linear``. The
    same padding keeps 8x8 inputs usable: 8 -> 4 -> 2 pixels after the two pools.

    Args:
        input_shape: ``(C, H, W)`` with ``H, W >= 4``.
        num_classes: number of output logits.
        mean: normalisation mean (one value, or one per channel).
        std: normalisation standard deviation (one value, or one per channel).
        channels: output channels of the two convolutions.
        hidden: width of the hidden linear layer.
        kernel_size: odd convolution kernel size (3 or 5 are typical).

    Returns:
        The network as an ``nn.Sequential``.
    """
    dims = _check_input_shape(input_shape, "cnn", image=True)
    k = _check_num_classes(num_classes, "cnn")
    c1, c2 = _conv_channels(channels)
    width = _positive_int(hidden, "hidden", "cnn")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ModelError(f"cnn: kernel_size must be a positive odd int, got {kernel_size!r}")
    c, h, w = dims
    if h < 4 or w < 4:
        raise ModelError(f"cnn: input height and width must be >= 4 (two 2x2 poolings), got input_shape {dims}")
    pad = kernel_size // 2
    flat = c2 * (h // 2 // 2) * (w // 2 // 2)
    model = nn.Sequential(
        _normalize_layer(mean, std, c, "cnn"),
        nn.Conv2d(c, c1, kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, kernel_size, padding=pad),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, width),
        nn.ReLU(),
        nn.Linear(width, k),
    )
    config = {
        "input_shape": list(dims),
        "num_classes": k,
        "mean": _jsonable(mean),
        "std": _jsonable(std),
        "channels": [c1, c2],
        "hidden": width,
        "kernel_size": kernel_size,
    }
    _remember(model, "cnn", config)
    return model


def _conv_channels(channels: Any) -> tuple[int, int]:
    values = _positive_ints(channels, "channels", "cnn")
    if len(values) != 2:
        raise ModelError(f"cnn: channels must give the widths of the two convolutions, got {channels!r}")
    return values[0], values[1]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm, and a residual addition.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the shortcut is the identity, or a
    strided 1x1 convolution with batch norm when the shape changes (He et al., "Deep Residual Learning for
    Image Recognition", CVPR 2016).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the first convolution (2 halves the resolution).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: a batch ``(N, in_channels, H, W)``.

        Returns:
            A batch ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
        """
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    width: int = 16,
    blocks: Sequence[int] = (1, 1, 1),
) -> nn.Sequential:
    """Small ResNet for low-resolution images (ResNet-8 with the defaults).

    A 3x3 stem convolution, three stages of :class:`BasicBlock` with ``width``, ``2 * width`` and ``4 *
    width`` channels (the last two stages halve the resolution), global average pooling and a linear
    classifier.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of output logits.
        mean: normalisation mean (one value, or one per channel).
        std: normalisation standard deviation (one value, or one per channel).
        width: channels of the stem and of the first stage.
        blocks: number of basic blocks in each of the three stages; ``(2, 2, 2)`` gives a ResNet-14.

    Returns:
        The network as an ``nn.Sequential``.
    """
    dims = _check_input_shape(input_shape, "resnet", image=True)
    k = _check_num_classes(num_classes, "resnet")
    w = _positive_int(width, "width", "resnet")
    per_stage = _positive_ints(blocks, "blocks", "resnet")
    if len(per_stage) != 3:
        raise ModelError(f"resnet: blocks must give the number of blocks of the three stages, got {blocks!r}")
    c = dims[0]
    layers: list[nn.Module] = [
        _normalize_layer(mean, std, c, "resnet"),
        nn.Conv2d(c, w, 3, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
    ]
    in_ch = w
    for stage, n_blocks in enumerate(per_stage):
        out_ch = w * 2**stage
        for i in range(n_blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(in_ch, out_ch, stride))
            in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, k)]
    model = nn.Sequential(*layers)
    config = {
        "input_shape": list(dims),
        "num_classes": k,
        "mean": _jsonable(mean),
        "std": _jsonable(std),
        "width": w,
        "blocks": list(per_stage),
    }
    _remember(model, "resnet", config)
    return model


class Rows(nn.Module):
    """An image batch ``(N, C, H, W)`` as a sequence batch ``(N, H, C * W)``: the rows are the time steps.

    The features of a step are the row's pixels, channel after channel. With one channel, ``(N, H, W)`` and
    ``(N, 1, H, W)`` are both accepted; a sequence model (``channels=None``) takes ``(N, T, F)`` (or ``(N, 1, T, F)``,
    as :func:`~bastion.data.load_npz` shapes 3-D arrays) unchanged. No branch on the input's rank, so the model stays
    traceable by ``torch.fx``.

    Args:
        steps: rows ``H`` (or time steps ``T``).
        features: features per step, ``C * W`` (or ``F``).
        channels: the image's channels ``C``; None for sequence inputs.
    """

    def __init__(self, steps: int, features: int, channels: int | None = None) -> None:
        super().__init__()
        self.steps, self.features, self.channels = steps, features, channels

    def forward(self, x: Tensor) -> Tensor:
        if self.channels is not None and self.channels > 1:
            return x.permute(0, 2, 1, 3).flatten(2)
        return x.reshape(x.shape[0], self.steps, self.features)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, features={self.features}, channels={self.channels}"


class LastStep(nn.Module):
    """The output of a batch-first ``nn.LSTM``/``nn.GRU`` at the last time step: ``output[:, -1]`` of its tuple."""

    def forward(self, out: tuple[Tensor, Any]) -> Tensor:
        return out[0][:, -1]


RECURRENT_CELLS: dict[str, type[nn.Module]] = {"lstm": nn.LSTM, "gru": nn.GRU}


def lstm(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    hidden: int = 64,
    num_layers: int = 1,
    cell: str = "lstm",
) -> nn.Sequential:
    """Recurrent classifier: an LSTM (or GRU) over the time steps, its last hidden state into a linear layer.

    An image ``(C, H, W)`` is read row by row (:class:`Rows`: ``H`` steps of ``C * W`` features), so the 8x8 digits
    are 8 steps of 8 features, as testRNN reads MNIST (28 steps of 28 pixels; Huang et al., "Coverage-Guided Testing
    for Recurrent Neural Networks", IEEE Trans. Reliability 2021). A sequence ``(T, F)`` is read as it is
    (:func:`~bastion.data.load_digits_sequences`).

    Args:
        input_shape: ``(T, F)`` for sequences or ``(C, H, W)`` for images.
        num_classes: number of output logits.
        mean: normalisation mean: one value, or one per channel of an image input.
        std: normalisation standard deviation: one value, or one per channel of an image input.
        hidden: units of the recurrent layer(s).
        num_layers: stacked recurrent layers.
        cell: ``"lstm"`` (``nn.LSTM``) or ``"gru"`` (``nn.GRU``).

    Returns:
        ``Sequential(Normalize, Rows, LSTM | GRU (batch_first), LastStep, Linear)``.
    """
    dims = _check_input_shape(input_shape, "lstm", image=False)
    if len(dims) not in (2, 3):
        raise ModelError(f"lstm: input_shape must be (T, F) for sequences or (C, H, W) for images, got {dims}")
    k = _check_num_classes(num_classes, "lstm")
    width = _positive_int(hidden, "hidden", "lstm")
    depth = _positive_int(num_layers, "num_layers", "lstm")
    if cell not in RECURRENT_CELLS:
        raise ModelError(f"lstm: cell must be one of {', '.join(RECURRENT_CELLS)}, got {cell!r}")
    if len(dims) == 3:
        c, h, w = dims
        norm, rows = _normalize_layer(mean, std, c, "lstm"), Rows(h, c * w, c)
        features = c * w
    else:
        norm = Normalize(mean, std)
        if norm.channels != 1:
            raise ModelError(
                f"lstm: a sequence input {dims} takes one normalisation mean and std, got {norm.channels} values "
                "(per-feature statistics would need the feature axis first); normalise the data beforehand"
            )
        rows, features = Rows(dims[0], dims[1]), dims[1]
    rnn = RECURRENT_CELLS[cell](features, width, num_layers=depth, batch_first=True)
    model = nn.Sequential(norm, rows, rnn, LastStep(), nn.Linear(width, k))
    config = {
        "input_shape": list(dims),
        "num_classes": k,
        "mean": _jsonable(mean),
        "std": _jsonable(std),
        "hidden": width,
        "num_layers": depth,
        "cell": cell,
    }
    _remember(model, "lstm", config)
    return model


def pointnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    widths: Sequence[int] = (64, 128, 256),
    head: Sequence[int] = (128,),
    dropout: float = 0.3,
) -> nn.Sequential:
    """PointNet point-cloud classifier (Qi et al., CVPR 2017; see :mod:`bastion.pointcloud.model`).

    Args:
        input_shape: ``(P, 3)``: P points of three coordinates.
        num_classes: number of output logits.
        mean: normalisation mean of the coordinates (one value).
        std: normalisation standard deviation of the coordinates (one value).
        widths: widths of the shared per-point MLP.
        head: widths of the hidden layers of the classification head.
        dropout: dropout before the last layer.

    Returns:
        ``Sequential(Normalize, PointNet)``.
    """
    from bastion.pointcloud.model import PointNet

    dims = _check_input_shape(input_shape, "pointnet", image=False)
    if len(dims) != 2 or dims[1] != 3:
        raise ModelError(f"pointnet: input_shape must be (P, 3) for clouds of P points, got {dims}")
    k = _check_num_classes(num_classes, "pointnet")
    ws = _positive_ints(widths, "widths", "pointnet")
    hs = _positive_ints(head, "head", "pointnet", allow_empty=True)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelError(f"pointnet: dropout must be in [0, 1), got {dropout!r}")
    norm = Normalize(mean, std)
    if norm.channels != 1:
        raise ModelError("pointnet: give one normalisation mean and std for all coordinates")
    model = nn.Sequential(norm, PointNet(k, widths=ws, head=hs, dropout=float(dropout)))
    config = {"input_shape": list(dims), "num_classes": k, "mean": _jsonable(mean), "std": _jsonable(std),
              "widths": list(ws), "head": list(hs), "dropout": float(dropout)}  # fmt: skip
    _remember(model, "pointnet", config)
    return model


def audiocnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    mean: MeanStd = 0.0,
    std: MeanStd = 1.0,
    channels: Sequence[int] = (16, 32, 64),
) -> nn.Sequential:
    """1-D convolutional waveform classifier (see :mod:`bastion.audio.model`).

    Args:
        input_shape: ``(1, T)`` (or ``(T,)``): mono waveforms of T >= 256 samples.
        num_classes: number of output logits.
        mean: normalisation mean (one value).
        std: normalisation standard deviation (one value).
        channels: channels of the strided first convolution and of each conv/pool block.

    Returns:
        ``Sequential(Normalize, AudioCNN)``.
    """
    from bastion.audio.model import AudioCNN

    dims = _check_input_shape(input_shape, "audiocnn", image=False)
    if dims[:-1] not in ((), (1,)) or dims[-1] < 256:
        raise ModelError(f"audiocnn: input_shape must be (1, T) or (T,) with T >= 256 samples, got {dims}")
    k = _check_num_classes(num_classes, "audiocnn")
    cs = _positive_ints(channels, "channels", "audiocnn")
    if dims[-1] < 16 * 4 ** (len(cs) - 1):
        raise ModelError(f"audiocnn: {len(cs)} blocks need T >= {16 * 4 ** (len(cs) - 1)} samples, got {dims[-1]}")
    norm = Normalize(mean, std)
    if norm.channels != 1:
        raise ModelError("audiocnn: give one normalisation mean and std")
    model = nn.Sequential(norm, AudioCNN(k, channels=cs))
    config = {"input_shape": list(dims), "num_classes": k, "mean": _jsonable(mean), "std": _jsonable(std),
              "channels": list(cs)}  # fmt: skip
    _remember(model, "audiocnn", config)
    return model


ZOO: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "lstm": lstm,
                                        "pointnet": pointnet, "audiocnn": audiocnn}  # fmt: skip
"""Registry of architecture factories by name; add an entry to make a new architecture loadable by name."""


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a zoo architecture by name.

    Args:
        name: a key of :data:`ZOO` (``"mlp"``, ``"cnn"``, ``"resnet"``, ``"lstm"``, ``"pointnet"``, ``"audiocnn"``).
        input_shape: shape of one input without the batch dimension.
        num_classes: number of output logits.
        **kwargs: ``mean``, ``std`` and the architecture's own keyword arguments.

    Returns:
        A freshly initialised model (in training mode, on the CPU).

    Raises:
        ModelError: unknown name, invalid shape, or an argument the architecture does not take.
    """
    factory = ZOO.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ModelError(f"unknown architecture {name!r}; available: {', '.join(sorted(ZOO))}")
    # Bind first, so that a TypeError raised inside a factory is not mistaken for a bad keyword argument.
    try:
        inspect.signature(factory).bind(input_shape, num_classes, **kwargs)
    except TypeError as exc:
        accepted = [p.name for p in inspect.signature(factory).parameters.values() if p.kind is p.KEYWORD_ONLY]
        raise ModelError(
            f"{name}: invalid arguments {sorted(kwargs)} ({exc}); keyword arguments accepted: {accepted}"
        ) from exc
    model = factory(input_shape, num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"architecture {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
