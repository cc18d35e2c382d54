"""Fused format: Conv / Gemm / MatMul become ops of the ``onnx_codebook`` domain."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..cluster import Clustering
from ..encode import packed_indices_tensor
from ..schema import DOMAIN, FUSED_OF, channel_axis, indices_names
from .common import NameScope, array_constant, lazy_constant

# Spatial ranks of Conv the kernels implement (weight rank - 2).
FUSED_CONV_SPATIAL = (1, 2)


def fusible(node: gs.Node, weight: gs.Constant) -> bool:
    """Whether ``node`` (consuming ``weight`` as its weight) has a fused kernel."""
    if node.op not in FUSED_OF or len(node.inputs) < 2 or node.inputs[1] is not weight:
        return False
    rank = len(weight.shape)
    if node.op == "Conv":
        return rank - 2 in FUSED_CONV_SPATIAL
    if node.op == "MatMul":
        return rank == 2
    return rank == 2


def replace_with_fused(
    graph: gs.Graph, node: gs.Node, weight: gs.Constant, clustering: Clustering, bits: int, names: NameScope,
    shared: dict,
) -> gs.Node:
    """Swap ``node`` for its fused op reading ``clustering``; ``shared`` caches the
    packed constants per weight so a shared weight is stored once."""
    shape = [int(d) for d in weight.shape]
    axis = channel_axis(node.op, node.attrs, len(shape))
    if clustering.groups == 1:
        group_size = shape[axis]
    elif axis == clustering.axis:
        group_size = clustering.group_size
    else:
        raise ValueError(f"{node.name}: codebook rows follow axis {clustering.axis}, the op needs axis {axis}")
    if id(weight) not in shared:
        cb_name, idx_name, _ = (names.fresh(n) for n in indices_names(weight.name))
        shared[id(weight)] = (
            lazy_constant(packed_indices_tensor(idx_name, clustering.indices, bits)),
            array_constant(cb_name, clustering.codebook.astype("float32")),
        )
    indices, codebook = shared[id(weight)]
    extra = list(node.inputs[2:3])
    attrs = dict(node.attrs)
    attrs.update(bits=int(bits), weight_shape=shape, group_size=int(group_size))
    fused = gs.Node(
        FUSED_OF[node.op], node.name, attrs, [node.inputs[0], indices, codebook, *extra], list(node.outputs),
        domain=DOMAIN,
    )
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.append(fused)
    return fused
