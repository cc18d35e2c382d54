"""Fused format: Conv / ConvTranspose / Gemm / MatMul become ops of the ``onnx_codebook`` domain."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cluster import Clustering
from ..encode import packed_indices_tensor
from ..schema import DOMAIN, FUSED_OF, channel_axis, indices_names
from .common import NameScope, array_constant, lazy_constant

# Spatial ranks of Conv the kernels implement (weight rank - 2).
FUSED_CONV_SPATIAL = (1, 2)
# Fold a following residual Add and activation into the fused ops (schema: fused epilogue).
FOLD_EPILOGUE = True


def fusible(node: gs.Node, weight: gs.Constant) -> bool:
    """Whether ``node`` (consuming ``weight`` as its weight) has a fused kernel."""
    return unfused_reason(node, weight) is None


def unfused_reason(node: gs.Node, weight: gs.Constant) -> str | None:
    """Why ``node`` (consuming ``weight``) keeps the standard decode in a fused model, or None."""
    if node.op not in FUSED_OF or len(node.inputs) < 2 or node.inputs[1] is not weight:
        return f"{node.op} reads it other than as its weight"
    if weight.dtype is None or np.dtype(weight.dtype) != np.float32:
        # the kernels compute in float32
        return f"{np.dtype(weight.dtype).name if weight.dtype is not None else 'untyped'} weight"
    rank = len(weight.shape)
    if node.op in ("Conv", "ConvTranspose") and rank - 2 not in FUSED_CONV_SPATIAL:
        return f"{rank - 2}-D {node.op}"
    if node.op == "ConvTranspose" and not _conv_transpose_fusible(node, weight):
        return "ConvTranspose with auto_pad / output_shape or few input channels per group"
    if node.op in ("Gemm", "MatMul") and rank != 2:
        return f"{node.op} weight of rank {rank}"
    return None


def _conv_transpose_fusible(node: gs.Node, weight: gs.Constant) -> bool:
    """Explicit pads only (auto_pad / output_shape stay with onnxruntime's own
    arithmetic), and enough input channels per group: the kernel stores each row of
    C/group indices padded to a multiple of 8, which must not cost more than a
    quarter on top."""
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or "output_shape" in node.attrs:
        return False
    group = int(node.attrs.get("group", 1))
    cin = int(weight.shape[0])
    if group < 1 or cin % group:
        return False
    per_group = cin // group
    return 4 * (-per_group % 8) <= per_group


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


def _single_consumer(t: gs.Tensor, graph_outputs: set) -> gs.Node | None:
    if t.name in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _scalar(t: gs.Tensor) -> float | None:
    """The value of a one-element constant: an initializer or the output of a ``Constant``
    node (PyTorch exports ReLU6's bounds that way); None for anything else."""
    if isinstance(t, gs.Constant):
        values = t.values
    elif len(t.inputs) == 1 and t.inputs[0].op == "Constant" and t.inputs[0].domain in (None, "", "ai.onnx"):
        attrs = t.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            values = attrs["value"].values
        elif "value_float" in attrs:
            values = np.asarray(attrs["value_float"])
        else:
            return None
    else:
        return None
    values = np.asarray(values)
    return float(values.reshape(-1)[0]) if values.size == 1 else None


def _clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip whose bounds are constants (attributes before opset 11)."""
    lo, hi = float("-inf"), float("inf")
    if "min" in node.attrs or "max" in node.attrs:
        lo, hi = float(node.attrs.get("min", lo)), float(node.attrs.get("max", hi))
    for i in (1, 2):
        if len(node.inputs) > i and node.inputs[i].name:
            value = _scalar(node.inputs[i])
            if value is None:
                return None
            if i == 1:
                lo = value
            else:
                hi = value
    return lo, hi


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    sa, sb = getattr(a, "shape", None), getattr(b, "shape", None)
    if not sa or not sb or len(sa) != len(sb):
        return False
    return all(x == y and (isinstance(x, int) or (isinstance(x, str) and x)) for x, y in zip(sa, sb))


def fold_epilogue(graph: gs.Graph, fused: gs.Node) -> list[str]:
    """Fold a following residual ``Add`` (CodebookConv only) and activation into ``fused``:
    Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, or the gated
    ``Mul(y, Sigmoid(y))`` (SiLU) and ``Mul(y, HardSigmoid(y))`` (HardSwish).

    Only when nothing else reads the intermediate tensors and, for the residual,
    both addends are known to have the same shape.  Returns what was folded.
    """
    outputs = {t.name for t in graph.outputs}
    folded = []
    y = fused.outputs[0]
    nxt = _single_consumer(y, outputs)
    if fused.op == "CodebookConv" and nxt is not None and nxt.op == "Add" and len(nxt.inputs) == 2:
        other = nxt.inputs[1] if nxt.inputs[0] is y else nxt.inputs[0]
        if other is not y and not isinstance(other, gs.Constant) and _same_shape(other, y) \
                and _same_shape(nxt.outputs[0], y):
            while len(fused.inputs) < 4:
                fused.inputs.append(gs.Variable.empty())
            fused.inputs.append(other)
            _bypass(fused, [nxt])
            folded.append("Add")
            y = fused.outputs[0]
            nxt = _single_consumer(y, outputs)
    if nxt is not None and nxt.op in _ONE_INPUT_ACTIVATIONS and nxt.inputs and nxt.inputs[0] is y:
        attrs = _activation_attrs(nxt)
        if attrs is None:
            return folded
        fused.attrs.update(attrs)
        _bypass(fused, [nxt])
        folded.append(nxt.op)
        return folded
    gated = _gated_activation(y, outputs)
    if gated is not None:
        attrs, gate, mul = gated
        fused.attrs.update(attrs)
        _bypass(fused, [gate, mul])
        folded.append(f"{gate.op}+Mul")
    return folded


# ONNX activations on one input that the kernels apply as they store (schema: fused epilogue).
_ONE_INPUT_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish")


def _activation_attrs(node: gs.Node) -> dict | None:
    """The fused-op attributes of activation ``node``, or None when they are not constants."""
    if node.op == "Clip":
        bounds = _clip_bounds(node)
        return None if bounds is None else {"activation": "Clip", "activation_min": bounds[0],
                                            "activation_max": bounds[1]}
    if node.op == "LeakyRelu":
        return {"activation": "LeakyRelu", "activation_alpha": float(node.attrs.get("alpha", 0.01))}
    if node.op == "HardSigmoid":
        return {"activation": "HardSigmoid", "activation_alpha": float(node.attrs.get("alpha", 0.2)),
                "activation_beta": float(node.attrs.get("beta", 0.5))}
    return {"activation": node.op}


def _gated_activation(y: gs.Tensor, graph_outputs: set) -> tuple[dict, gs.Node, gs.Node] | None:
    """``Mul(y, Sigmoid(y))`` (SiLU / Swish) or ``Mul(y, HardSigmoid(y))`` (HardSwish, as
    exporters write it for opsets before 14): (attributes, gate node, Mul), when y and the
    gate's output feed nothing else."""
    if y.name in graph_outputs or len(y.outputs) != 2:
        return None
    gate = next((n for n in y.outputs if n.op in ("Sigmoid", "HardSigmoid") and n.inputs and n.inputs[0] is y), None)
    if gate is None or len(gate.outputs) != 1:
        return None
    mul = _single_consumer(gate.outputs[0], graph_outputs)
    if mul is None or mul.op != "Mul" or not any(n is mul for n in y.outputs) or len(mul.inputs) != 2:
        return None
    if {id(t) for t in mul.inputs} != {id(y), id(gate.outputs[0])}:
        return None
    if gate.op == "Sigmoid":
        return {"activation": "Silu"}, gate, mul
    return {"activation": "HardSwish", "activation_alpha": float(gate.attrs.get("alpha", 0.2)),
            "activation_beta": float(gate.attrs.get("beta", 0.5))}, gate, mul


def _bypass(fused: gs.Node, nodes: list[gs.Node]) -> None:
    """The fused op writes the last of ``nodes``' output; ``nodes`` are disconnected."""
    fused.outputs[0] = nodes[-1].outputs[0]
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
