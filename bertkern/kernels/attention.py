"""Varlen FlashAttention-2 in Triton: forward, backward, causal masking, in-kernel dropout.

The tokens of a batch are packed: q, k, v are (T, H, D) with the sequences laid end to end, and
``cu_seqlens`` (B + 1,) int32 gives where each one starts (sequence b is rows
``cu_seqlens[b] : cu_seqlens[b + 1]``). Attention never crosses a sequence boundary, and no work
is spent on padding because there is none. Every index below (query i, key j, causal i >= j,
the dropout counters) is *local*: 0-based within the sequence.

Forward (one program per block of BLOCK_M queries of one (sequence, head)):

    for each block of BLOCK_N keys:             S = Q K^T * scale      (BLOCK_M, BLOCK_N), fp32
        m_new = max(m, rowmax(S));  P = exp(S - m_new)
        l = l * exp(m - m_new) + rowsum(P)        (softmax normalizer, before dropout)
        acc = acc * exp(m - m_new) + dropout(P) V
    out = acc / l;  lse = m + log(l)             (natural log, saved for the backward)

The exponentials are exp2 with log2(e) folded into the scale (one multiply per score instead of
one per exp). Nothing of size S x S is ever stored: not the scores, not the dropout mask.

Backward: ``delta = rowsum(dO * O)`` first (attention_delta_bwd), then two kernels that never
write the same element, so no atomics and a deterministic result:
    attention_dkdv_bwd: one program per key block, loops over query blocks, owns dK and dV rows;
    attention_dq_bwd:   one program per query block, loops over key blocks, owns dQ rows.
Both recompute P = exp(S - lse) from q, k and the saved lse, and regenerate the dropout mask.

With Z = keep / (1 - p) (the dropout multiplier), P~ = P * Z, out = P~ V:
    dV = P~^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - delta),   dQ = dS K * scale,
    dK = dS^T Q * scale,   and delta = rowsum(P * dP) = rowsum(dO * O) even with dropout.

Dropout convention (reproduced bit for bit by the C++ CPU kernel, csrc/cpu/attention.cpp):
    seed s: int64 tensor (1,) on the device, read in the kernel (no host sync), 0 <= s < 2^62.
    For sequence b, head h (H heads), local query i and local key j = 32 g + 8 n + 2 q + h'
    (n, q < 4, h' < 2), with W = 4 * ceil(max_seqlen / 32) (Philox calls per query row):
        philox key (seed)     = s + b * H + h                 (int64: k0 low, k1 high 32 bits)
        philox counter c0     = i * W + 4 g + q               (int32, < max_seqlen * W < 2^31),
                                c1 = c2 = c3 = 0
        (w0, w1, w2, w3)      = Philox4x32-10(key, counter) = tl.randint4x(key, c0)
        u                     = bits [16 h', 16 h' + 16) of w[n]: one call serves 8 keys
        keep iff u >= T, T = round(dropout_p * 2^16) (dropout_threshold(p)): dropped with
                                 probability T / 2^16, within 2^-17 of dropout_p; kept
                                 probabilities times float32(1 / (1 - dropout_p))
                                 (T = 2^16 at dropout_p == 1 keeps nothing; p == 0 keeps all).
    The operator checks max_seqlen^2 < 2^31 (max_seqlen <= 46340), which keeps the counters
    below 2^31.
    FlashAttention-2 draws 16 elements per call with 8-bit thresholds (p rounded to 1/256); 16
    bits keep p exact to 2^-17 at 8 elements per call.

Ragged tails need no special lengths: rows past the end of a sequence, and columns past
HEAD_DIM when it is not a power of two (BLOCK_D is the next one), are masked on load (zero
filled, so they add nothing to any dot product) and on store.

Grids are (blocks of max_seqlen, H, B) rather than (blocks, B * H): CUDA caps grid dims 1 and 2
at 65535, which B * H can pass in a batch of many short sentences. DOT_PRECISION is tl.dot's
input_precision for fp32 inputs ("tf32x3" gives fp32 accuracy on tensor cores, "tf32" less);
16-bit inputs ignore it.
"""
import os

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # log(x) == log2(x) * LN2

