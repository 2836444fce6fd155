"""Key-padding masking: the :class:`Packing` of a padded batch (pack / unpack), unpad / pad,
mask -> indices / cu_seqlens, and mask-convention helpers.

Mask convention (torch's): ``key_padding_mask[b, s] = True`` means position s of sequence b
is padding. HF's ``attention_mask`` (1 = keep) is the opposite: convert it with
:func:`key_padding_mask_from_attention_mask`.

Kernels: ``torch.ops.bertkern.mask_to_indices / gather_rows / scatter_rows`` (C++ on CPU in
csrc/cpu/padding.cpp, CUDA C++ in csrc/cuda/padding.{cuh,cu}); the rest of bertkern reaches
them through :class:`Packing` only.
"""
from __future__ import annotations

import dataclasses

import torch

from bertkern.errors import kernel_call


def _check_mask(x, key_padding_mask):
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}; "
            "for HF's attention_mask (1 = keep) use key_padding_mask_from_attention_mask()"
        )
    if key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must have shape (B, S), got {tuple(key_padding_mask.shape)}")
    if x is not None:
        if x.dim() < 2 or tuple(x.shape[:2]) != tuple(key_padding_mask.shape):
            raise ValueError(
                f"unpad: x has shape {tuple(x.shape)} but key_padding_mask has shape "
                f"{tuple(key_padding_mask.shape)}; expected x of shape (B, S, *features)"
            )
        if x.device != key_padding_mask.device:
            raise ValueError(f"unpad: key_padding_mask is on {key_padding_mask.device} but x is on {x.device}")


def _check_indices(indices, x, op, x_name):
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be an int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
    if indices.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D (T,), got shape {tuple(indices.shape)}")
    if indices.device != x.device:
        raise ValueError(f"{op}: indices is on {indices.device} but {x_name} is on {x.device}")


