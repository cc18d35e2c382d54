"""Which weights are eligible for compression, and why the others are skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .io import iter_graphs
from .schema import WEIGHT_INPUT, channel_axis

FLOAT_TYPES = (np.float32, np.float16, np.float64)


@dataclass
class Layer:
    """One weight tensor to compress and the nodes that consume it."""

    weight: str
    op_type: str
    shape: tuple[int, ...]
    axis: int
    graph: gs.Graph = field(repr=False)
    constant: gs.Constant = field(repr=False)
    consumers: list[gs.Node] = field(repr=False)
    # Bytes per value the input model stored the weight in, where that differs from its
    # dtype here (a float16 weight read through Cast(to=float): fold_weight_casts).
    stored_itemsize: int = 0

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.consumers)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def channels(self) -> int:
        return int(self.shape[self.axis])

    @property
    def itemsize(self) -> int:
        """Bytes per value of the weight as the input model stored it (float16, float32 or float64)."""
        return self.stored_itemsize or np.dtype(self.constant.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize


@dataclass(frozen=True)
class Skipped:
    name: str
    op_type: str
    reason: str


def skip_reasons(skipped: list[Skipped], shown: int = 3) -> str:
    """The first ``shown`` skipped weights as ``" (name: reason; ...)"``, for an error message ("" if none)."""
    if not skipped:
        return ""
    why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:shown])
    return f" ({why}{'; ...' if len(skipped) > shown else ''})"


# Ops whose weights an earlier tool already quantized (integer weights and scales).
QUANTIZED_OPS = ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DequantizeLinear")


def quantized_note(model: onnx.ModelProto) -> str:
    """``"; the model is already quantized (12 ConvInteger, ...)"`` for an error message, or ""."""
    counts: dict[str, int] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return ""
    return "; the model is already quantized (" + ", ".join(f"{n} {op}" for op, n in sorted(counts.items())) + ")"


def constants_to_initializers(model: onnx.ModelProto, ops: tuple[str, ...]) -> int:
    """Turn float ``Constant`` nodes that feed an eligible weight input (directly or
    through a ``Cast``), the bias of such an op, or the parameters of a
    ``BatchNormalization`` into initializers.

    Some exporters (Paddle, some TF converters) hold weights in Constant nodes; the
    biases and normalisation parameters must be initializers too for the normalisation
    to fold into the weight.  Works in place on every (sub)graph; returns how many
    were moved.
    """
    moved = 0
    for graph in iter_graphs(model.graph):
        weight_inputs = set()
        for n in graph.node:
            if n.domain not in ("", "ai.onnx"):
                continue
            if n.op_type in ops and len(n.input) > WEIGHT_INPUT[n.op_type]:
                weight_inputs.update(n.input[WEIGHT_INPUT[n.op_type]:WEIGHT_INPUT[n.op_type] + 2])
            elif n.op_type == "BatchNormalization":
                weight_inputs.update(n.input[1:5])
        # and a float16 / float64 weight read through Cast (mixed-precision exports), which
        # fold_weight_casts then turns into a float32 weight
        weight_inputs.update(n.input[0] for n in graph.node
                             if n.op_type == "Cast" and n.domain in ("", "ai.onnx") and n.input
                             and n.output and n.output[0] in weight_inputs)
        keep = []
        for node in graph.node:
            value = [a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
            if (
                node.op_type == "Constant"
                and node.domain in ("", "ai.onnx")
                and len(node.output) == 1
                and node.output[0] in weight_inputs
                and value
                and value[0].t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
            ):
                tensor = onnx.TensorProto()
                tensor.CopyFrom(value[0].t)
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                moved += 1
            else:
                keep.append(node)
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)
    return moved


def fold_weight_casts(model: onnx.ModelProto, ops: tuple[str, ...]) -> dict[str, int]:
    """Replace ``Cast(to=float)`` of a float16 / float64 initializer that feeds only the
    weight inputs of ``ops`` with a float32 initializer of the cast values (mixed-precision
    exports store weights so; onnxruntime folds the Cast at session start and computes
    with these values).  Only where the initializer feeds nothing else and is not a graph
    input.  Works in place on every (sub)graph; returns {new weight name: bytes per value
    the model stored it in}.
    """
    graphs = list(iter_graphs(model.graph))
    uses: dict[str, int] = {}
    weight_uses: dict[str, int] = {}
    for g in graphs:
        for node in g.node:
            for k, name in enumerate(node.input):
                uses[name] = uses.get(name, 0) + 1
                if node.op_type in ops and node.domain in ("", "ai.onnx") and k == WEIGHT_INPUT[node.op_type]:
                    weight_uses[name] = weight_uses.get(name, 0) + 1
    overridable = {i.name for g in graphs for i in g.input}
    folded: dict[str, int] = {}
    for graph in graphs:
        inits = {t.name: t for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        keep, dropped = [], set()
        for node in graph.node:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            src = inits.get(node.input[0]) if node.op_type == "Cast" and len(node.input) == 1 else None
            out = node.output[0] if len(node.output) == 1 else ""
            if (
                src is None
                or node.domain not in ("", "ai.onnx")
                or to != onnx.TensorProto.FLOAT
                or src.data_type not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
                or src.name in overridable
                or uses.get(src.name) != 1
                or out in outputs
                or out in inits
                or not weight_uses.get(out)
                or weight_uses[out] != uses.get(out)
            ):
                keep.append(node)
                continue
            values = numpy_helper.to_array(src)
            graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), out))
            dropped.add(src.name)
            folded[out] = values.dtype.itemsize
        if dropped:
            kept_inits = [t for t in graph.initializer if t.name not in dropped]
            del graph.initializer[:]
            graph.initializer.extend(kept_inits)
            del graph.node[:]
            graph.node.extend(keep)
    return folded


def weight_casts_note(count: int) -> str:
    """What compress and search say about the weights fold_weight_casts made float32."""
    return (f"{count} weight(s) stored as float16 / float64 and read through Cast(to=float) are clustered as the "
            "float32 values onnxruntime computes with (sizes count them as stored)")


def unlist_ir3_weight_inputs(model: onnx.ModelProto, any_version: bool = False) -> int:
    """Drop the main graph's inputs that only list an initializer, in an IR version 3 model
    (with ``any_version``, in any: the user asked for weights listed as inputs to count).

    IR 3 requires every initializer to be listed among the graph inputs (exporters of the
    opset 8 era wrote it), so there the listing does not mark a weight as meant to be
    overridden at run time.  Without it the weights count as constants; the model becomes
    IR 4, which allows initializers that are not inputs.  Works in place; returns how many
    inputs were dropped.
    """
    if model.ir_version >= 4 and not any_version:
        return 0
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
        model.ir_version = max(model.ir_version, 4)
    return dropped


def fold_batch_norms(model: onnx.ModelProto) -> int:
    """Fold an inference-mode ``BatchNormalization`` into the ``Conv`` / ``ConvTranspose``
    before it, as onnxruntime does for float models at session start, so that the
    codebooks are fitted to the weights that are actually computed with, and a fused
    op is not followed by a separate normalisation (which would also keep a following
    Relu out of its epilogue).

    Only where the convolution's float32 weight (and bias) initializers feed nothing
    else, its output feeds only the normalisation, and the normalisation's parameters
    are float32 initializers of one value per output channel; none of them may also be
    a graph input (overridable at run time).  Works in place on
    every (sub)graph; returns how many were folded.
    """
    graphs = list(iter_graphs(model.graph))
    uses: dict[str, int] = {}
    produced: set[str] = set()
    for g in graphs:
        for node in g.node:
            produced.update(node.output)
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
    overridable = {i.name for g in graphs for i in g.input}  # an initializer that is also an input
    folded = 0
    for graph in graphs:
        inits = {t.name: t for t in graph.initializer}
        outputs = {o.name for o in graph.output}
        consumer = {i: k for k, n in enumerate(graph.node) for i in n.input}  # unique where used once
        removed = set()
        for conv in graph.node:
            if conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
                continue
            y = conv.output[0]
            bn = graph.node[consumer[y]] if y in consumer else None
            if bn is None or bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or uses.get(y) != 1:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
            if y in outputs or attrs.get("training_mode", 0) or len(bn.input) != 5 or bn.input[0] != y \
                    or any(o for o in bn.output[1:]):
                continue
            weight = inits.get(conv.input[1]) if len(conv.input) > 1 else None
            bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else ""
            params = [inits.get(n) for n in bn.input[1:]]
            tensors = [weight, *params] + ([inits.get(bias_name)] if bias_name else [])
            if any(t is None or t.data_type != onnx.TensorProto.FLOAT or t.name in overridable for t in tensors):
                continue
            if uses.get(weight.name) != 1 or (bias_name and uses.get(bias_name) != 1) or len(weight.dims) < 3:
                continue
            w = numpy_helper.to_array(weight).astype(np.float64)
            scale, shift, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in params)
            group = int({a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}.get("group", 1))
            cout = w.shape[0] if conv.op_type == "Conv" else w.shape[1] * group
            if any(v.shape != (cout,) for v in (scale, shift, mean, var)) or (w.shape[0] % group):
                continue
            factor = scale / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
            if conv.op_type == "Conv":
                w = w * factor.reshape(-1, *[1] * (w.ndim - 1))
            else:  # [C, M/group, k...]: output channel (c // (C/group)) * M/group + m
                parts = w.reshape(group, w.shape[0] // group, *w.shape[1:])
                w = (parts * factor.reshape(group, 1, w.shape[1], *[1] * (w.ndim - 2))).reshape(w.shape)
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros(cout)
            new_bias = (bias - mean) * factor + shift
            weight.CopyFrom(numpy_helper.from_array(w.astype(np.float32), weight.name))
            if bias_name:
                inits[bias_name].CopyFrom(numpy_helper.from_array(new_bias.astype(np.float32), bias_name))
            else:
                bias_name = _fresh_name(f"{weight.name}.bn_bias", uses, inits, produced)
                graph.initializer.append(numpy_helper.from_array(new_bias.astype(np.float32), bias_name))
                uses[bias_name] = 1
                while len(conv.input) < 3:
                    conv.input.append("")
                conv.input[2] = bias_name
            conv.output[0] = bn.output[0]
            removed.add(consumer[y])
            folded += 1
        if removed:
            keep = [n for k, n in enumerate(graph.node) if k not in removed]
            del graph.node[:]
            graph.node.extend(keep)
    return folded


def _fresh_name(base: str, *taken) -> str:
    name, i = base, 0
    while any(name in t for t in taken):
        i += 1
        name = f"{base}.{i}"
    return name


def _weight_constant(tensor: gs.Tensor) -> gs.Constant | None:
    """The constant behind a weight input, looking through Identity nodes."""
    seen = 0
    while isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity" and seen < 8:
        tensor = tensor.inputs[0].inputs[0]
        seen += 1
    return tensor if isinstance(tensor, gs.Constant) else None


def select_layers(
    graph: gs.Graph, ops: tuple[str, ...], min_elements: int, graph_inputs=(), stored_itemsize=None
) -> tuple[list[Layer], list[Skipped]]:
    """Eligible weights of ``graph`` and its subgraphs, and the reasons others were skipped.

    ``graph_inputs`` names the model's graph inputs as the protobuf lists them:
    onnx-graphsurgeon drops inputs that also have an initializer, and such a
    weight can be overridden at run time, so it is left alone.  ``stored_itemsize``:
    {weight name: bytes per value in the input model} where that differs from the
    weight's dtype here (fold_weight_casts).
    """
    stored_itemsize = stored_itemsize or {}
    graphs = [graph, *graph.subgraphs(recursive=True)]
    graph_inputs = {t.name for t in graph.inputs} | set(graph_inputs)
    found: dict[int, Layer] = {}
    order: list[int] = []
    skipped: list[Skipped] = []
    bad: set[int] = set()
    for g in graphs:
        for node in g.nodes:
            if node.op not in ops or node.domain not in ("", "ai.onnx", None):
                continue
            pos = WEIGHT_INPUT[node.op]
            label = node.name or f"<{node.op}>"
            if len(node.inputs) <= pos:
                continue
            const = _weight_constant(node.inputs[pos])
            if const is None:
                lhs = _weight_constant(node.inputs[0]) if node.op == "MatMul" else None
                why = ("constant left-hand side is not supported (only a constant right-hand side)"
                       if lhs is not None else "weight is computed at run time, not a constant")
                skipped.append(Skipped(label, node.op, why))
                continue
            key = id(const)
            if key in bad:
                continue
            if const.name in graph_inputs:
                skipped.append(Skipped(const.name, node.op, "weight is also a graph input (can be overridden at run time; "
                                       "export without it there, e.g. keep_initializers_as_inputs=False, or pass "
                                       "--weight-inputs to compress it)"))
                bad.add(key)
                continue
            dtype = np.dtype(const.dtype) if const.dtype is not None else None
            if dtype is None or dtype.type not in FLOAT_TYPES:
                skipped.append(Skipped(const.name, node.op, f"weight is {dtype} (already quantized or not float)"))
                bad.add(key)
                continue
            shape = tuple(int(d) for d in const.shape)
            size = int(np.prod(shape)) if shape else 1
            if size < min_elements:
                skipped.append(Skipped(const.name, node.op, f"{size} elements < min-elements {min_elements}"))
                bad.add(key)
                continue
            if node.op in ("Conv", "ConvTranspose") and len(shape) < 3 or node.op == "Gemm" and len(shape) != 2:
                skipped.append(Skipped(const.name, node.op, f"unexpected weight rank {len(shape)}"))
                bad.add(key)
                continue
            if node.op == "MatMul" and len(shape) < 2:
                skipped.append(Skipped(const.name, node.op, "1-D right-hand side"))
                bad.add(key)
                continue
            axis = channel_axis(node.op, node.attrs, len(shape))
            if key in found:
                layer = found[key]
                if layer.graph is not g:
                    skipped.append(Skipped(const.name, node.op, "weight is shared across subgraphs"))
                    del found[key]
                    order.remove(key)
                    bad.add(key)
                    continue
                if layer.axis != axis:
                    layer.axis = -1  # consumers disagree on the channel axis: one codebook only
                layer.consumers.append(node)
                continue
            found[key] = Layer(const.name, node.op, shape, axis, g, const, [node], stored_itemsize.get(const.name, 0))
            order.append(key)
    return [found[k] for k in order], skipped
