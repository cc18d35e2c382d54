"""Exceptions raised by onnx-codebook.  The library raises only these."""


class CodebookError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ModelLoadError(CodebookError):
    """The model file is missing, unreadable or not valid ONNX."""


class ConfigError(CodebookError):
    """An option or setting is out of range or inconsistent."""


class NoEligibleLayerError(CodebookError):
    """No weight in the model matches the selection."""


class DataError(CodebookError):
    """Evaluation data is missing, malformed or does not fit the model."""


class OutputError(CodebookError):
    """The output cannot be written where asked."""


class RuntimeLibraryError(CodebookError):
    """The custom-op library is missing or failed to load."""


class CodebookWarning(UserWarning):
    """Something the user should know about; the result is still valid."""