# ------------------------------------------------------------------------------------------
# Autotune configurations: tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_80 (A100)
# and sm_90 (H100), per head-dim class: BLOCK_D <= 64 and BLOCK_D == 128. The class decides
# what fits in registers: the fp32 accumulators alone are BLOCK x BLOCK_D. Every tile here
# compiles without a register spill for every head dim of its class, fp16 and bf16, causal and
# dropout on or off, on both archs (tests/test_attention_aot.py), and none duplicates work:
# the warps tile the rows of every matmul exactly (rows = BLOCK_M, BLOCK_N in dK/dV), i.e.
# rows >= 16 * num_warps (sm_80 mma.sync) and rows >= 64 per warpgroup of 4 warps (sm_90
# wgmma); tests/test_gpu_model.py counts the MMA instructions of each loop to check it. The
# small tiles are for short BERT sequences, whose ragged last block is mostly idle rows in a
# big tile; 3-stage tiles are there for Hopper's deeper pipelines where they fit both archs.
# ------------------------------------------------------------------------------------------
FWD_TILES = {
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
    128: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
}
# dK/dV holds K, V and the fp32 dK, dV accumulators of its BLOCK_N keys for the whole loop:
# the tightest fit: at BLOCK_D = 128 one tile, (16, 128, 8, 3), is the only one found that
# fits both archs without a spill (2 stages spill 32 bytes on sm_80 when causal) and without
# duplicated work (BLOCK_N = 32 or 64 duplicates on sm_80 or spills); short sequences pay
# for its 128 keys. A per-arch table would give Hopper smaller tiles.
DKDV_TILES = {
    64: [(32, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 2)],
    128: [(16, 128, 8, 3)],
}
# dQ holds Q, dO and the fp32 dQ accumulator of its BLOCK_M queries ((128, 64, 8, 2) spills
# 8 bytes on sm_80 at head dim 32, found by BERTKERN_AOT_FULL=1).
DQ_TILES = {
    64: [(128, 32, 8, 2), (64, 32, 4, 2)],
    128: [(64, 32, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
}
# fp32 inputs (for checking, not the training path) have operands twice as wide, and their dots
# run as 3xTF32 by default (two extra products per dot for fp32 accuracy): small tiles of their
# own. These are compiled but not tuned; at BLOCK_D = 128 dQ still spills a few bytes on sm_90
# when causal and dropout are both on.
FWD_TILES_FP32 = {64: [(64, 16, 4, 2), (32, 16, 4, 2)], 128: [(32, 16, 4, 2)]}
DKDV_TILES_FP32 = {64: [(16, 32, 4, 2), (16, 16, 4, 2)], 128: [(16, 16, 4, 2)]}
DQ_TILES_FP32 = {64: [(32, 32, 8, 2), (32, 16, 4, 2)], 128: [(32, 16, 8, 2)]}
# delta = rowsum(dO * O) is memory bound: one fixed tile.
DELTA_BLOCK_T = 64

# The interpreter runs on the CPU and cannot autotune more than one config. Small, unequal
# BLOCK_M / BLOCK_N there make short test sequences cross several blocks and exercise the
# causal-diagonal logic with non-square tiles.
INTERPRET_FWD_TILE = (32, 16, 4, 1)
INTERPRET_DKDV_TILE = (16, 32, 4, 1)
INTERPRET_DQ_TILE = (32, 16, 4, 1)


def head_dim_class(block_d):
    """The key of the *_TILES tables for a BLOCK_D."""
    return 64 if block_d <= 64 else 128


def _configs(tiles):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in tiles
    ]


def _tiles_of(*tables):
    return list(dict.fromkeys(tile for table in tables for tiles in table.values() for tile in tiles))


def _prune_by_head_dim(table, table_fp32):
    """early_config_prune: keep the tiles of the call's dtype and head-dim class (all of them
    when none match, as with the interpreter's single config)."""

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else named_args["BLOCK_D"]
        fp32 = str(named_args["Q"].dtype) in ("torch.float32", "fp32")
        allowed = (table_fp32 if fp32 else table)[head_dim_class(block_d)]
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return kept or configs

    return prune


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FWD_CONFIGS = _configs([INTERPRET_FWD_TILE] if _INTERPRET else _tiles_of(FWD_TILES, FWD_TILES_FP32))
DKDV_CONFIGS = _configs([INTERPRET_DKDV_TILE] if _INTERPRET else _tiles_of(DKDV_TILES, DKDV_TILES_FP32))
DQ_CONFIGS = _configs([INTERPRET_DQ_TILE] if _INTERPRET else _tiles_of(DQ_TILES, DQ_TILES_FP32))

# Retune per power-of-two bucket of max_seqlen, not per exact value: varlen batches change
# max_seqlen every step. grid_bucket is the power-of-two bucket of B * H (capped at
# GRID_BUCKET_CAP): with few sequences x heads the grid is short of CTAs for the GPU's SMs and
# smaller tiles win; past the cap every tile fills the GPU. The dtype of the tensor arguments
# is part of the key automatically.
AUTOTUNE_KEY = ["max_seqlen_bucket", "grid_bucket", "HEAD_DIM", "CAUSAL", "DROPOUT"]
GRID_BUCKET_CAP = 512


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows, seqlen, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, zero-filling rows >= seqlen (when MASK_ROWS) and columns
    >= HEAD_DIM. Masks the compiler cannot prove away are left out at compile time, so full
    blocks of power-of-two head dims load unpredicated."""
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs, mask=(rows < seqlen)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _load_vec(ptrs, rows, seqlen, MASK_ROWS: tl.constexpr):
    """Load one fp32 value per row (lse or delta); rows past the sequence read 0."""
    if MASK_ROWS:
        vec = tl.load(ptrs, mask=rows < seqlen, other=0.0)
    else:
        vec = tl.load(ptrs)
    return vec


def dropout_threshold(dropout_p):
    """The dropout test's integer threshold T = the integer nearest dropout_p * 2^16 (ties to
    even; exact in float64): a score element is kept iff its 16-bit random half >= T, dropped
    with probability T / 2^16, within 2^-17 of dropout_p. T = 0 keeps all, T = 2^16 nothing.
    The C++ CPU kernel computes T the same way (nearbyint of the same double)."""
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    return int(round(float(dropout_p) * 65536.0))


@triton.jit
def _philox4x32_10(philox_seed, counter):
    """Philox4x32-10 with key (low, high 32 bits of philox_seed) and counter (counter, 0, 0, 0):
    the four words Triton's tl.randint4x(philox_seed, counter) returns, as uint32. Each round's
    32 x 32 -> 64-bit products are written as one 64-bit multiply of zero-extended operands, which
    ptxas issues as one IMAD.WIDE.U32 (tl.randint4x's umulhi + mul issue two IMADs)."""
    k0 = (philox_seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((philox_seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    c1 = c0 * 0
    c2 = c1
    c3 = c1
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(philox_seed, rows, col_start, max_seqlen, dropout_threshold,
                  BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Keep mask of the tile (query rows) x (keys col_start + [0, BLOCK_N)): True where the
    attention probability (query i, key j) survives dropout. Shape (len(rows), BLOCK_N), or
    (BLOCK_N, len(rows)) when TRANSPOSED (the dK/dV kernel's keys-down tiles), holding the same
    function of (i, j) (the module docstring's convention). col_start is a multiple of BLOCK_N
    (16, or a multiple of 32).

    One Philox call serves 8 keys of a query: key j = 32 g + 8 n + 2 q + h takes half h of word n
    of call 4 g + q. These are the 8 keys one thread holds of a row in the tensor-core
    accumulator layout (mma.sync and wgmma: columns 8 n + 2 q + {0, 1} for q = lane % 4), so in
    the query-rows orientation the mask is computed elementwise on the score tile: the 8 elements
    of a call compute the same counter from the same registers, and LLVM merges their Philox
    rounds into one per thread. No data moves between threads. In the keys-down orientation
    (dK/dV) a thread's elements belong to other calls, so the mask is drawn per call, one call
    per (query, 8 keys), and Triton moves the 16-bit halves into the tile's layout (through
    shared memory; the words' halves move with fewer instructions than booleans do), where they
    are compared.
    The counters are unique per (i, call) within one (sequence, head), whose Philox key is
    philox_seed: the forward and both backward kernels regenerate the same mask without storing
    it.
    """
    W = ((max_seqlen + 31) >> 5) * 4  # calls per query row
    if TRANSPOSED and BLOCK_N >= 32:
        G: tl.constexpr = BLOCK_N // 32
        M: tl.constexpr = rows.shape[0]
        calls = (col_start >> 3) + tl.arange(0, BLOCK_N // 8)  # 4 g + q
        counter = tl.reshape(rows[None, :] * W + calls[:, None], (G, 4, M))
        w0, w1, w2, w3 = _philox4x32_10(philox_seed, counter)  # (G, q, M)
        k0 = tl.join((w0 & 0xFFFF).to(tl.uint16), (w0 >> 16).to(tl.uint16))  # (G, q, M, h)
        k1 = tl.join((w1 & 0xFFFF).to(tl.uint16), (w1 >> 16).to(tl.uint16))
        k2 = tl.join((w2 & 0xFFFF).to(tl.uint16), (w2 >> 16).to(tl.uint16))
        k3 = tl.join((w3 & 0xFFFF).to(tl.uint16), (w3 >> 16).to(tl.uint16))
        halves = tl.join(tl.join(k0, k2), tl.join(k1, k3))  # (G, q, M, h, n >> 1, n & 1)
        halves = tl.permute(halves, (0, 4, 5, 1, 3, 2))  # (G, n >> 1, n & 1, q, h, M)
        keep = tl.reshape(halves, (BLOCK_N, M)).to(tl.uint32) >= dropout_threshold.to(tl.uint32)
    else:
        if BLOCK_N >= 32:
            # Relative to col_start (a multiple of 32): LLVM sees the layout's constant offsets.
            local = tl.arange(0, BLOCK_N)
            calls = (col_start >> 3) + (local >> 5) * 4 + ((local >> 1) & 3)
        else:
            # BLOCK_N = 16 (the fp32 check-only tiles): half a 32-key group.
            local = col_start + tl.arange(0, BLOCK_N)
            calls = (local >> 5) * 4 + ((local >> 1) & 3)
        n = (local >> 3) & 3
        shift = ((local & 1) * 16).to(tl.uint32)
        if TRANSPOSED:
            counter = rows[None, :] * W + calls[:, None]
            n = n[:, None]
            shift = shift[:, None]
        else:
            counter = rows[:, None] * W + calls[None, :]
            n = n[None, :]
            shift = shift[None, :]
        w0, w1, w2, w3 = _philox4x32_10(philox_seed, counter)
        word = tl.where(n < 2, tl.where(n == 0, w0, w1), tl.where(n == 2, w2, w3))
        keep = ((word >> shift) & 0xFFFF) >= dropout_threshold.to(tl.uint32)
    return keep


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt,
                         offs_m, offs_n, offs_d, key_lo, key_hi, seqlen, qk_scale,
                         philox_seed, max_seqlen, dropout_threshold,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Fold keys [key_lo, key_hi) into the running (acc, l_i, m_i) of one query block.

    MASKED is False for key blocks that lie wholly inside the sequence and wholly at or below
    the causal diagonal of every query row in the block: those skip every per-element mask.
    """
    for start_n in range(key_lo, key_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # int64 row offsets: packed T * row stride can exceed 2^31 elements.
        k = _load_rows(K_seq + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                       cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 scores
        if MASKED:
            visible = (cols < seqlen)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # A row whose every key so far is masked has m_new = -inf; subtracting 0 instead
            # keeps exp2 at 0 rather than NaN (-inf - -inf). Unmasked blocks cannot hit this.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_sub[:, None])
        # The normalizer sums the probabilities before dropout: dropout acts on softmax output.
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(philox_seed, offs_m, start_n, max_seqlen, dropout_threshold, BLOCK_N, False)
            p = p * tl.where(keep, 1.0, 0.0)  # the 1 / (1 - p) factor is applied once, at the end
        v = _load_rows(V_seq + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :],
                       cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_by_head_dim(FWD_TILES, FWD_TILES_FP32)})
@triton.jit
def attention_fwd(
    Q, K, V, OUT, LSE, CU_SEQLENS, SEED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens,  # T: the row stride of LSE, which is (H, T)
    num_heads, max_seqlen,
    max_seqlen_bucket, grid_bucket,  # autotune key only
    sm_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, h] = dropout(softmax(q k^T * sm_scale)) v, lse[h, t] = logsumexp(q k^T * sm_scale).

    Grid: (cdiv(max_seqlen, BLOCK_M), H, B). The last dim of Q, K, V, OUT is contiguous.
    """
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
    # The grid is sized for the longest sequence; shorter ones leave programs with no rows.
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)  # local query indices
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (seq_start + offs_m).to(tl.int64)  # global token indices
    Q_tile = Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    K_seq = K + seq_start.to(tl.int64) * stride_kt + head * stride_kh
    V_seq = V + seq_start.to(tl.int64) * stride_vt + head * stride_vh

    if DROPOUT:
        philox_seed = tl.load(SEED) + seq.to(tl.int64) * num_heads + head
    else:
        philox_seed = 0
    qk_scale = sm_scale * LOG2E

    # q stays in registers for the whole key loop.
    q = _load_rows(Q_tile, offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys this query block can see: all of the sequence, or (causal) up to its last row.
    if CAUSAL:
        key_hi = tl.minimum(seqlen, start_m + BLOCK_M)
        full_hi = tl.minimum(seqlen, start_m + 1)  # keys every row of the block sees
    else:
        key_hi = seqlen
        full_hi = seqlen
    # Split the key range: whole blocks that need no mask first, then the masked rest (the
    # ragged tail of the sequence and the blocks that cross the causal diagonal).
    full_end = (full_hi // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        0, full_end, seqlen, qk_scale, philox_seed, max_seqlen, dropout_threshold,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, DROPOUT, False, DOT_PRECISION)
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, K_seq, V_seq, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        full_end, key_hi, seqlen, qk_scale, philox_seed, max_seqlen, dropout_threshold,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, DROPOUT, True, DOT_PRECISION)

    # Every real query row sees at least key 0, so l_i > 0 there.
    if DROPOUT:
        acc = acc * (dropout_scale / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2  # base-2 running max back to natural log
    row_ok = offs_m < seqlen
    tl.store(LSE + head.to(tl.int64) * total_tokens + seq_start + offs_m, lse, mask=row_ok)
    O_tile = OUT + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(O_tile, acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# ------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------
@triton.jit
def attention_delta_bwd(
    OUT, DOUT, DELTA,
    stride_ot, stride_oh, stride_dot, stride_doh,
    total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dout[t, h, d] * out[t, h, d], in fp32. Grid: (cdiv(T, BLOCK_T), H).

    Sequence boundaries do not matter here, so this runs over the packed tokens directly.
    """
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_t.to(tl.int64)
    o = _load_rows(OUT + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                   offs_t, total_tokens, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DOUT + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                    offs_t, total_tokens, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_tokens + offs_t, delta, mask=offs_t < total_tokens)


@triton.jit
def _attention_dkdv_bwd_inner(dk, dv, k, v, Q_seq, DO_seq, LSE_seq, DELTA_seq,
                              stride_qt, stride_dot, offs_n, key_start, offs_m, offs_d,
                              query_lo, query_hi, seqlen, qk_scale,
                              philox_seed, max_seqlen, dropout_threshold, dropout_scale,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """Accumulate the contributions of queries [query_lo, query_hi) to one key block's dK, dV.

    Works on transposed tiles (keys down, queries across) so that dV += P~^T dO and
    dK += dS^T Q are plain dots without transposing the (BLOCK_N, BLOCK_M) probability tile.
    offs_n = key_start + [0, BLOCK_N) are the block's local key indices.
    """
    for start_m in range(query_lo, query_hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        rows64 = rows.to(tl.int64)
        q = _load_rows(Q_seq + rows64[:, None] * stride_qt + offs_d[None, :],
                       rows, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        lse = _load_vec(LSE_seq + rows, rows, seqlen, MASKED)
        # P^T recomputed from the saved natural-log lse, in base 2 like the forward.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - (lse * LOG2E)[None, :])
        if MASKED:
            visible = (rows < seqlen)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= rows[None, :])
            p_t = tl.where(visible, p_t, 0.0)
        # Where the mask is drawn decides whether the tile fits in registers (ptxas, AOT test):
        # at BLOCK_D = 128 between the two dots, else after dO V^T (the (32, 128, 8, 2) tile
        # spills 8 bytes on sm_80 when causal with the mask drawn earlier).
        if DROPOUT and BLOCK_D > 64:
            keep = _dropout_keep(philox_seed, rows, key_start, max_seqlen, dropout_threshold,
                                 offs_n.shape[0], True)
        do = _load_rows(DO_seq + rows64[:, None] * stride_dot + offs_d[None, :],
                        rows, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (dO V^T)^T
        if DROPOUT and BLOCK_D <= 64:
            keep = _dropout_keep(philox_seed, rows, key_start, max_seqlen, dropout_threshold,
                                 offs_n.shape[0], True)
        if DROPOUT:
            z_t = tl.where(keep, dropout_scale, 0.0)  # multiplies: fp32 pipe, not selects on packed halves
            pdrop_t = p_t * z_t
            dp_t = dp_t * z_t
        else:
            pdrop_t = p_t
        dv = tl.dot(pdrop_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = _load_vec(DELTA_seq + rows, rows, seqlen, MASKED)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_by_head_dim(DKDV_TILES, DKDV_TILES_FP32)})
@triton.jit
def attention_dkdv_bwd(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_SEQLENS, SEED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, num_heads, max_seqlen,
    max_seqlen_bucket, grid_bucket,  # autotune key only
    sm_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV for one block of BLOCK_N keys of one (sequence, head), looping over the queries.

    Grid: (cdiv(max_seqlen, BLOCK_N), H, B). Each dK / dV row is written by exactly one
    program, and only written (never accumulated in memory): deterministic, autotune-safe.
    """
    start_n = tl.program_id(0) * BLOCK_N
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if start_n >= seqlen:
        return

    offs_n = start_n + tl.arange(0, BLOCK_N)  # local key indices
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    keys = (seq_start + offs_n).to(tl.int64)
    seq_start64 = seq_start.to(tl.int64)
    Q_seq = Q + seq_start64 * stride_qt + head * stride_qh
    DO_seq = DOUT + seq_start64 * stride_dot + head * stride_doh
    LSE_seq = LSE + head.to(tl.int64) * total_tokens + seq_start
    DELTA_seq = DELTA + head.to(tl.int64) * total_tokens + seq_start

    if DROPOUT:
        philox_seed = tl.load(SEED) + seq.to(tl.int64) * num_heads + head
    else:
        philox_seed = 0
    qk_scale = sm_scale * LOG2E

    k = _load_rows(K + keys[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
                   offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + keys[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                   offs_n, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks, in three runs: (causal) the blocks that cross the diagonal of this key
    # block, masked; then whole blocks every key of this block is visible to, unmasked; then
    # the ragged tail of the sequence, masked. Only the query block containing row start_n and
    # later ones can see these keys under the causal mask.
    if CAUSAL:
        query_lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # first row >= last key
    else:
        query_lo = 0
        diag_end = 0
    full_end = tl.maximum((seqlen // BLOCK_M) * BLOCK_M, diag_end)
    dk, dv = _attention_dkdv_bwd_inner(
        dk, dv, k, v, Q_seq, DO_seq, LSE_seq, DELTA_seq, stride_qt, stride_dot,
        offs_n, start_n, offs_m, offs_d, query_lo, tl.minimum(diag_end, seqlen), seqlen, qk_scale,
        philox_seed, max_seqlen, dropout_threshold, dropout_scale,
        HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, DROPOUT, True, DOT_PRECISION)
    dk, dv = _attention_dkdv_bwd_inner(
        dk, dv, k, v, Q_seq, DO_seq, LSE_seq, DELTA_seq, stride_qt, stride_dot,
        offs_n, start_n, offs_m, offs_d, diag_end, full_end, seqlen, qk_scale,
        philox_seed, max_seqlen, dropout_threshold, dropout_scale,
        HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, DROPOUT, False, DOT_PRECISION)
    dk, dv = _attention_dkdv_bwd_inner(
        dk, dv, k, v, Q_seq, DO_seq, LSE_seq, DELTA_seq, stride_qt, stride_dot,
        offs_n, start_n, offs_m, offs_d, full_end, seqlen, seqlen, qk_scale,
        philox_seed, max_seqlen, dropout_threshold, dropout_scale,
        HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, DROPOUT, True, DOT_PRECISION)

    dk = dk * sm_scale  # S = scale * Q K^T: the chain rule's scale, applied once
    store_mask = (offs_n < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + keys[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + keys[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attention_dq_bwd_inner(dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt,
                            offs_m, offs_n, offs_d, key_lo, key_hi, seqlen, qk_scale,
                            philox_seed, max_seqlen, dropout_threshold, dropout_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                            CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """Accumulate the contributions of keys [key_lo, key_hi) to one query block's dQ."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        k = _load_rows(K_seq + cols64[:, None] * stride_kt + offs_d[None, :],
                       cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(V_seq + cols64[:, None] * stride_vt + offs_d[None, :],
                       cols, seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = (cols < seqlen)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(philox_seed, offs_m, start_n, max_seqlen, dropout_threshold, BLOCK_N, False)
            dp = dp * tl.where(keep, dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=DQ_CONFIGS, key=AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_by_head_dim(DQ_TILES, DQ_TILES_FP32)})
@triton.jit
def attention_dq_bwd(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_SEQLENS, SEED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_tokens, num_heads, max_seqlen,
    max_seqlen_bucket, grid_bucket,  # autotune key only
    sm_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for one block of BLOCK_M queries of one (sequence, head), looping over the keys.

    Grid: (cdiv(max_seqlen, BLOCK_M), H, B). Each dQ row is written by exactly one program.
    """
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + seq)
    seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if start_m >= seqlen:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)  # local query indices
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = (seq_start + offs_m).to(tl.int64)
    seq_start64 = seq_start.to(tl.int64)
    K_seq = K + seq_start64 * stride_kt + head * stride_kh
    V_seq = V + seq_start64 * stride_vt + head * stride_vh

    if DROPOUT:
        philox_seed = tl.load(SEED) + seq.to(tl.int64) * num_heads + head
    else:
        philox_seed = 0
    qk_scale = sm_scale * LOG2E

    q = _load_rows(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                   offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DOUT + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                    offs_m, seqlen, offs_d, HEAD_DIM, BLOCK_D, True)
    stat_offset = head.to(tl.int64) * total_tokens + seq_start
    lse2 = _load_vec(LSE + stat_offset + offs_m, offs_m, seqlen, True) * LOG2E
    delta = _load_vec(DELTA + stat_offset + offs_m, offs_m, seqlen, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same key-range split as the forward: unmasked whole blocks, then the masked rest.
    if CAUSAL:
        key_hi = tl.minimum(seqlen, start_m + BLOCK_M)
        full_hi = tl.minimum(seqlen, start_m + 1)
    else:
        key_hi = seqlen
        full_hi = seqlen
    full_end = (full_hi // BLOCK_N) * BLOCK_N
    dq = _attention_dq_bwd_inner(
        dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        0, full_end, seqlen, qk_scale, philox_seed, max_seqlen, dropout_threshold, dropout_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, DROPOUT, False, DOT_PRECISION)
    dq = _attention_dq_bwd_inner(
        dq, q, do, lse2, delta, K_seq, V_seq, stride_kt, stride_vt, offs_m, offs_n, offs_d,
        full_end, key_hi, seqlen, qk_scale, philox_seed, max_seqlen, dropout_threshold, dropout_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, DROPOUT, True, DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty),
             mask=(offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :])
