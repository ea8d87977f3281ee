"""Models: the zoo of small architectures, the normalisation layer, safe loading and the model contract
checks.

A model is any ``torch.nn.Module`` mapping a batch of inputs in the input domain ``[0, 1]`` to logits ``(N,
K)``; normalisation lives inside it (:class:`Normalize`). :class:`BlackBox` is the black-box view of a model or of
any callable (scores or labels only, every query counted against a budget).
"""

from __future__ import annotations

from bastion.models.checks import channels_last, check_logits, eval_mode, model_device, model_fingerprint
from bastion.models.io import load_callable, load_model, save_model
from bastion.models.normalize import Normalize
from bastion.models.onnx import OnnxRuntimeModel, load_onnx, onnx_input_shape
from bastion.models.oracle import BlackBox, QueryBudgetExhausted, QueryLedger, from_numpy, from_onnx, from_sklearn
from bastion.models.zoo import ZOO, build_model, cnn, mlp, resnet

__all__ = [
    "ZOO",
    "BlackBox",
    "Normalize",
    "OnnxRuntimeModel",
    "QueryBudgetExhausted",
    "QueryLedger",
    "build_model",
    "channels_last",
    "check_logits",
    "cnn",
    "eval_mode",
    "from_numpy",
    "from_onnx",
    "from_sklearn",
    "load_callable",
    "load_model",
    "load_onnx",
    "mlp",
    "model_device",
    "model_fingerprint",
    "onnx_input_shape",
    "resnet",
    "save_model",
]