def _unpack(x_packed, indices, padded_shape):
    """(T, *F) -> (*padded_shape, *F), scattered by ``indices`` into zeros (None: a reshape). Not
    an autograd view (as torch's matmul output): FSDP2 hooks a module's outputs, and an in-place
    op on a returned view would drop the hooks."""
    if indices is not None:
        x_packed = kernel_call(torch.ops.bertkern.scatter_rows, x_packed, indices,
                               padded_shape[0] * padded_shape[1])
    return torch.ops.aten._unsafe_view(x_packed, (*padded_shape, *x_packed.shape[1:]))


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch are: built once per batch (:meth:`from_mask`;
    :meth:`full` for no padding; :meth:`from_cu_seqlens` for tokens packed already;
    :meth:`from_position_ids` for sequences packed into rows), then
    ``pack`` every padded tensor of the batch (activations, ids, q / k / v) and ``unpack`` each
    packed result. ``batch_first=False``: padded tensors are torch's seq-first (S, B, *F), the
    packed order is the same and nothing is transposed.

    indices (T,) int64: each real token's row in a padded tensor viewed as (B * S, *F), in
    packed order (None: no padding, batch-first; pack / unpack are reshapes). cu_seqlens
    (B + 1,) int32 from 0; max_seqlen an int (under torch.compile / export a SymInt, and T
    data-dependent, as :func:`mask_to_indices` gives them; on meta T = B * S).
    """

    indices: torch.Tensor | None
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int
    batch_first: bool = True

    @classmethod
    def from_mask(cls, key_padding_mask: torch.Tensor, batch_first: bool = True) -> "Packing":
        """The packing of a batch with ``key_padding_mask`` (B, S) bool, True = padding."""
        _check_mask(None, key_padding_mask)
        indices, cu_seqlens, max_seqlen = kernel_call(torch.ops.bertkern.mask_to_indices, key_padding_mask)
        batch, seqlen = key_padding_mask.shape
        if not batch_first:  # token (b, s) is row s * B + b of an (S, B, *F) tensor viewed as (S * B, *F)
            indices = (indices % seqlen) * batch + torch.div(indices, seqlen, rounding_mode="floor")
        return cls(indices, cu_seqlens, max_seqlen, batch, seqlen, batch_first)

    @classmethod
    def full(cls, batch: int, seqlen: int, device=None, batch_first: bool = True) -> "Packing":
        """No padding: B sequences of length S (batch-first: no gather, no scatter)."""
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
        indices = None
        if not batch_first:
            indices = torch.arange(batch * seqlen, device=device).view(seqlen, batch).t().reshape(-1)
        return cls(indices, cu_seqlens, seqlen, batch, seqlen, batch_first)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "Packing | None":
        """Sequences packed into the rows of a batch with no padding, told apart by their
        ``position_ids`` (B, S) as transformers (>= 5.25) reads them when no attention mask is
        given: a position that is not the previous one + 1 starts a new sequence. Every token is
        real (pack / unpack are reshapes); ``cu_seqlens`` has one entry per sequence + 1, so
        attention stays within each sequence. None when every row holds one sequence."""
        batch, seqlen = position_ids.shape
        starts = torch.ones(batch, seqlen, dtype=torch.bool, device=position_ids.device)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        if seqlen == 0 or bool(starts.sum() == batch):
            return None
        begin = torch.nonzero(starts.reshape(-1)).reshape(-1)
        cu_seqlens = torch.cat([begin, begin.new_full((1,), batch * seqlen)]).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(None, cu_seqlens, max_seqlen, batch, seqlen, True)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int, total: int,
                        batch_first: bool = True) -> "Packing":
        """The padded batch (B, max_seqlen) of ``total`` packed tokens laid out as ``cu_seqlens``
        (B + 1,) int32 says; pass ``total = x.shape[0]`` so shapes stay tied under torch.compile."""
        device = cu_seqlens.device
        batch = cu_seqlens.shape[0] - 1
        # Token t belongs to sequence b with cu[b] <= t < cu[b + 1], at position t - cu[b].
        token = torch.arange(total, device=device, dtype=torch.int32)
        seq = torch.searchsorted(cu_seqlens[1:].contiguous(), token, right=True)
        pos = (token - cu_seqlens[seq]).to(torch.int64)
        indices = seq * max_seqlen + pos if batch_first else pos * batch + seq
        return cls(indices, cu_seqlens, max_seqlen, batch, max_seqlen, batch_first)

    @property
    def padded_shape(self) -> tuple:
        """The two leading dims of a padded tensor: (B, S), or (S, B) seq-first."""
        return (self.batch, self.seqlen) if self.batch_first else (self.seqlen, self.batch)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """Padded ``x`` (*padded_shape, *F), any dtype -> (T, *F), the real tokens in packed
        order. Differentiable (the backward scatters into zeros)."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape[:2]) != self.padded_shape:
            raise ValueError(f"Packing.pack: x has shape {tuple(getattr(x, 'shape', ()))}, expected "
                             f"{self.padded_shape} + features ({'(B, S' if self.batch_first else '(S, B'}, ...))")
        rows = x.reshape(self.batch * self.seqlen, *x.shape[2:])
        if self.indices is None:
            return rows
        return kernel_call(torch.ops.bertkern.gather_rows, rows, self.indices)

    def unpack(self, x_packed: torch.Tensor) -> torch.Tensor:
        """(T, *F) -> (*padded_shape, *F), zeros at padded positions. Differentiable (the
        backward gathers)."""
        return _unpack(x_packed, self.indices, self.padded_shape)

    def key_padding_mask(self) -> torch.Tensor:
        """(B, S) bool, True = padding, of the left-aligned batch ``cu_seqlens`` describes
        (what :meth:`unpack` fills, for :meth:`from_cu_seqlens` and :meth:`full`)."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return torch.arange(self.seqlen, device=self.cu_seqlens.device).unsqueeze(0) >= lengths.unsqueeze(1)

    def to(self, device) -> "Packing":
        """The same packing with its tensors on ``device``."""
        indices = None if self.indices is None else self.indices.to(device)
        return dataclasses.replace(self, indices=indices, cu_seqlens=self.cu_seqlens.to(device))


def unpad(x: torch.Tensor, key_padding_mask: torch.Tensor):
    """Remove padding: keep the real tokens of a padded batch, packed in row-major order.

    Args:
        x: (B, S, *features), any dtype.
        key_padding_mask: (B, S) bool, True = padding.

    Returns:
        (x_packed, indices, cu_seqlens, max_seqlen): x_packed (T, *features) the real tokens;
        indices (T,) int64 their flat positions b * S + s; cu_seqlens (B + 1,) int32 cumulative
        real lengths starting at 0; max_seqlen a Python int (a SymInt under torch.compile).
        Differentiable in x (the backward scatters into zeros). See :class:`Packing`.
    """
    _check_mask(x, key_padding_mask)
    packing = Packing.from_mask(key_padding_mask)
    return packing.pack(x), packing.indices, packing.cu_seqlens, packing.max_seqlen


def pad(x_packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Put padding back: (T, *features) -> (batch, seqlen, *features), zeros at padded positions.

    ``indices`` are the flat positions b * seqlen + s from :func:`unpad` (unique, in
    [0, batch * seqlen)); out-of-range indices raise (CPU) or trap on a device-side check (CUDA).
    Differentiable in x_packed (the backward gathers).
    """
    if not isinstance(x_packed, torch.Tensor) or x_packed.dim() < 1:
        raise ValueError("pad: x_packed must be a tensor of shape (T, *features)")
    _check_indices(indices, x_packed, "pad", "x_packed")
    if x_packed.shape[0] != indices.shape[0]:
        raise ValueError(f"pad: x_packed has {x_packed.shape[0]} rows but indices has {indices.shape[0]} entries")
    if batch < 0 or seqlen < 0:
        raise ValueError(f"pad: batch and seqlen must be >= 0, got {batch}, {seqlen}")
    return _unpack(x_packed, indices, (batch, seqlen))


