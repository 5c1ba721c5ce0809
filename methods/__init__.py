"""Early-exit methods: the protocol, the registry and one module per method."""

from eebench.methods.protocol import (
    Batch,
    EarlyExitMethod,
    ExitOutput,
    Knob,
    PromptBatch,
    ProtocolError,
    Trainer,
    check_exit_output,
    check_method_class,
)
from eebench.methods.registry import (
    DuplicateMethodError,
    UnknownMethodError,
    build_method,
    get_method_class,
    list_methods,
    method_names,
)

__all__ = [
    "Batch", "EarlyExitMethod", "ExitOutput", "Knob", "PromptBatch", "ProtocolError", "Trainer", "check_exit_output",
    "check_method_class", "DuplicateMethodError", "UnknownMethodError", "build_method", "get_method_class",
    "list_methods", "method_names",
]
