"""Device helpers shared by the forward and backward kernels (one kernel family).

Scores live in the log2 domain inside the kernels (exp2 is the hardware's exponential). Without a
score modifier (softcap, ALiBi, float mask) a tile keeps the raw q.k and the scale*log2(e)
multiplier is folded into the exp2 argument (one FFMA with the max subtraction); with one, the
tile is converted to log2 units first and the multiplier is 1.

Positions: `qi` are query rows within stream s, `kj` key positions within stream p, shaped to
broadcast against the score tile ([M, 1] / [1, N] row-major, or transposed in the dK/dV kernel,
which computes S^T = K Q^T).
"""
import triton
import triton.language as tl

# globals read by jit code must be tl.constexpr instances
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)


@triton.jit
def find_tile(TileOff, t, num_streams, search_steps):
    """The stream s whose tiles hold flat tile t: TileOff is the prefix sum of the streams' tile
    counts, searched in log2(S) steps (the grid covers only existing tiles, however many short
    streams there are)."""
    lo = t * 0
    hi = lo + num_streams - 1
    for _ in range(0, search_steps):
        mid = (lo + hi + 1) // 2
        right = tl.load(TileOff + mid) <= t
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    return lo, t - tl.load(TileOff + lo)


@triton.jit
def row_tile(QOff, TileOff, num_q_heads, group_size, num_streams, search_steps,
             BLOCK_M: tl.constexpr):
    """Where a program of a row-major kernel (grid: flat (stream, query tile), batch*head)
    stands: (b, h, kv head, s, the stream's first packed row, its length, the tile's first row)."""
    s, tile = find_tile(TileOff, tl.program_id(0), num_streams, search_steps)
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    q_start = tl.load(QOff + s)
    q_len = tl.load(QOff + s + 1) - q_start
    # GQA: query head h reads the shared key/value head h // group_size in place
    return b, h, h // group_size, s, q_start, q_len, tile * BLOCK_M


