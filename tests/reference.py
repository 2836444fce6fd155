"""Pure-PyTorch fp32/fp64 references for every bertkern op, and the tolerance table per dtype.

Tests compare bertkern against these; nothing here calls bertkern.
"""
import torch

# One tolerance table per dtype, for outputs compared against the fp32 reference after the
# reference is rounded to the test dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tolerances(dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    return dict(atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) over the last dim, computed in fp64 (or fp32 for speed).

    Returns (y, z, mean, rstd) with z = x + residual rounded to x.dtype, as an unfused
    `x + residual` would round it; y in x.dtype; mean and rstd in float32 (float64 for float64).
    """
    z = x if residual is None else (x + residual)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    zc = z.to(compute)
    mean = zc.mean(-1)
    var = (zc - mean.unsqueeze(-1)).square().mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (zc - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y.to(x.dtype), z, mean.to(stat), rstd.to(stat)


def layer_norm_bwd_ref(dy, z, weight=None, has_bias=False, eps=1e-5, dresidual_out=None):
    """Gradients (dz, dweight, dbias) of y = LN(z) * weight + bias, by autograd in fp64."""
    zc = z.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True) if weight is not None else None
    b = torch.zeros(z.shape[-1], dtype=torch.float64, requires_grad=True) if has_bias else None
    y = torch.nn.functional.layer_norm(zc, zc.shape[-1:], w, b, eps)
    y.backward(dy.double())
    dz = zc.grad
    if dresidual_out is not None:
        dz = dz + dresidual_out.double()
    dw = w.grad.to(z.dtype) if w is not None else None
    db = b.grad.to(z.dtype) if b is not None else None
    return dz.to(z.dtype), dw, db


def unpad_ref(x, key_padding_mask):
    """(B, S, *F) + mask (True = padding) -> (x_packed, indices, cu_seqlens, max_seqlen), by
    boolean indexing and cumsum."""
    batch, seqlen = key_padding_mask.shape
    keep = ~key_padding_mask.reshape(-1)
    indices = torch.arange(batch * seqlen, device=x.device)[keep]
    lengths = (~key_padding_mask).sum(1)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    max_seqlen = int(lengths.max()) if batch else 0
    return x.reshape(batch * seqlen, *x.shape[2:])[keep], indices, cu_seqlens, max_seqlen


def pad_ref(x_packed, indices, batch, seqlen):
    """(T, *F) -> (B, S, *F) with zeros at padded positions, by index_put."""
    out = x_packed.new_zeros((batch * seqlen, *x_packed.shape[1:]))
    out[indices] = x_packed
    return out.reshape(batch, seqlen, *x_packed.shape[1:])


# --- Dropout (csrc/cpu/dropout.cpp) ----------------------------------------------------------

def philox4x32_ref(seed, counters):
    """numpy Philox4x32-10 on counters (lo32(n), hi32(n), 0, 0), key (lo32(seed), hi32(seed)),
    n the nonnegative integer counters (any shape). Returns the four output words, a uint32 array
    of shape counters.shape + (4,). The one Philox of this file (dropout and attention)."""
    import numpy as np

    mask32 = np.uint64(0xFFFFFFFF)
    n = np.asarray(counters, dtype=np.uint64)
    c0, c1 = n & mask32, n >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0 = np.uint64(int(seed) & 0xFFFFFFFF)
    k1 = np.uint64((int(seed) >> 32) & 0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    key_a, key_b = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        prod_b, prod_a = round_b * c2, round_a * c0  # < 2^64: exact
        c0, c2 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0) & mask32, ((prod_a >> np.uint64(32)) ^ c3 ^ k1) & mask32
        c1, c3 = prod_b & mask32, prod_a & mask32
        k0, k1 = (k0 + key_a) & mask32, (k1 + key_b) & mask32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def dropout_keep_ref(seed, numel, p):
    """bertkern's CPU dropout keep mask for a contiguous tensor of numel elements: element
    i = 64 b + 16 j + l (j < 4, l < 16) uses word j of Philox4x32-10 at counter 16 b + l and is
    kept when the word >= round(p * 2^32). Returns a (numel,) bool tensor."""
    import numpy as np

    i = np.arange(numel, dtype=np.uint64)
    b, j, l = i // np.uint64(64), (i % np.uint64(64)) // np.uint64(16), i % np.uint64(16)
    words = philox4x32_ref(seed, b * np.uint64(16) + l)[np.arange(numel), j.astype(np.int64)]
    threshold = min(int(round(p * 2**32)), 2**32 - 1)
    return torch.from_numpy(words.astype(np.uint64) >= np.uint64(threshold))


def dropout_ref(x, keep, p, relu=False):
    """(relu(x) if relu else x) * keep / (1 - p), in fp64, rounded to x.dtype."""
    xd = x.double().relu() if relu else x.double()
    return (xd * keep.reshape(x.shape).double() / (1.0 - p)).to(x.dtype)


# --- Attention (varlen, causal, dropout) -------------------------------------------------------

def attention_dropout_keep_ref(seed, cu_seqlens, num_heads, max_seqlen, dropout_p):
    """The dropout keep masks bertkern's attention kernels generate, one (H, L, L) bool tensor
    per sequence (L its length): for sequence b, head h, local query i, key j = 32 g + 8 n +
    2 q + h' (n, q < 4, h' < 2), with W = 4 * ceil(max_seqlen / 32), keep = u >= round(p * 2^16)
    where u is bits [16 h', 16 h' + 16) of word n of Philox4x32-10 with key seed + b * H + h at
    counter (int32) i * W + 4 g + q: one Philox call per 8 keys."""
    import numpy as np

    cu = [int(c) for c in cu_seqlens]
    calls_per_row = 4 * ((int(max_seqlen) + 31) // 32)
    threshold = int(round(float(dropout_p) * 65536.0))
    masks = []
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        i = np.arange(n, dtype=np.int64)[:, None]
        j = np.arange(n, dtype=np.int64)[None, :]
        call = (j >> 5) * 4 + ((j >> 1) & 3)
        counters = (i * calls_per_row + call).astype(np.uint32).astype(np.uint64)  # int32 wrap
        word_index = np.broadcast_to((j >> 3) & 3, (n, n))
        shift = (16 * (j & 1)).astype(np.uint32)
        heads = []
        for h in range(num_heads):
            words = philox4x32_ref(int(seed) + b * num_heads + h, counters)  # (n, n, 4)
            word = np.take_along_axis(words, word_index[..., None], axis=-1)[..., 0]
            heads.append(((word >> shift) & np.uint32(0xFFFF)) >= threshold)
        masks.append(torch.from_numpy(np.stack(heads)) if heads else torch.zeros(0, n, n, dtype=torch.bool))
    return masks


def attention_varlen_ref(q, k, v, cu_seqlens, scale, causal=False, dropout_masks=None, dropout_p=0.0,
                         upcast=True):
    """Packed varlen attention, one sequence at a time, by plain matmul + softmax.

    q, k, v: (T, H, D); cu_seqlens (B + 1,). causal masks key j > query i (local indices).
    dropout_masks: per-sequence (H, L, L) bool keep masks (attention_dropout_keep_ref), applied
    to the softmax output with kept entries scaled by 1 / (1 - dropout_p).
    upcast=True computes in float64; upcast=False in q's dtype (the "same computation in the low
    dtype" of FlashAttention's error bound). Differentiable in q, k, v.
    Returns (out (T, H, D), lse (H, T)) in the compute dtype.
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cu = [int(c) for c in cu_seqlens]
    outs, lses = [], []
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        qb, kb, vb = (t[s:e].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        scores = (qb @ kb.transpose(-1, -2)) * scale
        if causal:
            future = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        lses.append(torch.logsumexp(scores, -1) if e > s else scores.new_zeros(q.shape[1], 0))
        probs = torch.softmax(scores, -1)
        if dropout_masks is not None and dropout_p > 0:
            keep = dropout_masks[b].to(q.device)
            probs = probs * keep.to(dtype) * (0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p))
        outs.append((probs @ vb).transpose(0, 1))
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1) if lses else q.new_zeros(q.shape[1], 0)
    return out, lse