def mask_to_indices(key_padding_mask: torch.Tensor):
    """(B, S) bool mask, True = padding -> (indices (T,) int64, cu_seqlens (B+1,) int32, max_seqlen)."""
    _check_mask(None, key_padding_mask)
    return kernel_call(torch.ops.bertkern.mask_to_indices, key_padding_mask)


def key_padding_mask_from_lengths(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Lengths (B,) -> key_padding_mask (B, max_len) bool, True = padding (positions >= length)."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise TypeError("key_padding_mask_from_lengths: lengths must be a 1-D integer tensor (B,)")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("key_padding_mask_from_lengths: lengths must be >= 0")
    longest = int(lengths.max()) if lengths.numel() else 0
    if max_len is None:
        max_len = longest
    elif max_len < longest:
        raise ValueError(f"key_padding_mask_from_lengths: max_len={max_len} < the longest length {longest}")
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) >= lengths.unsqueeze(1)


def key_padding_mask_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF's attention_mask (B, S), 1 = keep / 0 = padding -> key_padding_mask, True = padding."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("key_padding_mask_from_attention_mask: attention_mask must have shape (B, S)")
    return attention_mask == 0


# ---- fakes ------------------------------------------------------------------------------------

def _fake_ctx():
    """The fake-impl context under FakeTensorMode (torch.compile, export); None for plain meta
    tensors, whose Meta kernel (this fake, registered by register_fake) has no shape env to
    allocate data-dependent sizes from: ``get_ctx()`` raises there (and returns None when the
    fake is called directly)."""
    try:
        return torch.library.get_ctx()
    except RuntimeError:
        return None


@torch.library.register_fake("bertkern::mask_to_indices")
def _mask_to_indices_fake(key_padding_mask):
    _check_mask(None, key_padding_mask)
    batch, seqlen = key_padding_mask.shape
    ctx = _fake_ctx()
    if ctx is None:
        # Plain meta tensors (deferred init, shape inference): no data, so the upper bound,
        # every position real (what torch's meta nonzero returns under
        # torch.fx.experimental._config.meta_nonzero_assume_all_nonzero): T = B * S, max_seqlen S.
        indices = key_padding_mask.new_empty((batch * seqlen,), dtype=torch.int64)
        cu_seqlens = key_padding_mask.new_empty((batch + 1,), dtype=torch.int32)
        return indices, cu_seqlens, seqlen
    total = ctx.new_dynamic_size()  # T, the number of real tokens: known only from the data
    max_seqlen = ctx.new_dynamic_size()
    indices = key_padding_mask.new_empty((total,), dtype=torch.int64)
    cu_seqlens = key_padding_mask.new_empty((batch + 1,), dtype=torch.int32)
    return indices, cu_seqlens, max_seqlen


@torch.library.register_fake("bertkern::gather_rows")
def _gather_rows_fake(x, indices):
    _check_indices(indices, x, "gather_rows", "x")
    return x.new_empty((indices.shape[0], *x.shape[1:]))


@torch.library.register_fake("bertkern::scatter_rows")
def _scatter_rows_fake(x_packed, indices, n_rows):
    _check_indices(indices, x_packed, "scatter_rows", "x_packed")
    return x_packed.new_empty((n_rows, *x_packed.shape[1:]))


# ---- autograd: gather and scatter are each other's backward ------------------------------------

def _gather_setup(ctx, inputs, output):
    x, indices = inputs
    ctx.n_rows = x.shape[0]
    ctx.save_for_backward(indices)


def _gather_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return kernel_call(torch.ops.bertkern.scatter_rows, grad, indices, ctx.n_rows), None


def _scatter_setup(ctx, inputs, output):
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _scatter_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return kernel_call(torch.ops.bertkern.gather_rows, grad, indices), None, None


torch.library.register_autograd("bertkern::gather_rows", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("bertkern::scatter_rows", _scatter_backward, setup_context=_scatter_setup)
