"""Reading compressed models back: ``inspect`` and ``decompress``.

Both work from the graph itself (the Cast -> [Add] -> Gather pattern and the
fused ops), so they also understand models whose metadata was stripped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .io import iter_graphs
from .pack import unpack_bits
from .schema import DOMAIN, FUSED_OPS, METADATA_KEY, PLAIN_OF, SUPPORTED_OPS, WEIGHT_INPUT, channel_axis

INDEX_TYPES = {onnx.TensorProto.UINT2: 2, onnx.TensorProto.UINT4: 4, onnx.TensorProto.UINT8: 8}


@dataclass
class Decoder:
    """One compressed weight found in a graph."""

    graph: onnx.GraphProto
    output: str  # tensor holding the decoded weight (standard) or the fused node's name
    nodes: list  # decode nodes (standard) or [fused node]
    codebook: str
    indices: str
    offsets: str | None
    fused: bool


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def find_decoders(model: onnx.ModelProto) -> list[Decoder]:
    found = []
    for graph in iter_graphs(model.graph):
        inits = _initializers(graph)
        producer = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            if node.domain == DOMAIN and node.op_type in FUSED_OPS:
                found.append(Decoder(graph, node.name, [node], node.input[2], node.input[1], None, True))
                continue
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in inits:
                continue
            chain = [node]
            src = producer.get(node.input[1])
            offsets = None
            if src is not None and src.op_type == "Add" and src.input[1] in inits:
                offsets = src.input[1]
                chain.append(src)
                src = producer.get(src.input[0])
            if src is None or src.op_type != "Cast" or src.input[0] not in inits:
                continue
            if inits[src.input[0]].data_type not in INDEX_TYPES:
                continue
            chain.append(src)
            chain.reverse()  # decode order: Cast -> [Add] -> Gather [-> Cast]
            out = node.output[0]
            consumers = [n for n in graph.node if out in n.input]
            if len(consumers) == 1 and consumers[0].op_type == "Cast":
                chain.append(consumers[0])
                out = consumers[0].output[0]
            found.append(Decoder(graph, out, chain, node.input[0], src.input[0], offsets, False))
    return found


def _fused_weight(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    shape = [int(d) for d in attrs["weight_shape"]]
    bits, group_size = int(attrs["bits"]), int(attrs["group_size"])
    codebook = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    idx = unpack_bits(numpy_helper.to_array(inits[node.input[1]]), bits, math.prod(shape)).reshape(shape)
    axis = channel_axis(node.op_type, attrs, len(shape))
    moved = np.moveaxis(idx, axis, 0)
    rows = (np.arange(moved.shape[0]) // group_size).reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(codebook[rows, moved.astype(np.intp)], 0, axis)


def _standard_weight(dec: Decoder, inits: dict) -> np.ndarray:
    codebook = numpy_helper.to_array(inits[dec.codebook])
    idx = numpy_helper.to_array(inits[dec.indices]).astype(np.int64)
    if dec.offsets:
        idx = idx + numpy_helper.to_array(inits[dec.offsets]).astype(np.int64)
    w = codebook[idx]
    last = dec.nodes[-1]
    if last.op_type == "Cast":
        to = onnx.helper.get_attribute_value(last.attribute[0])
        w = w.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    return w


def decoded_weight(dec: Decoder) -> np.ndarray:
    inits = _initializers(dec.graph)
    return _fused_weight(dec.nodes[0], inits) if dec.fused else _standard_weight(dec, inits)


def _metadata(model: onnx.ModelProto) -> dict:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            try:
                return json.loads(p.value)
            except ValueError:
                return {}
    return {}


def inspect_model(model: onnx.ModelProto) -> dict:
    """Per-layer storage of a (compressed or plain) model, and totals.

    Each Conv / ConvTranspose / Gemm / MatMul weight is listed: compressed ones
    with bits, codebook entries and stored bytes (codebooks and offsets
    included), float ones at their float size.
    """
    meta = _metadata(model)
    rows = []
    counted: set[tuple[int, str]] = set()
    for dec in find_decoders(model):
        inits = _initializers(dec.graph)
        cb, ix = inits[dec.codebook], inits[dec.indices]
        stored = len(cb.raw_data) + len(ix.raw_data) + (len(inits[dec.offsets].raw_data) if dec.offsets else 0)
        if dec.fused:
            node = dec.nodes[0]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            shape = [int(d) for d in attrs["weight_shape"]]
            bits, group_size = int(attrs["bits"]), int(attrs["group_size"])
            op, name = node.op_type, node.input[1].removesuffix(".indices")
            entries = math.prod(cb.dims)
            groups = int(cb.dims[0])
        else:
            shape = list(ix.dims)
            entries = int(math.prod(cb.dims))
            groups = 1
            if dec.offsets:
                off = numpy_helper.to_array(inits[dec.offsets]).reshape(-1)
                groups = len(np.unique(off))
            k = entries // max(groups, 1)
            name = dec.output
            info = meta.get(name, {})
            bits = int(info.get("bits", max(1, math.ceil(math.log2(max(k, 2))))))
            group_size = int(info.get("group_size", 0)) or None
            consumers = [n.op_type for n in dec.graph.node if dec.output in n.input]
            op = consumers[0] if consumers else "?"
        key = (id(dec.graph), dec.indices)
        if key in counted:
            continue
        counted.add(key)
        n = math.prod(shape)
        # bytes per value in the model compress read (recorded since; 4 for older outputs)
        original = int(meta.get(name, {}).get("original_itemsize", 4))
        rows.append({
            "name": name, "op": op, "shape": shape, "bits": bits,
            "granularity": "tensor" if groups == 1 else ("channel" if group_size == 1 else "group"),
            "codebook_entries": int(entries), "format": "fused" if dec.fused else "standard",
            "bytes_fp32": 4 * n, "bytes_original": original * n, "bytes_stored": stored,
        })
    for graph in iter_graphs(model.graph):
        inits = _initializers(graph)
        for node in graph.node:
            if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                continue
            pos = WEIGHT_INPUT[node.op_type]
            if len(node.input) <= pos or node.input[pos] not in inits:
                continue
            t = inits[node.input[pos]]
            if (id(graph), t.name) in counted:
                continue
            counted.add((id(graph), t.name))
            n = math.prod(t.dims)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            rows.append({
                "name": t.name, "op": node.op_type, "shape": list(t.dims), "bits": 8 * itemsize,
                "granularity": "-", "codebook_entries": 0, "format": "float",
                "bytes_fp32": 4 * n, "bytes_original": n * itemsize, "bytes_stored": n * itemsize,
            })
    fp32 = sum(r["bytes_fp32"] for r in rows)
    original = sum(r["bytes_original"] for r in rows)
    stored = sum(r["bytes_stored"] for r in rows)
    return {
        "layers": rows,
        "compressed_layers": sum(r["format"] != "float" for r in rows),
        "weight_bytes_fp32": fp32,
        "weight_bytes_original": original,
        "weight_bytes_stored": stored,
        # against the weights as the compressed model's source stored them, as compress reports
        "compression_ratio": original / stored if stored else 1.0,
    }


_FUSED_ONLY_ATTRS = ("bits", "weight_shape", "group_size", "activation", "activation_min", "activation_max",
                     "activation_alpha", "activation_beta")


def _plain_nodes(node: onnx.NodeProto, weight: str, opset: int) -> list[onnx.NodeProto]:
    """The standard op for a fused node with its decoded weight, followed by its
    epilogue as plain ops: Add of the residual Z, then the activation."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bias = [i for i in node.input[3:4] if i]
    residual = node.input[4] if len(node.input) > 4 and node.input[4] else ""
    activation = attrs.get("activation", b"")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    out = node.output[0]
    steps = ["Add"] * bool(residual) + [activation] * bool(activation)
    names = [f"{out}.{step.lower()}_in" for step in steps] + [out]
    plain = onnx.helper.make_node(PLAIN_OF[node.op_type], [node.input[0], weight, *bias], [names[0]], name=node.name)
    plain.attribute.extend(a for a in node.attribute if a.name not in _FUSED_ONLY_ATTRS)
    nodes, cur = [plain], names[0]
    for step, nxt in zip(steps, names[1:]):
        name = f"{node.name or out}/{step}"
        if step == "Add":
            nodes.append(onnx.helper.make_node("Add", [cur, residual], [nxt], name=name))
        elif step != "Clip":
            nodes.extend(_activation_nodes(step, attrs, cur, nxt, name, opset))
        elif opset < 11:  # Clip with min / max attributes
            nodes.append(onnx.helper.make_node("Clip", [cur], [nxt], name=name,
                                               min=float(attrs.get("activation_min", -np.inf)),
                                               max=float(attrs.get("activation_max", np.inf))))
        else:  # Clip with min / max inputs
            lo, hi = f"{name}/min", f"{name}/max"
            nodes.append(onnx.helper.make_node("Constant", [], [lo], name=lo, value=numpy_helper.from_array(
                np.array(attrs.get("activation_min", -np.inf), np.float32))))
            nodes.append(onnx.helper.make_node("Constant", [], [hi], name=hi, value=numpy_helper.from_array(
                np.array(attrs.get("activation_max", np.inf), np.float32))))
            nodes.append(onnx.helper.make_node("Clip", [cur, lo, hi], [nxt], name=name))
        cur = nxt
    return nodes


