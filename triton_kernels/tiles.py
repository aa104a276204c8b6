"""Device helpers shared by the forward and backward kernels (one kernel family).

Scores live in the log2 domain inside the kernels: z2 = z * log2(e), so that exp2 can be used;
scale*log2(e) is folded into one multiplier and bias/float masks are multiplied by log2(e).
"""
import triton
import triton.language as tl

# globals read by jit code must be tl.constexpr instances
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)


@triton.jit
def row_tile(QOff, num_q_heads, group_size, BLOCK_M: tl.constexpr):
    """Where a program of a row-major kernel (grid: query tile, batch*head, stream) stands:
    (b, h, kv head, s, the stream's first packed row, its length, the tile's first row)."""
    bh = tl.program_id(1)
    s = tl.program_id(2)
    b = bh // num_q_heads
    h = bh % num_q_heads
    q_start = tl.load(QOff + s)
    q_len = tl.load(QOff + s + 1) - q_start
    # GQA: query head h reads the shared key/value head h // group_size in place
    return b, h, h // group_size, s, q_start, q_len, tl.program_id(0) * BLOCK_M


@triton.jit
def mma(a, b, F32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation. F32_DOT: fp32 inputs (IEEE, not TF32) or the interpreter,
    whose bf16 dot is wrong; callers round operands to the input dtype first either way."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def key_bounds(KVOff, KVLen, stride_klb, stride_kls, b, p, s, m_start,
               HAS_KVLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """(first packed key of peer p, end of the keys a query tile starting at m_start may see)."""
    kv_start = tl.load(KVOff + p)
    kv_end = tl.load(KVOff + p + 1) - kv_start
    if HAS_KVLEN:  # padding keys are never visited
        kv_end = tl.minimum(kv_end, tl.load(KVLen + b * stride_klb + p * stride_kls).to(tl.int32))
    if IS_CAUSAL:
        if p == s:  # keys past the tile's last row are all above the diagonal
            kv_end = tl.minimum(kv_end, m_start + BLOCK_M)
    return kv_start, kv_end


@triton.jit
def masked_scores(qk, offs_m, offs_n, m_start, n_start, kv_end, self_pair, bias_log2,
                  mask_ptrs, mask_valid,
                  HAS_BIAS: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Log2-domain scores of one (BLOCK_M, BLOCK_N) tile with bias and every mask applied
    (-inf where a key may not be attended). Only edge and diagonal tiles pay for their masks."""
    if HAS_BIAS:
        qk += bias_log2
    if MASK_KIND == MASK_FLOAT:
        qk += tl.load(mask_ptrs, mask=mask_valid, other=0.0).to(tl.float32) * LOG2E
    if MASK_KIND == MASK_BOOL:
        qk = tl.where(tl.load(mask_ptrs, mask=mask_valid, other=0) != 0, qk, float("-inf"))
    if n_start + BLOCK_N > kv_end:  # last tile: keys beyond the (kv_lengths) end
        qk = tl.where(offs_n[None, :] < kv_end, qk, float("-inf"))
    if IS_CAUSAL:
        if self_pair:
            if n_start + BLOCK_N > m_start + 1:  # a tile crossing the diagonal: key j iff j <= i
                qk = tl.where(offs_n[None, :] <= offs_m[:, None], qk, float("-inf"))
    return qk


@triton.jit
def dropout_keep(seed, rng_offset, bh, rows, cols, Tq, Tk, dropout_p):
    """Philox keep mask of a tile: one counter per (batch*head, query, key) element, so the
    backward regenerates exactly the forward's mask from (seed, offset)."""
    counter = ((bh.to(tl.int64) * Tq + rows[:, None]) * Tk + cols[None, :]) + rng_offset
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def keep_mask_kernel(Keep, seed, rng_offset, dropout_p, Tq, Tk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug/test helper: writes the keep mask the kernels use, (B*Hq, Tq, Tk) as uint8."""
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_offset, bh, rows, cols, Tq, Tk, dropout_p)
    ptrs = Keep + (bh.to(tl.int64) * Tq + rows[:, None]) * Tk + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < Tq) & (cols[None, :] < Tk))


@triton.jit
def to_io(x, dtype: tl.constexpr, BF16_RTNE: tl.constexpr):
    """Cast fp32 x to the input/output dtype. The interpreter truncates fp32 -> bf16 instead of
    rounding to nearest even (GPUs round), which doubles the error: round the bits here first
    (BF16_RTNE is set only under the interpreter with bf16 inputs)."""
    if BF16_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
