"""Helpers shared by the rewrite passes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues


class NameScope:
    """Hands out tensor and node names that are unique within a model."""

    def __init__(self, taken):
        self._taken = set(taken)

    def fresh(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._taken:
            candidate = f"{name}_{n}"
            n += 1
        self._taken.add(candidate)
        return candidate


def lazy_constant(tensor: onnx.TensorProto) -> gs.Constant:
    """A graphsurgeon Constant that is written back exactly as ``tensor`` (any dtype, packed)."""
    return gs.Constant(tensor.name, LazyValues(tensor))


def array_constant(name: str, array: np.ndarray) -> gs.Constant:
    return lazy_constant(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))


def model_names(graph: gs.Graph) -> set[str]:
    """Every tensor and node name in ``graph`` and its subgraphs."""
    names: set[str] = set()
    for g in [graph, *graph.subgraphs(recursive=True)]:
        names.update(g.tensors().keys())
        names.update(n.name for n in g.nodes if n.name)
    return names


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every consumer of ``old`` at ``new``."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
