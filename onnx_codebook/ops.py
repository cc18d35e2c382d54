"""The custom-op library that runs the fused format, and onnxruntime sessions using it.

The library (``libonnx_codebook_ops.so``) is built from ``custom_ops/`` during
``pip install`` and installed next to this module.  ``ONNX_CODEBOOK_OPS_LIBRARY``
points at another build instead.  When the build was skipped (no compiler, no
onnxruntime headers), ``ops_build_status.txt`` next to this module says why.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import RuntimeLibraryError
from .schema import DOMAIN

ENV_LIBRARY = "ONNX_CODEBOOK_OPS_LIBRARY"
LIBRARY_NAME = "libonnx_codebook_ops.so"
_STATUS_NAME = "ops_build_status.txt"


def library_path() -> Path:
    """Where the custom-op library is expected (it may not exist)."""
    override = os.environ.get(ENV_LIBRARY)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / LIBRARY_NAME


def library_status() -> tuple[bool, str]:
    """(usable, explanation) for the custom-op library; loads it once to check."""
    path = library_path()
    if not path.is_file():
        if os.environ.get(ENV_LIBRARY):
            return False, f"{ENV_LIBRARY}={path} does not exist"
        status = Path(__file__).resolve().parent / _STATUS_NAME
        why = status.read_text().strip() if status.is_file() else "no build record (source checkout?)"
        return False, f"custom-op library not built ({why}); reinstall with a C++17 compiler"
    try:
        import onnxruntime as ort

        ort.SessionOptions().register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises plain RuntimeError/Fail types
        return False, f"custom-op library {path} failed to load: {str(e).splitlines()[0]}"
    return True, f"custom-op library {path} loads"


def session_options(model_needs_ops: bool, threads: int | None = None):
    """SessionOptions with the custom-op library registered when the model needs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    if model_needs_ops:
        path = library_path()
        if not path.is_file():
            raise RuntimeLibraryError(library_status()[1])
        try:
            options.register_custom_ops_library(str(path))
        except Exception as e:
            raise RuntimeLibraryError(
                f"custom-op library {path} failed to load: {str(e).splitlines()[0]}"
            ) from e
    return options


def uses_ops(model) -> bool:
    """True when any node of the model (or a subgraph) is in the onnx_codebook domain."""

    def walk(graph) -> bool:
        for node in graph.node:
            if node.domain == DOMAIN:
                return True
            for attr in node.attribute:
                subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
                if any(walk(g) for g in subgraphs):
                    return True
        return False

    return walk(model.graph)


def session(model, threads: int | None = None, providers=("CPUExecutionProvider",), quiet: bool = False):
    """An onnxruntime InferenceSession for a ModelProto or a path, with the ops if needed
    (``quiet``: onnxruntime logs errors only, not its warnings)."""
    import onnx
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        proto = onnx.load(str(model), load_external_data=False)
        source = str(model)
    else:
        proto = model
        source = model.SerializeToString()
    options = session_options(uses_ops(proto), threads)
    if quiet:
        options.log_severity_level = 3
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))
