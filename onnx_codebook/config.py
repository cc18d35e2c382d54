"""Compression settings: frozen, validated when built, resolved per layer.

A layer's settings come from, in order: an override keyed by its weight or node
name, an override keyed by its op type, the global default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from .cluster import INITS, METHODS
from .errors import ConfigError
from .schema import GRANULARITIES, MAX_BITS, MIN_BITS, SUPPORTED_OPS

FORMATS = ("standard", "fused")
CODEBOOK_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class LayerSettings:
    """How one weight is clustered."""

    bits: int = 4
    granularity: str = "channel"
    group_size: int = 8
    method: str = "kmeans"
    init: str = "auto"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"group size must be a positive integer, got {self.group_size!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "binary" and self.bits != 1:
            raise ConfigError("the binary method stores 1 bit per weight: use bits=1 with it")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")

    def group_size_for(self, channels: int) -> int:
        """Adjacent output channels per codebook row for a weight with ``channels`` channels."""
        if self.granularity == "tensor":
            return max(channels, 1)
        if self.granularity == "channel":
            return 1
        return min(self.group_size, max(channels, 1))

    def describe(self) -> str:
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.bits}b/{gran}" + ("/binary" if self.method == "binary" else "")


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``compress`` needs besides the model."""

    default: LayerSettings = field(default_factory=LayerSettings)
    ops: tuple[str, ...] = SUPPORTED_OPS
    min_elements: int = 4096
    format: str = "standard"
    codebook_dtype: str = "float32"
    overrides: Mapping[str, LayerSettings] = field(default_factory=dict)
    seed: int = 0
    exclude: frozenset[str] = frozenset()  # weight names kept in float
    # Also compress weights the model lists as graph inputs (overridable at run time); the
    # output no longer lists them.  IR version 3 models get this regardless.
    weight_inputs: bool = False

    def __post_init__(self):
        ops = tuple(self.ops)
        unknown = [op for op in ops if op not in SUPPORTED_OPS]
        if unknown or not ops:
            raise ConfigError(
                f"unsupported op(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SUPPORTED_OPS)}"
            )
        object.__setattr__(self, "ops", ops)
        if isinstance(self.min_elements, bool) or not isinstance(self.min_elements, int) or self.min_elements < 0:
            raise ConfigError(f"min-elements must be a non-negative integer, got {self.min_elements!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            raise ConfigError(f"codebook dtype must be one of {', '.join(CODEBOOK_DTYPES)}, got {self.codebook_dtype!r}")
        for key, value in self.overrides.items():
            if not isinstance(value, LayerSettings):
                raise ConfigError(f"override for {key!r} must be LayerSettings, got {type(value).__name__}")
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        object.__setattr__(self, "exclude", frozenset(self.exclude))

    def settings_for(self, weight: str, node_names: tuple[str, ...], op_type: str) -> LayerSettings:
        """Resolve by weight or node name, then op type, then the default."""
        for key in (weight, *node_names, op_type):
            if key in self.overrides:
                return self.overrides[key]
        return self.default

    def with_overrides(self, overrides: Mapping[str, LayerSettings]) -> "CompressConfig":
        return replace(self, overrides={**self.overrides, **overrides})
