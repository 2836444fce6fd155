"""Exceptions for bad input that are also the type torch raises for the same input.

bertkern validates arguments before any kernel runs and raises ``ValueError`` / ``TypeError``
with a message naming the argument. Where torch's own module raises something else for the
same mistake (``nn.MultiheadAttention`` asserts shapes, ``nn.TransformerEncoderLayer`` raises
``RuntimeError`` for an unknown activation), the exception is an instance of both, so a
script's existing ``except AssertionError`` / ``except RuntimeError`` keeps working.

The C++ operators can only raise ``RuntimeError`` (the LibTorch stable ABI carries nothing but
``std::exception`` across, see csrc/torch_api.h): their checks start the message with the Python
type, ``"ValueError: ..."``. bertkern calls its operators through :func:`kernel_call`, which
re-raises such an error as that type (also a ``RuntimeError``). A direct
``torch.ops.bertkern`` call gets the ``RuntimeError``, its message naming the type.
"""
from __future__ import annotations

__all__ = [
    "ValueAndAssertionError",
    "ValueAndRuntimeError",
    "TypeAndAssertionError",
    "TypeAndRuntimeError",
    "TypeAndAttributeError",
    "IndexAndRuntimeError",
    "kernel_call",
]


class ValueAndAssertionError(ValueError, AssertionError):
    """A bad value (shape, size) where torch raises AssertionError."""


class ValueAndRuntimeError(ValueError, RuntimeError):
    """A bad value where torch raises RuntimeError."""


class TypeAndAssertionError(TypeError, AssertionError):
    """A bad type or dtype where torch raises AssertionError."""


class TypeAndRuntimeError(TypeError, RuntimeError):
    """A bad type or dtype where torch raises RuntimeError."""


class TypeAndAttributeError(TypeError, AttributeError):
    """A module of the wrong kind where torch fails on a missing attribute."""


class IndexAndRuntimeError(IndexError, RuntimeError):
    """An index out of range, found by a C++ operator."""


# Message prefix a C++ check writes (csrc/torch_api.h, BERTKERN_CHECK_VALUE / _TYPE / _INDEX)
# -> the exception bertkern raises for it.
_KERNEL_ERRORS = {
    "ValueError: ": ValueAndRuntimeError,
    "TypeError: ": TypeAndRuntimeError,
    "IndexError: ": IndexAndRuntimeError,
}


def kernel_call(op, *args):
    """``op(*args)`` for a ``torch.ops.bertkern`` operator, its argument errors raised as the
    Python type the C++ check names (``ValueError``, ``TypeError``, ``IndexError``; each also a
    ``RuntimeError``). Other errors pass through unchanged."""
    try:
        return op(*args)
    except RuntimeError as e:
        text = str(e)
        for prefix, error in _KERNEL_ERRORS.items():
            if text.startswith(prefix):
                raise error(text[len(prefix):]) from None
        raise
