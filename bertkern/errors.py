"""Exceptions for bad input that are also the type torch raises for the same input.

bertkern validates arguments before any kernel runs and raises ``ValueError`` / ``TypeError``
with a message naming the argument. Where torch's own module raises something else for the
same mistake (``nn.MultiheadAttention`` asserts shapes, ``nn.TransformerEncoderLayer`` raises
``RuntimeError`` for an unknown activation), the exception is an instance of both, so a
script's existing ``except AssertionError`` / ``except RuntimeError`` keeps working.
"""
from __future__ import annotations

__all__ = [
    "ValueAndAssertionError",
    "ValueAndRuntimeError",
    "TypeAndAssertionError",
    "TypeAndRuntimeError",
    "TypeAndAttributeError",
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
