"""Graph passes that swap float weights for codebook + indices.

``standard`` decodes in the graph with Cast + Gather (any ONNX runtime);
``fused`` replaces Conv / Gemm / MatMul by ops of the ``onnx_codebook`` domain.
"""

from .common import NameScope, lazy_constant
from .fused import fold_epilogue, fusible, replace_with_fused, unfused_reason
from .standard import add_standard_decode

__all__ = ["NameScope", "lazy_constant", "add_standard_decode", "fold_epilogue", "fusible", "replace_with_fused", "unfused_reason"]
