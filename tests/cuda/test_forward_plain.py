"""The plain forward kernel of csrc/forward_plain.cuh (FlashAttention-2's 128 x 64 tiles, 32
query rows per warp), checked without a GPU:

- its index math, compiled from the kernel headers as a host program with nvcc: the ldmatrix
  byte offsets (LdsmOffsets, one XOR per k step; at_aligned, the XOR on a 128-byte aligned
  shared-memory address) equal the swizzled element offsets that
  load_a / load_b_from_nk / load_b_from_kn use, for every lane, row base and k step; the 128-row
  Q tile copy covers every chunk once; unmasked_key_tiles (forward, dQ) and
  first_unmasked_query_tile (dK/dV) never leave a score unmasked that the per-element mask (kv
  length, causal diagonal) would hide;
- its algorithm, emulated in numpy on the tile schedule the kernel runs (per peer: unmasked
  tiles, then masked ones; running max on the raw scores, the scale folded into the exponent,
  rescale by alpha, rows that see no key give 0 and lse = -inf) against a dense softmax;
- the shared-memory swizzle: every ldmatrix phase of every kernel head dim is free of bank
  conflicts;
- the fragment ownership: the C fragments of 4 warps x 2 row tiles cover the 128 x D output
  block once.
"""
import math
import shutil

import numpy as np
import pytest

from tests.cuda.host_program import host_program_output

