"""Standard format: indices as UINT2/UINT4/UINT8 initializers, decoded by Cast + Gather."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..cluster import Clustering
from ..encode import indices_tensor, offsets_array
from ..schema import indices_names
from .common import NameScope, array_constant, lazy_constant, replace_uses


def add_standard_decode(
    graph: gs.Graph,
    weight: gs.Constant,
    clustering: Clustering,
    container: int,
    codebook_dtype: np.dtype,
    names: NameScope,
) -> gs.Variable:
    """Insert ``Cast -> [Add offsets] -> Gather [-> Cast]`` producing ``weight``'s values.

    Every consumer of ``weight`` is re-pointed at the decoded tensor, which takes
    over the weight's name once the float initializer is gone.
    """
    shape = tuple(int(d) for d in weight.shape)
    wdtype = np.dtype(weight.dtype)
    cb_name, idx_name, off_name = (names.fresh(n) for n in indices_names(weight.name))
    codebook = array_constant(cb_name, clustering.codebook.reshape(-1).astype(codebook_dtype))
    indices = lazy_constant(indices_tensor(idx_name, clustering.indices, container))
    base = weight.name
    as_int = gs.Variable(names.fresh(f"{base}.indices_int32"), dtype=np.int32, shape=shape)
    nodes = [gs.Node("Cast", names.fresh(f"{base}.decode.cast"), {"to": onnx.TensorProto.INT32}, [indices], [as_int])]
    flat = as_int
    if clustering.groups > 1:
        offsets = array_constant(
            off_name, offsets_array(shape[clustering.axis], clustering.group_size, clustering.k, clustering.axis, len(shape))
        )
        flat = gs.Variable(names.fresh(f"{base}.flat_indices"), dtype=np.int32, shape=shape)
        nodes.append(gs.Node("Add", names.fresh(f"{base}.decode.offset"), {}, [as_int, offsets], [flat]))
    # Decoded tensor: temporary name until the float constant is removed.
    decoded = gs.Variable(names.fresh(f"{base}.decoded"), dtype=np.dtype(codebook_dtype), shape=shape)
    nodes.append(gs.Node("Gather", names.fresh(f"{base}.decode.gather"), {"axis": 0}, [codebook, flat], [decoded]))
    if np.dtype(codebook_dtype) != wdtype:
        widened = gs.Variable(names.fresh(f"{base}.decoded_{wdtype.name}"), dtype=wdtype, shape=shape)
        to = onnx.helper.np_dtype_to_tensor_dtype(wdtype)
        nodes.append(gs.Node("Cast", names.fresh(f"{base}.decode.widen"), {"to": to}, [decoded], [widened]))
        decoded = widened
    graph.nodes.extend(nodes)
    replace_uses(weight, decoded)
    return decoded


def rename_decoded(decoded: gs.Variable, weight_name: str) -> None:
    """Give the decoded tensor the original weight's name (after the constant is gone)."""
    decoded.name = weight_name