@triton.jit
def mma(a, b, F32_DOT: tl.constexpr, acc=None):
    """a @ b with fp32 accumulation. F32_DOT (utils.F32_DOT_CODES of utils.f32_precision): 1
    3xTF32 or 2 IEEE for an fp32 product (fp32 inputs, or the interpreter, whose bf16 dot is
    wrong and which computes every dot in fp32 whatever the precision), 0 for a 16-bit one;
    callers round operands to the input dtype first either way. acc: the fp32 accumulator's
    starting value (None: zeros)."""
    if F32_DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    elif F32_DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh(x):
    """tanh through exp2 (saturates to +-1 without overflow trouble: 2 / inf = 0)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def attended_peers(PeerStart, s, DIAGONAL: tl.constexpr):
    """[lo, hi) of stream s's entries in the compact list of attended peers (the diagonal table
    of varlen: the one entry s)."""
    if DIAGONAL:
        lo = 0
        hi = 1
    else:
        lo = tl.load(PeerStart + s)
        hi = tl.load(PeerStart + s + 1)
    return lo, hi


@triton.jit
def attended_peer(PeerList, i, s, DIAGONAL: tl.constexpr):
    """Entry i of the compact peer list: the stream whose keys are attended."""
    if DIAGONAL:
        p = s
    else:
        p = tl.load(PeerList + i)
    return p


@triton.jit
def kv_extent(KVOff, KVLen, stride_klb, stride_kls, b, p, HAS_KVLEN: tl.constexpr):
    """(first packed key of stream p, its length, the end of its real keys (kv_lengths))."""
    kv_start = tl.load(KVOff + p)
    kv_len = tl.load(KVOff + p + 1) - kv_start
    kv_end = kv_len
    if HAS_KVLEN:  # padding keys are never visited
        kv_end = tl.minimum(kv_end, tl.load(KVLen + b * stride_klb + p * stride_kls).to(tl.int32))
    return kv_start, kv_len, kv_end


@triton.jit
def key_stages(m_start, q_len, kv_end, self_pair, off, left, right,
               BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of a query tile, in three stages: [n0, a) boundary, [a, b) full (every key
    visible to every row: no positional mask), [b, hi) boundary. Tiles wholly outside the band
    (window/causal, aligned by `off`) or past kv_end are skipped."""
    lo = kv_end * 0
    hi = kv_end
    full_lo = lo
    full_hi = kv_end
    if BAND:
        if self_pair:
            m_last = tl.minimum(m_start + BLOCK_M, q_len) - 1
            if left >= 0:
                lo = tl.maximum(m_start + off - left, 0)
                full_lo = tl.maximum(m_last + off - left, 0)
            if right >= 0:
                hi = tl.minimum(hi, m_last + off + right + 1)
                full_hi = tl.minimum(full_hi, m_start + off + right + 1)
    hi = tl.maximum(hi, lo)
    n0 = (lo // BLOCK_N) * BLOCK_N
    hi_ceil = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, n0), hi_ceil)
    b = tl.minimum(tl.maximum((tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N, a), hi_ceil)
    return n0, a, b, hi


@triton.jit
def log2_scores(qk, scale_log2, softcap_scale, SOFTCAP: tl.constexpr, SCORE_MOD: tl.constexpr):
    """Raw q.k -> log2-domain scores when a modifier follows (else left raw: the caller folds
    scale_log2 into its exp2). With softcap, scale_log2 is softcap*log2(e) and
    softcap_scale = scale/softcap: z = softcap * tanh(scale * q.k / softcap)."""
    if SOFTCAP:
        qk = tanh(qk * softcap_scale) * scale_log2
    elif SCORE_MOD:
        qk = qk * scale_log2
    return qk


@triton.jit
def mask_scores(qk, qi, kj, self_pair, off, left, right, kv_end, alibi2, mask_ptrs, mask_ok,
                MASKED: tl.constexpr, BAND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, MASK_LOADED: tl.constexpr = False):
    """ALiBi, attn_mask and (MASKED: boundary tiles only) the positional masks of one tile:
    -inf where key kj may not be seen by query qi. MASK_LOADED: mask_ptrs is the mask tile
    itself (loaded through a tensor descriptor), not pointers to it."""
    if MASK_LOADED:
        mask_vals = mask_ptrs
    elif MASK_KIND != 0:
        mask_vals = tl.load(mask_ptrs, mask=mask_ok, other=0)
    if HAS_ALIBI:
        if self_pair:
            qk -= alibi2 * tl.abs((qi + off - kj).to(tl.float32))
    if MASK_KIND == MASK_FLOAT:
        qk += mask_vals.to(tl.float32) * LOG2E
    if MASK_KIND == MASK_BOOL:
        qk = tl.where(mask_vals != 0, qk, float("-inf"))
    if MASKED:
        ok = (kj < kv_end) & (qi >= 0)  # (qi >= 0: the full tile shape, for the band below)
        if BAND:
            if self_pair:
                d = kj - (qi + off)  # the key's distance from the (aligned) diagonal
                if right >= 0:
                    ok = ok & (d <= right)
                if left >= 0:
                    ok = ok & (d >= -left)
        qk = tl.where(ok, qk, float("-inf"))
    return qk


@triton.jit
def dropout_keep(seed, rng_offset, bh, rows, col0, Tq, Tk, dropout_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Philox keep mask of the tile of `rows` x columns [col0, col0 + BLOCK_N), col0 a multiple
    of 4: one Philox call per four elements (a counter per (batch*head, row, column // 4), its
    four outputs for the four columns), so the backward regenerates exactly the forward's mask."""
    col_group = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    counter = (bh.to(tl.int64) * Tq + rows[:, None]) * tl.cdiv(Tk, 4) + col_group[None, :] \
        + rng_offset
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [.., g, x, y] = r_(2x + y)
    uniform = tl.uint_to_uniform_float(tl.reshape(lanes, (BLOCK_M, BLOCK_N)))
    return uniform >= dropout_p


@triton.jit
def keep_mask_kernel(Keep, seed, rng_offset, dropout_p, Tq, Tk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug/test helper: writes the keep mask the kernels use, (B*Hq, Tq, Tk) as uint8."""
    bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_offset, bh, rows, col0, Tq, Tk, dropout_p, BLOCK_M, BLOCK_N)
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


@triton.jit
def query_stages(n_start, kv_end, q_len, self_pair, off, left, right,
                 BAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles of a key tile (the dK/dV kernel's loop), in three stages like key_stages:
    [m0, a) boundary, [a, b) full (every row sees every key of the tile), [b, hi) boundary."""
    n_last = n_start + BLOCK_N - 1
    lo = q_len * 0
    hi = q_len
    full_lo = lo
    full_hi = q_len
    if BAND:
        if self_pair:  # query i sees key j iff j - off - right <= i <= j - off + left
            if right >= 0:
                lo = tl.maximum(n_start - off - right, 0)
                full_lo = tl.maximum(n_last - off - right, 0)
            if left >= 0:
                hi = tl.minimum(hi, n_last - off + left + 1)
                full_hi = tl.minimum(full_hi, n_start - off + left + 1)
    if n_last >= kv_end:  # the tile holds keys past the end: every query tile is a boundary one
        full_hi = full_lo
    hi = tl.maximum(hi, lo)
    m0 = (lo // BLOCK_M) * BLOCK_M
    hi_ceil = tl.cdiv(hi, BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M) * BLOCK_M, m0), hi_ceil)
    b = tl.minimum(tl.maximum((tl.maximum(full_hi, 0) // BLOCK_M) * BLOCK_M, a), hi_ceil)
    return m0, a, b, hi


@triton.jit
def probs_from_lse(qk, qi, kj, lse2, self_pair, off, left, right, kv_end, alibi2,
                   scale_log2, softcap_scale, mask_ptrs, mask_ok,
                   MASKED: tl.constexpr, BAND: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   MASK_KIND: tl.constexpr, SOFTCAP: tl.constexpr):
    """The backward's recomputed weights exp(z - lse) of a tile (lse2: the saved log-sum-exp in
    log2 units, broadcast like the tile, minus the pair's bias), and dz/d(scale*q.k), the
    softcap derivative 1 - tanh^2 (1 without softcap)."""
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        z = t * scale_log2
        dcap = 1.0 - t * t
    else:
        z = qk * scale_log2
        dcap = 1.0
    if MASKED or HAS_ALIBI or MASK_KIND != 0:  # (a jit call costs the interpreter 1 ms)
        z = mask_scores(z, qi, kj, self_pair, off, left, right, kv_end, alibi2, mask_ptrs,
                        mask_ok, MASKED, BAND, HAS_ALIBI, MASK_KIND)
    return tl.exp2(z - lse2), dcap
