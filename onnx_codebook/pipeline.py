"""The compression pass: load -> select -> cluster -> encode -> rewrite -> validate.

Pure in-memory work on ModelProtos; saving is the caller's (see :mod:`io`).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from .cluster import Clustering
from .config import CompressConfig, LayerSettings
from .encode import CODEBOOK_ITEMSIZE, cluster_layer, effective_group_size, footprint, sqnr_db
from .errors import CodebookError, CodebookWarning, NoEligibleLayerError
from .io import tensor_bytes
from .pack import container_bits
from .rewrite import NameScope, add_standard_decode, fold_epilogue, fusible, replace_with_fused, unfused_reason
from .rewrite import fused as fused_rewrite
from .rewrite.common import model_names
from .schema import DOMAIN, DOMAIN_VERSION, METADATA_KEY
from .select import (Layer, Skipped, constants_to_initializers, fold_batch_norms, fold_weight_casts, quantized_note,
                     select_layers, skip_reasons, unlist_ir3_weight_inputs, weight_casts_note)

# Opset that introduced Cast from each index container, and the IR version it needs.
CONTAINER_OPSET = {2: 25, 4: 21, 8: 1}
MAX_IR_VERSION = 13  # newest IR version onnxruntime 1.31 loads
IR_FOR_OPSET = {25: 13, 21: 10}


@dataclass
class LayerResult:
    """What happened to one weight (one row of the per-layer table)."""

    name: str
    op: str
    shape: tuple[int, ...]
    bits: int
    granularity: str
    group_size: int
    groups: int
    codebook_entries: int
    method: str
    format: str
    container_bits: int
    bytes_fp32: int
    bytes_original: int  # the weight as the input model stored it (float16: half of bytes_fp32)
    bytes_stored: int
    index_bytes: int
    codebook_bytes: int
    sqnr_db: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_original / max(self.bytes_stored, 1)


@dataclass
class CompressResult:
    model: onnx.ModelProto
    layers: list[LayerResult]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)

    @property
    def weight_bytes_before(self) -> int:
        return sum(r.bytes_original for r in self.layers)

    @property
    def weight_bytes_after(self) -> int:
        return sum(r.bytes_stored for r in self.layers)

    def summary(self) -> dict:
        before, after = self.weight_bytes_before, self.weight_bytes_after
        return {
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "compression_ratio": before / max(after, 1),
            "layers": [dict(asdict(r), shape=list(r.shape)) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "warnings": list(self.warnings),
        }


ClusterCache = dict  # (weight, bits, group_size, method, init, axis) -> Clustering


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def _raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    converted = version_converter.convert_version(model, target)
    onnx.checker.check_model(converted)
    return converted


def _plan_containers(model: onnx.ModelProto, wanted: int, notes: list[str]) -> tuple[onnx.ModelProto, int]:
    """Raise the opset so that ``wanted``-bit containers can be cast; fall back to wider ones.

    Returns the (possibly converted) model and the narrowest container available.
    """
    for width in (w for w in (2, 4, 8) if w >= wanted):
        need = CONTAINER_OPSET[width]
        current = default_opset(model)
        if current >= need:
            return model, width
        try:
            converted = _raise_opset(model, need)
        except Exception as e:  # the converter raises many kinds of errors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            notes.append(
                f"could not raise the opset from {current} to {need} for UINT{width} indices ({msg[:120]}); "
                f"storing them in wider containers"
            )
            continue
        converted.ir_version = max(model.ir_version, IR_FOR_OPSET.get(need, model.ir_version))
        return converted, width
    return model, 8


def _settings_for(config: CompressConfig, layer: Layer) -> LayerSettings:
    return config.settings_for(layer.weight, layer.node_names, layer.op_type)


@dataclass
class LayerPlan:
    """How one layer will be encoded, decided before clustering."""

    settings: LayerSettings
    fmt: str  # "fused" when every consumer has a fused kernel, else "standard"
    axis: int
    channels: int
    container: int
    group_size: int  # 0: leave the layer alone (see note)
    note: str
    fuse_nodes: list


def plan_layer(layer: Layer, config: CompressConfig, available: int = 2,
               settings: LayerSettings | None = None) -> LayerPlan:
    """Settings, format, container and (possibly coarsened) group size of ``layer``."""
    settings = settings or _settings_for(config, layer)
    consumers = list(layer.constant.outputs)
    fuse_nodes = [n for n in layer.consumers if config.format == "fused" and fusible(n, layer.constant)]
    fmt = "fused" if fuse_nodes and len(fuse_nodes) == len(consumers) else "standard"
    axis = layer.axis if layer.axis >= 0 else 0
    channels = layer.shape[axis]
    if layer.axis < 0 and settings.granularity != "tensor":
        settings = LayerSettings(settings.bits, "tensor", settings.group_size, settings.method, settings.init)
    container = max(container_bits(settings.bits), available)
    itemsize = CODEBOOK_ITEMSIZE[config.codebook_dtype]
    # The group size is decided on exact-bit sizes, then coarsened further where the
    # standard format's wider containers and channel offsets need it, in both formats:
    # a layer is clustered the same way whichever format is asked for, so that the two
    # give the same outputs.
    group_size, note = effective_group_size(layer.size, channels, settings, fmt="fused", codebook_itemsize=itemsize,
                                            weight_itemsize=layer.itemsize)
    if group_size:
        # (a fused layer is coarsened for the containers a standard model would get)
        widths = container if fmt == "standard" else container_bits(settings.bits)

        def total(gsz):
            return footprint(layer.size, channels, settings.bits, gsz, 1 << settings.bits,
                             codebook_itemsize=itemsize, container=widths).total
        coarsened = group_size
        while total(coarsened) >= layer.nbytes and coarsened < channels:
            coarsened = min(coarsened * 2, channels)
        if total(coarsened) >= layer.nbytes:
            # the standard format leaves the layer alone; the fused one keeps its own groups
            if fmt == "standard":
                group_size = 0
                note = f"{settings.bits}-bit indices in {container}-bit containers would not make it smaller"
        elif coarsened != group_size:
            group_size = coarsened
            note = f"groups of {coarsened} channels (a finer codebook would cost more than it saves)"
    return LayerPlan(settings, fmt, axis, channels, container, group_size, note, fuse_nodes)


def layer_clustering(name: str, weight: np.ndarray, plan: LayerPlan, seed: int, cache: ClusterCache | None,
                     importance: np.ndarray | None = None) -> Clustering:
    """Cluster one weight as ``plan`` says, through ``cache`` when given."""
    s = plan.settings
    key = (name, s.bits, plan.group_size, s.method, s.init, plan.axis, seed, importance is not None)
    if cache is not None and key in cache:
        return cache[key]
    try:
        clustering = cluster_layer(weight, s, plan.axis, plan.group_size, seed=seed, importance=importance)
    except CodebookError as e:
        raise type(e)(f"{name}: {e}") from e
    if cache is not None:
        cache[key] = clustering
    return clustering


def compress_model(
    model: onnx.ModelProto,
    config: CompressConfig,
    *,
    progress: Callable[[str], None] | None = None,
    cache: ClusterCache | None = None,
    importance: dict[str, np.ndarray] | None = None,
    validate: bool = True,
) -> CompressResult:
    """Compress every eligible weight of ``model`` as ``config`` says.

    ``progress`` is called once per layer with its name; ``cache`` reuses
    clusterings across calls (the search does many); ``importance`` maps weight
    names to per-weight clustering importance (activation-aware clustering).
    The input model is not modified.
    """
    notes: list[str] = []
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    ir3 = proto.ir_version < 4
    unlisted = unlist_ir3_weight_inputs(proto, any_version=config.weight_inputs)
    if unlisted and ir3:
        notes.append(f"IR version 3 model: its {unlisted} initializers, listed as graph inputs as that version "
                     "requires, are treated as weights; the output (IR 4+) no longer lists them as inputs")
    elif unlisted:
        notes.append(f"{unlisted} initializers listed as graph inputs are treated as constants (--weight-inputs); the "
                     "output no longer lists them as inputs")
    constants_to_initializers(proto, config.ops)
    cast = fold_weight_casts(proto, config.ops)
    if cast:
        notes.append(weight_casts_note(len(cast)))
    fold_batch_norms(proto)
    known_value_info = {v.name for v in proto.graph.value_info}
    if config.format == "fused" and fused_rewrite.FOLD_EPILOGUE and tensor_bytes(proto) < 1_800_000_000:
        # Shapes tell the epilogue folding which residual Adds are safe to fuse.
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # shape inference is an optimisation aid only
            pass
    graph = gs.import_onnx(proto)
    layers, skipped = select_layers(graph, config.ops, config.min_elements, _input_names(proto), cast)
    if not layers:
        raise NoEligibleLayerError(
            f"no eligible {'/'.join(config.ops)} weight with >= {config.min_elements} elements"
            + skip_reasons(skipped)
            + (quantized_note(proto) or "; try a lower --min-elements or other --ops")
        )

    # Containers: decided before rewriting, since raising the opset re-imports the graph.
    needs_standard = [
        layer for layer in layers
        if config.format == "standard" or not all(fusible(n, layer.constant) for n in layer.constant.outputs)
    ]
    if config.format == "fused" and needs_standard:
        reasons = []
        for layer in needs_standard:
            why = next(r for n in layer.constant.outputs if (r := unfused_reason(n, layer.constant)))
            reasons.append(f"{layer.weight} ({why})")
        notes.append(f"{len(needs_standard)} of {len(layers)} layers keep the standard decode in the fused model "
                     f"(no fused kernel): " + ", ".join(reasons[:3]) + (", ..." if len(reasons) > 3 else ""))
    narrowest = min((container_bits(_settings_for(config, l).bits) for l in needs_standard), default=8)
    if narrowest < 8:
        converted, available = _plan_containers(proto, narrowest, notes)
        if converted is not proto:
            proto = converted
            graph = gs.import_onnx(proto)
            layers, skipped = select_layers(graph, config.ops, config.min_elements, _input_names(proto), cast)
    else:
        available = 8

    names = NameScope(model_names(graph))
    cb_dtype = np.dtype(config.codebook_dtype)
    results: list[LayerResult] = []
    shared: dict = {}
    metadata: dict[str, dict] = {}
    for layer in layers:
        if progress:
            progress(layer.weight)
        if layer.weight in config.exclude:
            skipped.append(Skipped(layer.weight, layer.op_type, "kept in float (excluded)"))
            continue
        plan = plan_layer(layer, config, available)
        if not plan.group_size:
            skipped.append(Skipped(layer.weight, layer.op_type, plan.note))
            continue
        settings, axis, channels, container, group_size, note = (
            plan.settings, plan.axis, plan.channels, plan.container, plan.group_size, plan.note)
        fuse_nodes = plan.fuse_nodes
        all_fused = plan.fmt == "fused"
        weight = np.asarray(layer.constant.values)
        itemsize = CODEBOOK_ITEMSIZE[config.codebook_dtype]
        clustering = layer_clustering(layer.weight, weight, plan, config.seed, cache,
                                      None if importance is None else importance.get(layer.weight))
        stored = 0
        if fuse_nodes:
            for node in fuse_nodes:
                fused = replace_with_fused(layer.graph, node, layer.constant, clustering, settings.bits, names, shared)
                if fused_rewrite.FOLD_EPILOGUE:
                    fold_epilogue(layer.graph, fused)
            fp = footprint(layer.size, channels, settings.bits, group_size, clustering.k, fmt="fused")
            stored += fp.total
        if not all_fused:
            decoded = add_standard_decode(layer.graph, layer.constant, clustering, container, cb_dtype, names)
            if not layer.constant.outputs:
                decoded.name = layer.weight
            fp_std = footprint(layer.size, channels, settings.bits, group_size, clustering.k,
                               codebook_itemsize=itemsize, container=container)
            stored += fp_std.total
            fp = fp_std if not fuse_nodes else fp
        granularity = ("tensor" if clustering.groups == 1 else "channel" if group_size == 1 else "group")
        results.append(LayerResult(
            name=layer.weight, op=layer.op_type, shape=layer.shape, bits=settings.bits,
            granularity=granularity, group_size=group_size, groups=clustering.groups,
            codebook_entries=clustering.groups * clustering.k, method=settings.method,
            format="fused" if all_fused else ("fused+standard" if fuse_nodes else "standard"),
            container_bits=settings.bits if all_fused else container,
            bytes_fp32=layer.size * 4, bytes_original=layer.nbytes, bytes_stored=stored, index_bytes=fp.index_bytes,
            codebook_bytes=fp.codebook_bytes, sqnr_db=sqnr_db(weight, clustering.decode()), note=note,
        ))
        metadata[layer.weight] = {"bits": settings.bits, "granularity": granularity, "group_size": group_size,
                                  "method": settings.method, "original_itemsize": layer.itemsize}
    if not results:
        raise NoEligibleLayerError("no weight would get smaller with these settings; try more bits' savings "
                                   "(fewer --bits) or a coarser --granularity")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export(graph, proto, uses_domain=bool(shared), metadata=metadata)
    if len(out.graph.value_info) > len(known_value_info):
        kept = [v for v in out.graph.value_info if v.name in known_value_info]
        del out.graph.value_info[:]
        out.graph.value_info.extend(kept)
    if validate:
        validate_model(out, needs_ops=bool(shared), notes=notes)
    for n in notes:
        warnings.warn(n, CodebookWarning, stacklevel=2)
    return CompressResult(out, results, skipped, notes)


def _input_names(proto: onnx.ModelProto) -> set[str]:
    return {i.name for i in proto.graph.input}


def _export(graph: gs.Graph, proto: onnx.ModelProto, *, uses_domain: bool, metadata: dict) -> onnx.ModelProto:
    exported = gs.export_onnx(graph, do_type_check=False)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.CopyFrom(exported.graph)
    # graphsurgeon drops graph inputs that have an initializer (overridable weights): put them back.
    have = {i.name for i in out.graph.input}
    inits = {t.name for t in out.graph.initializer}
    missing = [i for i in proto.graph.input if i.name not in have and i.name in inits]
    if missing:
        order = {i.name: n for n, i in enumerate(proto.graph.input)}
        merged = sorted([*out.graph.input, *missing], key=lambda i: order.get(i.name, len(order)))
        del out.graph.input[:]
        out.graph.input.extend(merged)
    opsets = {op.domain: op.version for op in proto.opset_import}
    if uses_domain:
        opsets[DOMAIN] = DOMAIN_VERSION
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    out.ir_version = min(max(proto.ir_version, 3), MAX_IR_VERSION)
    kept = [p for p in out.metadata_props if p.key != METADATA_KEY]
    previous = {}
    for p in out.metadata_props:
        if p.key == METADATA_KEY:
            previous = json.loads(p.value)
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps({**previous, **metadata}, sort_keys=True))
    return out


def _declared_shape_contradiction(model: onnx.ModelProto, error: str) -> str | None:
    """A note when the checker's failure is ONNX shape inference contradicting a shape the
    source model declares for the output of one of its own nodes (an exporter's wrong
    output shape, which shape inference could not reach before the rewrite replaced a
    constant weight), else None.  The structural check must still pass; onnxruntime
    loads the model next."""
    m = re.search(r"node name: ([^)]*)\)", error)
    if "Inferred shape and existing shape differ" not in error or m is None:
        return None
    node = next((n for n in model.graph.node if n.name == m.group(1)), None)
    # the rewrite adds Cast / Gather / Add (standard) and ops of its own domain
    if node is None or node.domain == DOMAIN or node.op_type in ("Cast", "Gather", "Add"):
        return None
    try:
        onnx.checker.check_model(model)
    except Exception:
        return None
    what = error.split("[ShapeInferenceError]")[-1].strip()[:160]
    return (f"ONNX shape inference contradicts the shape the source model declares after node {node.name} "
            f"({what}); onnxruntime runs the model")


def validate_model(model: onnx.ModelProto, *, needs_ops: bool, notes: list[str]) -> None:
    """The checker (full shape inference below 2 GB) and an onnxruntime session."""
    large = tensor_bytes(model) > 1_800_000_000
    try:
        if not large:
            onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        contradicted = _declared_shape_contradiction(model, str(e))
        if contradicted is None:
            raise CodebookError(f"internal error: the compressed model fails the ONNX checker ({str(e)[:300]})") from e
        notes.append(contradicted)
    if large:
        notes.append("model over 2 GB: not checked in memory; check the saved file with onnx.checker")
        return
    from . import ops

    if needs_ops:
        ok, why = ops.library_status()
        if not ok:
            notes.append(f"fused model not run: {why}")
            return
    try:
        # (quiet: a warning of onnxruntime's about the model's own declared shapes, such
        # as "Error merging shape info", would reach the user's terminal raw)
        ops.session(model, quiet=True)
    except CodebookError:
        raise
    except Exception as e:
        raise CodebookError(f"internal error: onnxruntime rejects the compressed model ({str(e)[:300]})") from e
