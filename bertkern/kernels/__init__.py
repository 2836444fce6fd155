"""Triton kernels (@triton.jit only). Imported lazily by bertkern.ops."""