def _activation_nodes(activation: str, attrs: dict, x: str, y: str, name: str, opset: int) -> list[onnx.NodeProto]:
    """y = activation(x) as plain ops, for every fused activation but Clip."""
    alpha, beta = attrs.get("activation_alpha"), attrs.get("activation_beta")
    make = onnx.helper.make_node
    if activation in ("Relu", "Sigmoid", "Tanh"):
        return [make(activation, [x], [y], name=name)]
    if activation == "LeakyRelu":
        return [make("LeakyRelu", [x], [y], name=name, alpha=float(0.01 if alpha is None else alpha))]
    if activation == "HardSigmoid":
        return [make("HardSigmoid", [x], [y], name=name, alpha=float(0.2 if alpha is None else alpha),
                     beta=float(0.5 if beta is None else beta))]
    if activation == "HardSwish":
        alpha = float(np.float32(1 / 6) if alpha is None else alpha)
        beta = float(0.5 if beta is None else beta)
        if opset >= 14 and np.float32(alpha) == np.float32(1 / 6) and np.float32(beta) == np.float32(0.5):
            return [make("HardSwish", [x], [y], name=name)]
        gate = f"{name}/gate"
        return [make("HardSigmoid", [x], [gate], name=gate, alpha=alpha, beta=beta), make("Mul", [x, gate], [y], name=name)]
    if activation == "Silu":
        gate = f"{name}/gate"
        return [make("Sigmoid", [x], [gate], name=gate), make("Mul", [x, gate], [y], name=name)]
    raise ValueError(f"unknown fused activation {activation!r}")