PROGRAM = r"""
#include <cstdio>
#include <set>
#include <utility>
#include "kernel_common.cuh"
using namespace peer_attention;

// the element offsets load_a, load_b_from_nk and load_b_from_kn hand to ldmatrix
template <int D> int a_generic(int lane, int row0, int k0) {
  return swizzle<D>(row0 + (lane & 15), k0 + ((lane >> 4) << 3));
}
template <int D> int b_nk_generic(int lane, int n0, int k0) {
  return swizzle<D>(n0 + (lane & 7) + ((lane >> 4) << 3), k0 + (((lane >> 3) & 1) << 3));
}
template <int D> int b_kn_generic(int lane, int k0, int n0) {
  return swizzle<D>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), n0 + ((lane >> 4) << 3));
}

template <int D> int check_offsets(int rows) {
  using Off = LdsmOffsets<D>;
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int row = 0; row < rows; row += 16)
      for (int k = 0; k < D; k += 16) {
        bad += Off::at(Off::a(lane), row, k) != 2 * a_generic<D>(lane, row, k);
        bad += Off::at(Off::b_nk(lane), row, k) != 2 * b_nk_generic<D>(lane, row, k);
        // b_kn: row base = k step of the product (rows of V), k = its output column base
        bad += Off::at(Off::b_kn(lane), row, k) != 2 * b_kn_generic<D>(lane, row, k);
      }
  std::printf("offsets %d %d\n", D, bad);
  return bad != 0;
}

// LdsmOffsets::at_aligned (the plain forward's Q fragments on sm_90+, qk_rows): on a 128-byte
// aligned tile address, the kernel's ldmatrix address equals the tile address plus the swizzled
// offset, for every lane, warp row base, row tile and k step (bases as on sm_80 and sm_90)
template <int D> int check_aligned() {
  using Off = LdsmOffsets<D>;
  const uint32_t bases[] = {0u, 128u, 0x400u, 0x400u + (5u << 24), 0x8000u + 0x400u};
  int bad = 0;
  for (uint32_t base : bases)
    for (int lane = 0; lane < 32; ++lane)
      for (int q_row = 0; q_row < 128; q_row += 32)
        for (int mt = 0; mt < 2; ++mt)
          for (int k = 0; k < D; k += 16) {
            const uint32_t q_lane = base + static_cast<uint32_t>(Off::a(lane) + q_row * 2 * D);
            bad += Off::at_aligned(q_lane, 16 * mt, k) !=
                   base + static_cast<uint32_t>(2 * a_generic<D>(lane, q_row + 16 * mt, k));
          }
  std::printf("aligned %d %d\n", D, bad);
  return bad != 0;
}

template <int ROWS, int D> int check_copy() {
  using Copy = TileCopy<ROWS, D>;
  std::set<std::pair<int, int>> chunks;
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < Copy::kCopies; ++i) chunks.insert({Copy::row(tid, i), Copy::col(tid)});
  const bool ok = !Copy::kFixedColumn ||
                  (chunks.size() == size_t(ROWS) * (D / 8) && kThreads * Copy::kCopies == ROWS * D / 8);
  std::printf("copy %d %d %d\n", ROWS, D, ok ? 0 : 1);
  return !ok;
}

// unmasked_key_tiles: sound (no key of an unmasked tile is masked for any row of the block) and
// the tiles after it are all visited by the masked loop (n <= ntiles)
int check_tiles() {
  const int BM = 128, BN = 64;
  int bad = 0, cases = 0;
  for (int kv_len = 0; kv_len <= 5 * BN + 3; kv_len += 7)
    for (int q_len = 1; q_len <= 3 * BM + 5; q_len += 29)
      for (int cut = -1; cut <= kv_len; cut += 1 + kv_len / 5)  // kv_lengths: -1 = none
        for (int causal = 0; causal < 2; ++causal)
          for (int bottom_right = 0; bottom_right < 2; ++bottom_right)
            for (int q_row0 = 0; q_row0 < q_len; q_row0 += BM / 2) {  // forward 128, dQ 64
              const int limit = cut < 0 ? kv_len : (cut < kv_len ? cut : kv_len);
              const int diag = bottom_right ? kv_len - q_len : 0;
              int reach = limit;
              if (causal) {
                reach = q_row0 + BM + diag;
                reach = reach < limit ? reach : limit;
                reach = reach > 0 ? reach : 0;
              }
              const int ntiles = (reach + BN - 1) / BN;
              const int n = unmasked_key_tiles(ntiles, limit, causal, q_row0, diag, BN);
              ++cases;
              if (n < 0 || n > ntiles) { ++bad; continue; }
              for (int t = 0; t < n; ++t)
                for (int j = t * BN; j < (t + 1) * BN; ++j)
                  for (int i = q_row0; i < q_row0 + BM; ++i) {
                    const bool masked = j >= limit || (causal && j > i + diag);
                    bad += masked;
                  }
            }
  std::printf("tiles %d %d\n", cases, bad);
  return bad != 0;
}

// bank conflicts of ldmatrix: each 8-lane phase reads 8 rows of 16 bytes; conflict-free when
// their 16-byte bank groups ((byte offset / 16) % 8) are distinct
template <int D> int check_banks() {
  int worst = 1;
  for (int row0 = 0; row0 < 64; row0 += 16)
    for (int k = 0; k < D; k += 16)
      for (int kind = 0; kind < 3; ++kind)
        for (int phase = 0; phase < 4; ++phase) {
          int count[8] = {0};
          for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane) {
            const int at = kind == 0 ? a_generic<D>(lane, row0, k)
                         : kind == 1 ? b_nk_generic<D>(lane, row0, k) : b_kn_generic<D>(lane, row0, k);
            const int group = (at * 2 / 16) % 8;
            if (++count[group] > worst) worst = count[group];
          }
        }
  std::printf("banks %d %d\n", D, worst);
  return worst != 1;
}

// first_unmasked_query_tile (dK/dV, 64 keys x 64 queries): sound, and within [first, end]
int check_query_tiles() {
  const int BN = 64, BM = 64;
  int bad = 0, cases = 0;
  for (int kv_len = 1; kv_len <= 4 * BN + 3; kv_len += 11)
    for (int q_len = 1; q_len <= 5 * BM + 5; q_len += 23)
      for (int cut = -1; cut <= kv_len; cut += 1 + kv_len / 4)
        for (int causal = 0; causal < 2; ++causal)
          for (int bottom_right = 0; bottom_right < 2; ++bottom_right)
            for (int key_row0 = 0; key_row0 < kv_len; key_row0 += BN) {
              const int limit = cut < 0 ? kv_len : (cut < kv_len ? cut : kv_len);
              const int diag = bottom_right ? kv_len - q_len : 0;
              if (key_row0 >= limit) continue;  // the kernel visits no tile then
              int first = causal ? key_row0 - diag : 0;
              first = (first > 0 ? first : 0) / BM;
              const int end = (q_len + BM - 1) / BM;
              const int from = first_unmasked_query_tile(first, end, key_row0, BN, limit, causal,
                                                         diag, BM);
              ++cases;
              if (from < first && first <= end) { ++bad; continue; }
              if (from > end && first <= end) { ++bad; continue; }
              for (int t = from; t < end; ++t)
                for (int i = t * BM; i < (t + 1) * BM; ++i)
                  for (int j = key_row0; j < key_row0 + BN; ++j)
                    bad += j >= limit || (causal && j > i + diag);
            }
  std::printf("query_tiles %d %d\n", cases, bad);
  return bad != 0;
}

int main() {
  int failed = check_offsets<32>(128) + check_offsets<64>(128) + check_offsets<96>(128) +
               check_offsets<128>(128) + check_offsets<160>(64) + check_offsets<192>(64) +
               check_offsets<256>(64);
  failed += check_banks<32>() + check_banks<64>() + check_banks<96>() + check_banks<128>() +
            check_banks<160>() + check_banks<192>() + check_banks<256>();
  failed += check_copy<128, 32>() + check_copy<128, 64>() + check_copy<128, 128>() +
            check_copy<128, 96>();
  failed += check_aligned<32>() + check_aligned<64>() + check_aligned<96>() +
            check_aligned<128>();
  failed += check_tiles() + check_query_tiles();
  return failed;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_index_math_on_the_host(tmp_path):
    stdout = host_program_output(tmp_path, "forward_plain_host", PROGRAM)
    lines = stdout.split("\n")
    assert all(f"offsets {d} 0" in lines for d in (32, 64, 96, 128, 160, 192, 256)), stdout
    assert all(f"copy 128 {d} 0" in lines for d in (32, 64, 96, 128))
    assert all(f"aligned {d} 0" in lines for d in (32, 64, 96, 128)), stdout
    # no ldmatrix bank conflicts at any kernel head dim (32 and 96 had 2-way ones)
    assert all(f"banks {d} 1" in lines for d in (32, 64, 96, 128, 160, 192, 256)), \
        stdout
    for kind in ("tiles", "query_tiles"):  # sound tile splits, many cases each
        cases = [line for line in lines if line.startswith(kind + " ")]
        assert cases and int(cases[0].split()[1]) > 1000 and cases[0].endswith(" 0"), stdout


def test_fragment_ownership_covers_the_block_once():
    for d in (32, 64, 96, 128):
        owner = np.zeros((128, d), dtype=int)
        for warp in range(4):
            for lane in range(32):
                g, t2 = lane >> 2, (lane & 3) * 2
                for mt in range(2):
                    for r in range(2):
                        row = warp * 32 + 16 * mt + g + 8 * r
                        for dt in range(d // 8):
                            owner[row, dt * 8 + t2] += 1
                            owner[row, dt * 8 + t2 + 1] += 1
        assert (owner == 1).all()


def unmasked_key_tiles(ntiles, limit, causal_pair, q_row0, diag, block_keys):
    """csrc/kernel_common.cuh's unmasked_key_tiles (C integer division on non-negatives)."""
    n = min(limit // block_keys, ntiles)
    if causal_pair:
        reach = q_row0 + diag + 1
        n = min(n, reach // block_keys if reach > 0 else 0)
    return max(n, 0)


def emulate_block(q, k, v, scale, q_row0, limit, causal, diag, BM=128, BN=64):
    """The plain kernel's schedule and arithmetic for one block and one peer (float64)."""
    rows = np.arange(q_row0, q_row0 + BM)
    c = scale * math.log2(math.e)
    reach = limit
    if causal:
        reach = max(min(reach, q_row0 + BM + diag), 0)
    ntiles = (reach + BN - 1) // BN
    unmasked = unmasked_key_tiles(ntiles, limit, causal, q_row0, diag, BN)
    qb = np.zeros((BM, q.shape[1]))
    valid_rows = min(BM, q.shape[0] - q_row0)
    qb[:valid_rows] = q[q_row0:q_row0 + valid_rows]
    acc = np.zeros((BM, v.shape[1]))
    row_max = np.full(BM, -np.inf)
    row_sum = np.zeros(BM)
    for tile in range(ntiles):
        keys = np.arange(tile * BN, (tile + 1) * BN)
        kt = np.zeros((BN, k.shape[1]))
        vt = np.zeros((BN, v.shape[1]))
        ok = keys < min(limit, k.shape[0])
        kt[ok] = k[keys[ok]]
        vt[ok] = v[keys[ok]]
        if tile >= unmasked:  # the masked step zero-fills V rows past the limit
            kt[~ok] = np.nan  # K rows past the limit: whatever memory holds; masked below
        sc = qb @ kt.T
        if tile >= unmasked:
            masked = (keys[None, :] >= limit) | (causal & (keys[None, :] > rows[:, None] + diag))
            sc = np.where(masked, -np.inf, sc)
        else:
            assert not ((keys[None, :] >= limit) |
                        (causal & (keys[None, :] > rows[:, None] + diag))).any()
        new_max = np.maximum(row_max, sc.max(axis=1))
        base = np.where(new_max == -np.inf, 0.0, new_max * c)
        with np.errstate(invalid="ignore"):
            alpha = np.exp2(row_max * c - base)
        pr = np.exp2(sc * c - base[:, None])
        acc = acc * alpha[:, None] + pr @ vt
        row_sum = row_sum * alpha + pr.sum(axis=1)
        row_max = new_max
    inv = np.where(row_sum > 0, 1 / np.where(row_sum > 0, row_sum, 1), 0)
    lse = np.where(row_sum > 0, (row_max * c + np.log2(np.where(row_sum > 0, row_sum, 1))) *
                   math.log(2), -np.inf)
    return (acc * inv[:, None])[:valid_rows], lse[:valid_rows]


@pytest.mark.parametrize("q_len,kv_len,cut,causal,bottom_right,scale", [
    (200, 300, None, False, False, 0.125), (200, 300, None, True, False, 0.125),
    (200, 130, None, True, True, 0.3), (300, 200, 77, False, False, 0.09),
    (128, 64, None, True, False, 1.0), (256, 10, 0, True, True, 0.2),
    (70, 513, 400, True, True, 0.125),
])
def test_tile_schedule_matches_dense_softmax(q_len, kv_len, cut, causal, bottom_right, scale):
    rng = np.random.default_rng(q_len * 7 + kv_len)
    d = 32
    q = rng.standard_normal((q_len, d)) * 2
    k = rng.standard_normal((kv_len, d)) * 2
    v = rng.standard_normal((kv_len, d))
    limit = kv_len if cut is None else min(cut, kv_len)
    diag = kv_len - q_len if bottom_right else 0
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    visible = (j < limit) & (~causal | (j <= i + diag))
    s = np.where(visible, scale * (q @ k.T), -np.inf)
    m = s.max(axis=1, keepdims=True)
    seen = np.isfinite(m[:, 0])
    p = np.where(visible, np.exp(s - np.where(seen[:, None], m, 0)), 0)
    l_sum = p.sum(axis=1)
    want = np.where(seen[:, None], p @ v / np.where(seen, l_sum, 1)[:, None], 0)
    want_lse = np.where(seen, np.log(np.where(seen, l_sum, 1)) + np.where(seen, m[:, 0], 0),
                        -np.inf)
    for q_row0 in range(0, q_len, 128):
        out, lse = emulate_block(q, k, v, scale, q_row0, limit, causal, diag)
        rows = slice(q_row0, q_row0 + out.shape[0])
        np.testing.assert_allclose(out, want[rows], atol=1e-9)
        np.testing.assert_allclose(lse, want_lse[rows], atol=1e-9)


# --- the feature switches (gate, bias, peer mode) --------------------------------------------

def emulate_featured(q, peers, scale, gate, bias, per_peer, BN=64):
    """forward_plain_kernel's arithmetic with the switches on, for one block's rows (float64):
    peers: [(k, v, visible (rows x keys) bool)] in visit order; gate: per peer a (Ev,) vector or
    None; bias: per peer a scalar or None. Joint gate: V scaled by m = gate / 2^exp (exp per
    peer from frexp of max |gate|), acc rescaled by 2^(old - new) at each peer's start and by
    2^exp at the end; bias: the running max on z = c S + b (log2 domain); peer mode: a fresh
    state per peer, folded into out at its end (out += gate * acc / l, lse_p)."""
    c = scale * math.log2(math.e)
    rows, ev = q.shape[0], peers[0][1].shape[1]
    acc = np.zeros((rows, ev))
    out = np.zeros((rows, ev))
    row_max, row_sum = np.full(rows, -np.inf), np.zeros(rows)
    exp, lses = 0, []
    for p, (k, v, visible) in enumerate(peers):
        g = gate[p] if gate is not None else np.ones(ev)
        b2 = bias[p] * math.log2(math.e) if bias is not None else 0.0
        if gate is not None and not per_peer:
            gmax = np.abs(g).max()
            new_exp = math.frexp(gmax)[1] if 0 < gmax < np.inf else 0
            acc = acc * 2.0 ** (exp - new_exp)
            exp, m = new_exp, np.ldexp(g, -new_exp)
            assert np.abs(m).max() < 1
        else:
            m = np.ones(ev)
        for t in range(0, k.shape[0], BN):
            sc = q @ k[t:t + BN].T
            sc = np.where(visible[:, t:t + BN], sc, -np.inf)
            with np.errstate(invalid="ignore"):
                if bias is not None:
                    new_max = np.maximum(row_max, sc.max(axis=1) * c + b2)
                    base = np.where(new_max == -np.inf, 0.0, new_max)
                    alpha = np.exp2(row_max - base)
                    pr = np.exp2(sc * c + (b2 - base)[:, None])
                else:
                    new_max = np.maximum(row_max, sc.max(axis=1))
                    base = np.where(new_max == -np.inf, 0.0, new_max * c)
                    alpha = np.exp2(row_max * c - base)
                    pr = np.exp2(sc * c - base[:, None])
            acc = acc * alpha[:, None] + pr @ (v[t:t + BN] * m[None, :])
            row_sum = row_sum * alpha + pr.sum(axis=1)
            row_max = new_max
        if per_peer:
            m2 = row_max if bias is not None else row_max * c
            inv = np.where(row_sum > 0, 1 / np.where(row_sum > 0, row_sum, 1), 0)
            out += acc * inv[:, None] * g[None, :]
            lses.append(np.where(row_sum > 0, (m2 + np.log2(np.where(row_sum > 0, row_sum, 1)))
                                 * math.log(2), -np.inf))
            acc[:], row_max[:], row_sum[:] = 0, -np.inf, 0
    if per_peer:
        return out, np.stack(lses)
    m2 = row_max if bias is not None else row_max * c
    inv = np.where(row_sum > 0, 2.0 ** exp / np.where(row_sum > 0, row_sum, 1), 0)
    lse = np.where(row_sum > 0, (m2 + np.log2(np.where(row_sum > 0, row_sum, 1))) * math.log(2),
                   -np.inf)
    return acc * inv[:, None], lse


def dense_peer_attention(q, peers, scale, gate, bias, per_peer):
    """MATH.md: z_pj = scale q.k + bias_p; joint: one softmax over every peer's keys, O = sum_p
    gate_p * (P_p V_p); peer: a softmax per peer, O = sum_p gate_p * softmax_p V_p."""
    ev = peers[0][1].shape[1]
    zs = [np.where(vis, scale * (q @ k.T) + (bias[p] if bias is not None else 0.0), -np.inf)
          for p, (k, v, vis) in enumerate(peers)]
    gates = [gate[p] if gate is not None else np.ones(ev) for p in range(len(peers))]

    def softmax_parts(parts):
        m = np.max([z.max(axis=1) for z in parts], axis=0)
        seen = np.isfinite(m)
        ms = np.where(seen, m, 0)[:, None]
        ex = [np.where(np.isfinite(z), np.exp(z - ms), 0) for z in parts]
        total = sum(e.sum(axis=1) for e in ex)
        lse = np.where(seen, np.log(np.where(seen, total, 1)) + ms[:, 0], -np.inf)
        return [e / np.where(seen, total, 1)[:, None] for e in ex], lse

    if per_peer:
        out, lses = 0, []
        for z, (k, v, vis), g in zip(zs, peers, gates):
            (pr,), lse = softmax_parts([z])
            out = out + (pr @ v) * g[None, :]
            lses.append(lse)
        return out, np.stack(lses)
    prs, lse = softmax_parts(zs)
    return sum((pr @ v) * g[None, :] for pr, (k, v, vis), g in zip(prs, peers, gates)), lse


@pytest.mark.parametrize("per_peer", [False, True])
@pytest.mark.parametrize("with_gate,with_bias", [(True, False), (False, True), (True, True)])
def test_feature_switches_match_the_dense_formulas(per_peer, with_gate, with_bias):
    rng = np.random.default_rng(3 + 2 * per_peer + with_gate + 4 * with_bias)
    rows, d, ev, scale = 128, 32, 24, 0.2
    q = rng.standard_normal((rows, d)) * 2
    peers = []
    for n, limit, causal in ((150, 150, True), (70, 33, False), (64, 64, False), (200, 0, False)):
        k = rng.standard_normal((n, d)) * 2
        v = rng.standard_normal((n, ev))
        i, j = np.arange(rows)[:, None], np.arange(n)[None, :]
        peers.append((k, v, (j < limit) & (~causal | (j <= i + 10))))
    # gates whose max |gate| spans exponents (the joint rescale at each peer's start), a zero
    # gate, a peer whose bias hides it (-inf), a peer with no visible key
    gate = [rng.uniform(0.5, 1.5, ev) * 1e3, rng.uniform(-2, 2, ev) * 1e-3, np.zeros(ev),
            rng.uniform(0.5, 1.5, ev)] if with_gate else None
    bias = [0.7, -3.0, -np.inf, 1.0] if with_bias else None
    got, got_lse = emulate_featured(q, peers, scale, gate, bias, per_peer)
    want, want_lse = dense_peer_attention(q, peers, scale, gate, bias, per_peer)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    np.testing.assert_allclose(got_lse, want_lse, atol=1e-9)
