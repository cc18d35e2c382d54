"""Shared ONNX export for the training scripts in models/ (torch is imported here, never by the package)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 13; stay well inside that


def _rename_folded_initializers(proto: onnx.ModelProto) -> None:
    """Give the anonymous ``onnx::Conv_NN`` initializers produced by BN folding readable names.

    ``/features/features.3/Conv`` with inputs ``(x, onnx::Conv_51, onnx::Conv_52)`` gets
    ``features.3.weight`` and ``features.3.bias``, matching the torch module path. A name that
    would clash with an existing one is left as it was.
    """
    graph = proto.graph
    taken = {t.name for t in graph.initializer}
    renames: dict[str, str] = {}
    for node in graph.node:
        path: list[str] = []
        for part in [p for p in node.name.split("/") if p][:-1]:
            # scopes look like "features/features.0" (child of a Sequential) or "_blocks.0/_depthwise_conv"
            if path and part.startswith(path[-1] + "."):
                path[-1] = part
            else:
                path.append(part)
        if not path:
            continue
        module = ".".join(path)
        for src, suffix in zip(node.input[1:3], ("weight", "bias")):
            target = f"{module}.{suffix}"
            if src.startswith("onnx::") and src in taken and src not in renames and target not in taken:
                renames[src] = target
                taken.add(target)
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path, producer: str) -> onnx.ModelProto:
    """Export ``model`` in eval mode (BN folded) at opset 13 with a dynamic batch axis, then check it."""
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        # Slices with step -1 (e.g. in exported padding) are left unfolded; harmless, and noisy.
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
        torch.onnx.export(
            model, (sample,), str(path),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=13, dynamo=False, do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_name = producer
    _rename_folded_initializers(proto)
    ops = {n.op_type for n in proto.graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError("BatchNormalization was not folded into Conv")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def onnx_predict(path: Path, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class predictions of the exported model with onnxruntime on CPU."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    preds = [sess.run(["logits"], {"input": x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)]
    return np.concatenate(preds)