def decompress_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Plain float weights again: decode nodes and fused ops are replaced by initializers
    and the standard ops; outputs equal those of the compressed model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    decoders = find_decoders(out)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    for graph in iter_graphs(out.graph):
        mine = [d for d in decoders if d.graph is graph]
        if not mine:
            continue
        inits = _initializers(graph)
        drop_nodes: set[int] = set()
        new_inits: list[onnx.TensorProto] = []
        replaced: dict[int, onnx.NodeProto] = {}
        for dec in mine:
            w = decoded_weight(dec)
            if dec.fused:
                node = dec.nodes[0]
                wname = dec.indices.removesuffix(".indices") or f"{node.name}.weight"
                if wname in inits or any(t.name == wname for t in new_inits):
                    wname = f"{dec.indices}.decoded"
                if not any(t.name == wname for t in new_inits):
                    new_inits.append(numpy_helper.from_array(w.astype(np.float32), wname))
                replaced[id(node)] = _plain_nodes(node, wname, opset)
            else:
                new_inits.append(numpy_helper.from_array(w, dec.output))
                drop_nodes.update(id(n) for n in dec.nodes)
        nodes = [m for n in graph.node if id(n) not in drop_nodes for m in replaced.get(id(n), [n])]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for sub in iter_graphs(graph):
            if sub is not graph:
                used |= {i for n in sub.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        names = {t.name for t in graph.initializer}
        keep_vi = [v for v in graph.value_info if v.name not in names]
        del graph.value_info[:]
        graph.value_info.extend(keep_vi)
    if not any(n.domain == DOMAIN for g in iter_graphs(out.graph) for n in g.node):
        keep_ops = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep_ops)
    props = [p for p in out.metadata_props if p.key != METADATA_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    return out
