"""Names and layouts shared by the Python passes and the C++ kernels.

Everything a fused model means is defined here; ``custom_ops/src`` mirrors it.

Codebook layout (both formats)
------------------------------
A compressed weight ``W`` has a *channel axis* (its output-channel axis, see
:func:`channel_axis`).  Adjacent output channels are split into groups of
``group_size`` channels (the last group may be shorter); every group has its own
row of the codebook::

    codebook : float [G, k]      G = ceil(C / group_size), k <= 2**bits
    indices  : uint  W.shape     every index < k
    W[..., c, ...] = codebook[c // group_size, indices[..., c, ...]]

``granularity`` is a name for common ``group_size`` values: ``tensor`` (one
group, ``group_size = C``), ``channel`` (``group_size = 1``) or ``group``.

Standard format
---------------
Indices are an initializer of ONNX type UINT2 (bits <= 2), UINT4 (bits 3-4) or
UINT8 (bits 5-8) with the weight's shape; the graph decodes them with
``Cast(to=INT32) [-> Add(offsets)] -> Gather(codebook_flat, axis=0)``, where
``codebook_flat`` is ``codebook`` flattened to ``[G*k]`` and ``offsets`` is an
INT32 initializer holding ``(c // group_size) * k`` along the channel axis (size 1
on the other axes).  The Add is omitted when G == 1.

Fused format (domain ``onnx_codebook``, version 1)
--------------------------------------------------
Inputs ``indices`` are a 1-D UINT8 tensor holding the weight's indices in
row-major order of ``weight_shape``, packed at exactly ``bits`` bits each:
index ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the little-endian bit stream
(bit ``b`` of the stream is bit ``b % 8``, LSB first, of byte ``b // 8``).
Length ``ceil(numel * bits / 8)``; unused high bits of the last byte are 0.
``codebook`` is float32 ``[G, k]`` with ``1 <= k <= 2**bits``.

Common attributes: ``bits`` (int, 1..8), ``weight_shape`` (ints), ``group_size``
(int >= 1, adjacent output channels per codebook row).

* ``CodebookConv(X, indices, codebook[, B]) -> Y``: ONNX ``Conv`` with
  ``W`` of shape ``weight_shape = [M, C/group, k1, ...]``; channel axis 0.  All
  Conv attributes (auto_pad, dilations, group, kernel_shape, pads, strides).
* ``CodebookGemm(A, indices, codebook[, C]) -> Y``: ONNX ``Gemm`` with ``B`` of
  shape ``weight_shape`` (``[N, K]`` if transB else ``[K, N]``); channel axis is
  the N axis (0 if transB else 1).  Attributes alpha, beta, transA, transB.
* ``CodebookMatMul(A, indices, codebook) -> Y``: ONNX ``MatMul`` with a constant
  2-D right-hand side ``B`` of shape ``weight_shape = [K, N]``; channel axis 1; A
  may have any rank >= 2 (batched), or rank 1.
* ``CodebookConvTranspose(X, indices, codebook[, B]) -> Y``: ONNX ``ConvTranspose``
  (1-D or 2-D) with ``W`` of shape ``weight_shape = [C, M/group, k1, ...]``; channel
  axis 1 (the codebook rows follow the output channels of one group, shared by all
  groups, as in the standard format).  Attributes dilations, group, kernel_shape,
  output_padding, pads, strides; no auto_pad or output_shape (the rewrite keeps
  such nodes in the standard format).

Fused epilogue (optional, all four ops): ``activation`` (string, default "")
is one of ``ACTIVATIONS``, as the ONNX op of that name: "Clip" with the float
bounds ``activation_min`` / ``activation_max``; "LeakyRelu" with
``activation_alpha`` (default 0.01); "HardSigmoid" with ``activation_alpha`` /
``activation_beta`` (0.2 / 0.5); "HardSwish" is ``y * HardSigmoid(y)`` with
``activation_alpha`` / ``activation_beta`` (1/6 / 0.5, ONNX HardSwish); "Silu" is
``y * Sigmoid(y)`` (SiLU / Swish).  ``CodebookConv`` also takes an optional 5th
input ``Z`` of the output's shape (a residual), so that
``Y = activation(Conv(X, W) + B + Z)``.  The rewrite folds a following
``Add`` (residual) and activation (or ``Mul(y, Sigmoid(y))`` /
``Mul(y, HardSigmoid(y))``) into the op when nothing else reads the
intermediate tensors.
"""

from __future__ import annotations

DOMAIN = "onnx_codebook"
DOMAIN_VERSION = 1

CODEBOOK_CONV = "CodebookConv"
CODEBOOK_GEMM = "CodebookGemm"
CODEBOOK_MATMUL = "CodebookMatMul"
CODEBOOK_CONV_TRANSPOSE = "CodebookConvTranspose"
FUSED_OPS = (CODEBOOK_CONV, CODEBOOK_GEMM, CODEBOOK_MATMUL, CODEBOOK_CONV_TRANSPOSE)
FUSED_OF = {"Conv": CODEBOOK_CONV, "Gemm": CODEBOOK_GEMM, "MatMul": CODEBOOK_MATMUL,
            "ConvTranspose": CODEBOOK_CONV_TRANSPOSE}
PLAIN_OF = {v: k for k, v in FUSED_OF.items()}

SUPPORTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Position of the weight among each op's inputs.
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}

GRANULARITIES = ("tensor", "channel", "group")
MIN_BITS, MAX_BITS = 1, 8

ACTIVATIONS = ("", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Silu")

# Metadata key under which compress records per-layer settings (JSON).
METADATA_KEY = "onnx_codebook.layers"


def channel_axis(op_type: str, attrs: dict, rank: int) -> int:
    """Output-channel axis of the weight of an ``op_type`` node."""
    if op_type in ("Conv", CODEBOOK_CONV):
        return 0
    if op_type in ("ConvTranspose", CODEBOOK_CONV_TRANSPOSE):
        return 1 if rank > 1 else 0
    if op_type in ("Gemm", CODEBOOK_GEMM):
        return 0 if int(attrs.get("transB", 0)) else 1
    if op_type in ("MatMul", CODEBOOK_MATMUL):
        return rank - 1
    raise ValueError(f"no channel axis defined for {op_type}")


def indices_names(weight: str) -> tuple[str, str, str]:
    """Names of the codebook, indices and offsets tensors that replace ``weight``."""
    return f"{weight}.codebook", f"{weight}.indices", f"{weight}.offsets"
