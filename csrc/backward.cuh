// Backward kernels (FlashAttention-2 style, two passes, no atomics on dQ):
//   dq_kernel:   query-major, like the forward: for each peer's key tiles recompute
//                P = exp(z - lse), dP = (dO * gate[s, p]) V^T, dS = P (dP - delta), then
//                dQ += dS K, and dbias[s, p] += sum dS.
//   dkdv_kernel: key-major: one block per key tile of stream p walks the query tiles of every
//                stream s that attends to p (causal self pair: only tiles at or below the
//                diagonal): S^T = K Q^T, P^T, dP^T = V (dO * gate[s, p])^T, dS^T, then
//                dV += P^T (dO * gate[s, p]), dK += dS^T Q.
// D > 128 (160, 192, 256): dK and dV of 16 keys x D channels per warp would not fit in
// registers, so the dK/dV grid has two blocks per key tile, each accumulating half of the
// channels (S^T and dP^T are formed in full by each).
//   bwd_fused_kernel (plain instantiation, D <= 128, not under deterministic algorithms):
//                FlashAttention-2's fused loop, dkdv_kernel's key-major walk plus dQ: dS goes
//                to shared memory and each warp adds dS K for 16 query rows into a float32
//                (B, Hq, Tq, D) buffer with atomics, 5 products per tile pair instead of 7.
// Registers of the key-major walk (no spill at D <= 128 on sm_80 to sm_120):
// the block's values in shared memory (KeyBlock), dP^T accumulated onto -delta, S^T / dP^T in
// query slices and dS over Q's first slice where that compiled spill-free (key_major_choice,
// per head dim and architecture), the Q/dO copies pointer-stepped (kOrdered).
// delta is the FlashAttention row term: rowsum(dO * O) (joint) or <dO * gate_p, U_p> per peer
// (computed by the forward kernel's recompute mode). dK/dV go to float32 accumulators: with GQA
// several query heads add into one key head (atomicAdd), else each element is stored once.
#pragma once
#include "kernel_common.cuh"

namespace peer_attention {

template <int D>
struct DqConfig {
  static constexpr int kBlockM = 64;                  // queries per block (4 warps x 16)
  static constexpr int kBlockN = D <= 128 ? 64 : 32;  // keys per tile
  template <typename T>
  static constexpr int smem_bytes() {
    return (2 * kBlockM * D + 4 * kBlockN * D) * sizeof(T) + D * sizeof(float) +
           2 * kMaxStreams * sizeof(int);
  }
};

// The key-major block's values that its loop needs once per tile or after the loop, kept in
// shared memory rather than registers (see key_major_backward)
struct KeyBlock {
  const void* q_base;   // Q and dO of the block's batch entry and query head
  const void* do_base;
  int64_t bh_row0;      // (b * q_heads + h) * total_q: row 0 of the (b, h) lse / delta / dQ rows
  int64_t out_row0;     // row of key key_row0 in dk_accum / dv_accum
  int rows;             // keys of the block inside the stream
  int channel0;         // the block's first dK/dV channel
  int group;            // query heads per key head (> 1: atomics)
  int kp, key_row0, limit, b, h;
};

template <int D>
struct DkdvConfig {
  static constexpr int kBlockN = 64;                  // keys per block (4 warps x 16)
  static constexpr int kBlockM = D <= 128 ? 64 : 32;  // queries per tile
  // dK/dV channels one block accumulates (16 keys x kAccDim of both per warp in registers)
  static constexpr int kAccDim = D <= 128 ? D : D / 2;
  static constexpr int kParts = D / kAccDim;
  static constexpr bool kBlockInSmem = D <= 128;  // a KeyBlock in shared memory
  template <typename T>
  static constexpr int smem_bytes() {
    return (2 * kBlockN * D + 4 * kBlockM * D) * sizeof(T) + (D + 4 * kBlockM) * sizeof(float) +
           2 * kMaxStreams * sizeof(int) + (kBlockInSmem ? sizeof(KeyBlock) : 0);
  }
};

// The fused backward (bwd_fused_kernel): dkdv_kernel's tiles plus a BN x BM tile of dS in
// shared memory, its own buffer at D <= 64, else written over the current Q stage once every
// warp is done with Q (D >= 96: BM x D >= BN x BM; one barrier more per tile, or none more with
// key_major_choice's ds_in_slice0). At D = 96 that is what compiled without spills on all six
// architectures (its own tile: 60-140 B), and it needs 8 KB less (2 blocks per SM on sm_80).
constexpr int kSmallSmemPerBlock = 101376;
template <int D>
struct FusedBwdConfig : DkdvConfig<D> {
  using Base = DkdvConfig<D>;
  static constexpr int kDqChunk = 32 < D ? 32 : D;  // dQ columns per chunk of atomics
  template <typename T>
  static constexpr bool own_ds() {
    return D <= 64 && Base::template smem_bytes<T>() + Base::kBlockN * Base::kBlockM * sizeof(T) <=
                          kSmallSmemPerBlock;
  }
  template <typename T>
  static constexpr int smem_bytes() {
    return Base::template smem_bytes<T>() +
           (own_ds<T>() ? Base::kBlockN * Base::kBlockM * static_cast<int>(sizeof(T)) : 0);
  }
};

// Index maps of the fused backward's dS tile and dQ atomics (host-callable:
// tests/cuda/test_fused_backward.py checks them on the CPU). lane = 4 g + t.
// - dS store: warp w holds dS^T (keys 16w.., queries 0..BM-1) as A fragments dsf[kk][r] of 16 x
//   16 blocks (pack_a of the C fragments): r = 0..3 -> key 16w + g + 8 (r & 1), queries
//   16 kk + 8 (r >> 1) + 2t and + 1. Stored [key][query] (rows of BM) at swizzle<BM>.
// - dQ = dS K: warp w owns queries 16w..16w+15; its A fragments of dS (query x key) are the
//   transposing ldmatrix of that [key][query] tile at load_b_from_nk's lane offsets (row base =
//   key k0, column base = query 16w): matrix m holds keys k0 + 8 (m >> 1) .., queries
//   16w + 8 (m & 1) .., transposed.
// - dQ atomics: C fragment nt of a chunk of columns from c0, element e -> query 16w + g + 8 (e >>
//   1), column c0 + 8 nt + 2t + (e & 1).
template <int BM>
struct FusedBwdMaps {
  __host__ __device__ static constexpr int ds_key(int warp, int lane, int r) {
    return warp * 16 + (lane >> 2) + 8 * (r & 1);
  }
  __host__ __device__ static constexpr int ds_query(int lane, int kk, int r) {
    return kk * 16 + 8 * (r >> 1) + (lane & 3) * 2;
  }
  // swizzle<BM>(ds_key, ds_query) as the lane's part XORed with a constant per (kk, r): rows of
  // BM = 64 elements (8 chunks, swizzle group 8) and ds_key & 7 = g, so the chunk (2 kk + (r >>
  // 1)) ^ g is (g << 3) ^ ((2 kk + (r >> 1)) << 3) in element bits 3..5, which the row part
  // (a multiple of 64) and 2t (bits 0..2) leave free
  static_assert(BM == 64, "dS tile rows of 8 chunks");
  __host__ __device__ static constexpr int ds_store_lane(int warp, int lane) {
    return (warp * 16 + (lane >> 2)) * BM + ((lane >> 2) << 3) + (lane & 3) * 2;
  }
  __host__ __device__ static constexpr int ds_store_at(int lane_part, int kk, int r) {
    return (lane_part ^ ((2 * kk + (r >> 1)) << 3)) + 8 * (r & 1) * BM;
  }
  __host__ __device__ static constexpr int ds_store_offset(int warp, int lane, int kk, int r) {
    return ds_store_at(ds_store_lane(warp, lane), kk, r);
  }
  // byte offset of the transposing ldmatrix for dQ's A fragment (keys k0.., queries 16 warp..)
  __host__ __device__ static constexpr int ds_load_bytes(int warp, int lane, int k0) {
    return LdsmOffsets<BM>::at(LdsmOffsets<BM>::b_nk(lane), k0, warp * 16);
  }
  __host__ __device__ static constexpr int dq_row(int warp, int lane, int e) {
    return warp * 16 + (lane >> 2) + 8 * (e >> 1);
  }
  __host__ __device__ static constexpr int dq_col(int lane, int c0, int nt, int e) {
    return c0 + nt * 8 + (lane & 3) * 2 + (e & 1);
  }
  // the kernel's form: element (dq_row(.., e), dq_col(.., c0, nt, e)) of a row-major tile with
  // D columns is row_base(e) * D + dq_col(lane, 0, 0, 0) + dq_at(c0, nt, e), row_base(e) the
  // lane's row dq_row(.., 0) + 8 (e >> 1)
  __host__ __device__ static constexpr int dq_at(int c0, int nt, int e) { return c0 + nt * 8 + (e & 1); }
};

// d mask of a mask broadcast over queries (dmask_strides[2] == 0; not under deterministic
// algorithms, whose buffer is dense): all query rows of a warp add into one element per key
// column, so the warp sums its 16 rows first (as the Triton backend sums rows before its
// atomics) and each column gets one atomic per warp instead of 16. In the C fragments (lane = 4
// g + t) element e of fragment nt is row g + 8 (e >> 1), column 8 nt + 2t + (e & 1): a lane
// first adds its two rows, value i = 2 nt + c of column 8 nt + 2t + c (n = BN / 4 values); the
// 8 lanes of one t (lane bits 2..4) then reduce-scatter them: at step s the lanes differing in
// bit 2 + s swap halves (the upper lane keeps the upper half, adds the partner's) over shuffle
// xor 4 << s, so after 3 steps each lane holds n / 8 complete column sums (BN = 64: 2 per lane,
// every lane adds 2 columns; 14 shuffles per warp). Host-callable: tests/cuda/
// test_dmask_columns.py runs these steps for 32 emulated lanes.
struct DmaskColumnSum {
  static constexpr int kSteps = 3;
  __host__ __device__ static constexpr int shuffle_mask(int step) { return 4 << step; }
  __host__ __device__ static constexpr bool upper(int lane, int step) {
    return (lane >> (2 + step)) & 1;
  }
  // of the n values still held at a step, pair k < n / 2 is (lo, hi) = (v[k], v[k + n / 2]):
  // the value a lane keeps and the one it sends (values, not addresses: a selected address into
  // the array would put it in local memory)
  __host__ __device__ static constexpr float kept(float lo, float hi, bool up) { return up ? hi : lo; }
  __host__ __device__ static constexpr float sent(float lo, float hi, bool up) { return up ? lo : hi; }
  // the key column of value i (2 nt + c) of the lane's row sums
  __host__ __device__ static constexpr int column_of(int lane, int i) {
    return 8 * (i >> 1) + 2 * (lane & 3) + (i & 1);
  }
  // the key column of the lane's k-th value after the steps (of n at the start)
  __host__ __device__ static constexpr int column(int lane, int n, int k) {
    return column_of(lane, k + n / 8 * (4 * upper(lane, 0) + 2 * upper(lane, 1) + upper(lane, 2)));
  }
};

// the reduce-scatter's step kStep and those after it, on the N values of v (a template per step:
// constant trip counts, so that v stays in registers)
template <int N, int kStep>
__device__ __forceinline__ void dmask_column_steps(float (&v)[N], int lane) {
  using Sum = DmaskColumnSum;
  if constexpr (kStep < Sum::kSteps) {
    constexpr int n = N >> kStep;
    const bool up = Sum::upper(lane, kStep);
#pragma unroll
    for (int k = 0; k < n / 2; ++k) {
      const float lo = v[k], hi = v[k + n / 2];
      v[k] = Sum::kept(lo, hi, up) +
             __shfl_xor_sync(0xffffffffu, Sum::sent(lo, hi, up), Sum::shuffle_mask(kStep));
    }
    dmask_column_steps<N, kStep + 1>(v, lane);
  }
}

// dS (C fragments of the warp's 16 rows x BN keys) summed over the rows into column j of
// `column0[j * column_stride]`, for the columns below `columns`; every lane of the warp calls it.
// Masked scores and rows past the stream hold dS = 0 exactly (P = 0, dP finite: the Q/dO and
// K/V rows past the data are zero-filled), as the dQ product relies on too.
template <int BN>
__device__ __forceinline__ void add_dmask_columns(float* column0, int64_t column_stride,
                                                  const float (&ds)[BN / 8][4], int columns,
                                                  int lane) {
  using Sum = DmaskColumnSum;
  constexpr int N = BN / 4;
  static_assert(N % 8 == 0, "whole columns after the reduce-scatter");
  float v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = ds[i >> 1][i & 1] + ds[i >> 1][(i & 1) + 2];  // rows g, g + 8
  dmask_column_steps<N, 0>(v, lane);
#pragma unroll
  for (int k = 0; k < N / 8; ++k) {
    const int j = Sum::column(lane, N, k);
    if (j < columns) atomicAdd(column0 + j * column_stride, v[k]);
  }
}

__device__ __forceinline__ int64_t lse_row_index(const AttentionParams& p, bool per_peer, int b,
                                                 int h, int peer, int packed_row) {
  const int64_t bh = static_cast<int64_t>(b) * p.q_heads + h;
  return per_peer ? (bh * p.num_streams + peer) * p.total_q + packed_row
                  : bh * p.total_q + packed_row;
}

template <int D, typename T, bool kFeatures, bool kMask>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(const AttentionParams p) {
  using Cfg = DqConfig<D>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* do_tile = q_tile + BM * D;
  T* k_tiles = do_tile + BM * D;   // 2 stages
  T* v_tiles = k_tiles + 2 * BN * D;  // 2 stages
  float* gate_s = reinterpret_cast<float*>(v_tiles + 2 * BN * D);
  int* limit_s = reinterpret_cast<int*>(gate_s + D);
  int* ntiles_s = limit_s + kMaxStreams;

  const int S = p.num_streams;
  const BlockCoord blk = unflatten_block(p.q_tile_offsets[S], p.q_heads);
  const int b = blk.batch, h = blk.head;
  const int s = stream_of_tile(p.q_tile_offsets, S, blk.tile);
  const int q_row0 = (blk.tile - p.q_tile_offsets[s]) * BM;
  const int q_len = p.q_offsets[s + 1] - p.q_offsets[s];
  const int q_first = p.q_offsets[s] + q_row0;
  const int hk = h / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t2 = (lane & 3) * 2;
  // compile-time feature switch (see forward_kernel): none of these in the plain instantiation
  const bool has_gate = kFeatures && p.gate != nullptr;
  const bool has_bias = kFeatures && p.bias != nullptr;
  const bool has_mask = kMask && p.mask != nullptr;  // kMask implies kFeatures
  const bool per_peer = kFeatures && p.per_peer;
  float* const dmask = kMask ? p.dmask : nullptr;
  float* const dbias = kFeatures ? p.dbias : nullptr;
  const bool dmask_by_column = kMask && p.dmask_strides[2] == 0;  // add_dmask_columns

  plan_peer_tiles(p, b, s, q_row0, BM, BN, tid, limit_s, ntiles_s);
  __syncthreads();

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
  const T* do_base = static_cast<const T*>(p.dout) +
                     (static_cast<int64_t>(b) * p.q_heads + h) * p.total_q * p.value_dim;

  auto load_kv = [&](int peer, int tile, int stage) {
    const int row0 = p.kv_offsets[peer] + tile * BN;
    const int rows = limit_s[peer] - tile * BN;
    load_tile_async<BN, D>(k_tiles + stage * BN * D, k_base + row0 * p.k_strides[2],
                           p.k_strides[2], rows, p.head_dim, static_cast<const T*>(p.k));
    load_tile_async<BN, D>(v_tiles + stage * BN * D, v_base + row0 * p.v_strides[2],
                           p.v_strides[2], rows, p.value_dim, static_cast<const T*>(p.v));
  };
  auto next_peer = [&](int from) {
    while (from < S && ntiles_s[from] == 0) ++from;
    return from;
  };

  const int local_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  bool row_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) row_ok[r] = q_row0 + local_row[r] < q_len;

  float dq[D / 8][4];
  zero(dq);
  float row_offset[2], row_delta[2];
  float bias_log2 = 0.f, dbias_part = 0.f;

  // one key tile of `peer` in shared-memory stage `stage`; (next, next_tile) is the tile after
  // it (next == S: none). kMasked = false: a tile inside the keys and below the diagonal of the
  // block's first row (unmasked_key_tiles), no per-score mask (plain instantiation only).
  auto step = [&](auto masked_step, int peer, int tile, int next, int next_tile, int stage) {
    constexpr bool kMasked = decltype(masked_step)::value;
    if (next < S) {
      load_kv(next, next_tile, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* k_tile = k_tiles + stage * BN * D;
    const T* v_tile = v_tiles + stage * BN * D;
    float sc[BN / 8][4];
    zero(sc);
    gemm_nt<BN, D, T>(sc, q_tile, warp * 16, nullptr, k_tile, nullptr, lane);
    float dp[BN / 8][4];
    zero(dp);
    gemm_nt<BN, D, T>(dp, do_tile, warp * 16, has_gate ? gate_s : nullptr, v_tile,
                      nullptr, lane);

    const int key0 = tile * BN, limit = limit_s[peer];
    const bool causal_pair = p.causal && peer == s;
    const int diag = causal_offset(p, s);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int j = key0 + nt * 8 + t2 + (e & 1);
        const int i = q_row0 + local_row[r];
        const bool masked = kMasked && (j >= limit || (causal_pair && j > i + diag));
        float x = sc[nt][e] * p.scale_log2 + bias_log2 - row_offset[r];
        if (has_mask && !masked && row_ok[r])
          x += mask_log2(p, b, h, q_first + local_row[r], p.kv_offsets[peer] + j);
        const float prob = masked ? 0.f : exp2f(x);
        const float ds = prob * (dp[nt][e] - row_delta[r]);
        dbias_part += ds;
        // d mask = dS, added at the mask's shape: a broadcast mask's (b, h, row) add into one
        // element; into a dense buffer (zeroed, one add per element) the add is a store
        if (dmask != nullptr && !dmask_by_column && !masked && row_ok[r])
          atomicAdd(dmask + b * p.dmask_strides[0] + h * p.dmask_strides[1] +
                        (q_first + local_row[r]) * p.dmask_strides[2] +
                        (p.kv_offsets[peer] + j) * p.dmask_strides[3],
                    ds);
        sc[nt][e] = ds;
      }
    }
    // a mask broadcast over queries: one add per key column per warp (warps with no row in
    // the stream skip it)
    if (dmask != nullptr && dmask_by_column && q_row0 + warp * 16 < q_len)
      add_dmask_columns<BN>(dmask + b * p.dmask_strides[0] + h * p.dmask_strides[1] +
                                (p.kv_offsets[peer] + key0) * p.dmask_strides[3],
                            p.dmask_strides[3], sc, limit - key0, lane);
    uint32_t dsf[BN / 16][4];
    pack_a<BN, T>(dsf, sc);
    gemm_rs<BN, D, D, T>(dq, dsf, k_tile, 0, nullptr, lane);

    if (dbias != nullptr && tile == ntiles_s[peer] - 1) {
      const float total = warp_sum(dbias_part);
      if (lane == 0) atomicAdd(dbias + pair_index(p, b, s, peer, h), total);
    }
    __syncthreads();
  };

  int peer = next_peer(0), stage = 0;
  if (peer < S) {
    load_tile_async<BM, D>(q_tile, q_base + q_first * p.q_strides[2], p.q_strides[2],
                           q_len - q_row0, p.head_dim, static_cast<const T*>(p.q));
    load_tile_async<BM, D>(do_tile, do_base + static_cast<int64_t>(q_first) * p.value_dim,
                           p.value_dim, q_len - q_row0, p.value_dim,
                           static_cast<const T*>(p.dout));
    load_kv(peer, 0, 0);
    cp_async_commit();
  }

  while (peer < S) {
    {  // a new peer: its gate, bias, lse and delta (after the previous step's closing barrier)
      const int64_t pair = pair_index(p, b, s, peer, h);
      if (has_gate) {  // read only through the gate pointer handed to the products
        for (int c = tid; c < D; c += kThreads)
          gate_s[c] = c < p.value_dim ? p.gate[pair * p.value_dim + c] : 1.f;
      }
      bias_log2 = has_bias ? p.bias[pair] * kLog2e : 0.f;
      dbias_part = 0.f;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t at = lse_row_index(p, per_peer, b, h, peer, q_first + local_row[r]);
        row_offset[r] = row_ok[r] ? lse_to_log2_offset(p.lse[at]) : INFINITY;
        row_delta[r] = row_ok[r] ? p.delta[at] : 0.f;
      }
    }
    const int ntiles = ntiles_s[peer];
    const int following = next_peer(peer + 1);
    int tile = 0;
    if constexpr (!kFeatures) {  // the main loop of the plain path: no per-score mask
      const int unmasked = unmasked_key_tiles(ntiles, limit_s[peer], p.causal && peer == s,
                                              q_row0, causal_offset(p, s), BN);
      for (; tile < unmasked; ++tile, stage ^= 1) {
        const bool last = tile + 1 == ntiles;
        step(MaskedStep<false>{}, peer, tile, last ? following : peer, last ? 0 : tile + 1,
             stage);
      }
    }
    for (; tile < ntiles; ++tile, stage ^= 1) {
      const bool last = tile + 1 == ntiles;
      step(MaskedStep<true>{}, peer, tile, last ? following : peer, last ? 0 : tile + 1, stage);
    }
    peer = following;
  }

  T* dq_out = static_cast<T*>(p.dq);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (!row_ok[r]) continue;
    const int64_t row = (static_cast<int64_t>(b) * p.q_heads + h) * p.total_q + q_first + local_row[r];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + t2;
      if (col < p.head_dim)
        *reinterpret_cast<uint32_t*>(dq_out + row * p.head_dim + col) =
            DTypeOps<T>::pack(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
    }
  }
}

// How the key-major walk spends its 255 registers, per kernel, head dim and architecture. At D
// >= 64 dK and dV (2 x NACC / 2 per thread), S^T and dP^T (BM / 2 each) and the fragments in
// flight fill the 255, and ptxas's allocation there is chaotic (the same source moves between 0
// and ~300 B of spills with unrelated edits), so the choices below were made on the compile
// report of all six architectures (docs/cuda.md, python -m peer_attention.cuda_compile_report);
// rerun it after any change to the walk.
struct KeyMajorChoice {
  bool block_in_smem;  // the loop reads the block's values (KeyBlock) from shared memory
  int slices;          // S^T and dP^T formed BM / slices query columns at a time
  bool ds_in_slice0;   // fused, dS not its own tile: dS over Q's first slice (slices == 2,
                       // BN x BM <= the slice), not held in registers until every slice is done
  // with ds_in_slice0, the order of the slices' products and dS stores (what ptxas allocates
  // without spills differs per architecture: docs/cuda.md):
  bool dk_first;  // slice 0 forms dK, then (after the barrier) stores dS, then forms dV: its dS
                  // fragments die before the dV product instead of after it
  bool ds_early;  // the second slice stores its dS before its dK and dV products
};
template <int D, bool kFeatures, bool kMask, bool kDq>
__device__ constexpr KeyMajorChoice key_major_choice() {
#ifdef __CUDA_ARCH__
  constexpr int arch = __CUDA_ARCH__;
#else
  constexpr int arch = 800;
#endif
  KeyMajorChoice c{D <= 128, 1, false, false, false};
  if (kDq && D == 96) c.slices = 2;
  if (kDq && D == 128) {
    c.slices = arch == 900 ? 1 : 2;
    c.block_in_smem = arch != 900;
    c.ds_in_slice0 = arch != 900;
    // the orders: sm_120 spills 60 B (2 LDL+STL per tile) without dk_first, sm_86/89 20 B
    // with it; with both, sm_80/100/120 are spill-free with the fewest loop instructions
    c.dk_first = c.ds_early = c.ds_in_slice0 && arch != 860 && arch != 890;
  }
  if (!kDq && D == 128) {  // dkdv_kernel
    c.block_in_smem = kMask;
    c.slices = kFeatures || arch >= 1000 ? 4 : 1;
  }
  // tuning hooks: -D... overrides every instantiation of a translation unit (compile one
  // instantiation per file, as the search behind the choices above did)
#ifdef PEER_ATTENTION_KM_BLOCK_IN_SMEM
  c.block_in_smem = PEER_ATTENTION_KM_BLOCK_IN_SMEM;
#endif
#ifdef PEER_ATTENTION_KM_SLICES
  c.slices = PEER_ATTENTION_KM_SLICES;
#endif
#ifdef PEER_ATTENTION_KM_DS_IN_SLICE0
  c.ds_in_slice0 = PEER_ATTENTION_KM_DS_IN_SLICE0;
#endif
#ifdef PEER_ATTENTION_KM_DK_FIRST
  c.dk_first = PEER_ATTENTION_KM_DK_FIRST;
#endif
#ifdef PEER_ATTENTION_KM_DS_EARLY
  c.ds_early = PEER_ATTENTION_KM_DS_EARLY;
#endif
  return c;
}

// The key-major walk of dkdv_kernel and bwd_fused_kernel (kDq: dQ too, plain path only).
template <int D, typename T, bool kFeatures, bool kMask, bool kDq>
__device__ __forceinline__ void key_major_backward(const AttentionParams& p) {
  using Cfg = DkdvConfig<D>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, NACC = Cfg::kAccDim;
  static_assert(!kDq || (!kFeatures && D <= 128 && BM == 16 * kWarps),
                "fused dQ: plain path, one 16-row slice of the query tile per warp");
  constexpr KeyMajorChoice kChoice = key_major_choice<D, kFeatures, kMask, kDq>();
  constexpr bool kOwnDs = kDq && FusedBwdConfig<D>::template own_ds<T>();
  static_assert(!kDq || kOwnDs || BM * D >= BN * BM, "dS fits in a Q stage");
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_tile = reinterpret_cast<T*>(smem);
  T* v_tile = k_tile + BN * D;
  T* q_tiles = v_tile + BN * D;      // 2 stages of BM x D
  T* do_tiles = q_tiles + 2 * BM * D;  // 2 stages
  T* ds_own = do_tiles + 2 * BM * D;   // fused, kOwnDs: BN x BM
  float* gate_s = reinterpret_cast<float*>(ds_own + (kOwnDs ? BN * BM : 0));
  float* offset_s = gate_s + D;      // 2 stages x BM: log2-domain lse of the query rows
  float* delta_s = offset_s + 2 * BM;  // 2 stages x BM
  int* first_s = reinterpret_cast<int*>(delta_s + 2 * BM);  // query tiles [first, end) per stream
  int* end_s = first_s + kMaxStreams;
  KeyBlock* block_s = reinterpret_cast<KeyBlock*>(end_s + kMaxStreams);  // D <= 128
  static_assert(!kChoice.block_in_smem || Cfg::kBlockInSmem, "a KeyBlock in shared memory");

  const int S = p.num_streams;
  const BlockCoord blk = unflatten_block(p.kv_tile_offsets[S], p.q_heads * Cfg::kParts);
  const int b = blk.batch, h = blk.head / Cfg::kParts;
  const int channel0 = (blk.head % Cfg::kParts) * NACC;  // the dK/dV channels of this block
  const int kp = stream_of_tile(p.kv_tile_offsets, S, blk.tile);  // the key stream
  const int key_row0 = (blk.tile - p.kv_tile_offsets[kp]) * BN;
  const int kv_len = p.kv_offsets[kp + 1] - p.kv_offsets[kp];
  const int limit = key_limit(p, b, kp);
  const int group = p.q_heads / p.kv_heads;
  const int hk = h / group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t2 = (lane & 3) * 2;
  // compile-time feature switch (see forward_kernel): none of these in the plain instantiation
  const bool has_gate = kFeatures && p.gate != nullptr;
  const bool has_bias = kFeatures && p.bias != nullptr;
  const bool has_mask = kMask && p.mask != nullptr;  // kMask implies kFeatures
  const bool per_peer = kFeatures && p.per_peer;

  const int64_t bh_row0 = (static_cast<int64_t>(b) * p.q_heads + h) * p.total_q;
  if (Cfg::kBlockInSmem && tid == 0) {
    *block_s = KeyBlock{static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1],
                      static_cast<const T*>(p.dout) + bh_row0 * p.value_dim, bh_row0,
                      (static_cast<int64_t>(b) * p.kv_heads + hk) * p.total_kv +
                          p.kv_offsets[kp] + key_row0,
                      kv_len - key_row0, channel0, group, kp, key_row0, limit, b, h};
  }
  if (tid < S) {
    const int q_len = p.q_offsets[tid + 1] - p.q_offsets[tid];
    const bool on = ((p.peer_rows[tid] >> kp) & 1u) && key_row0 < limit;
    // a causal self pair starts at the first query tile that sees key key_row0 (i >= j - off)
    first_s[tid] = (p.causal && tid == kp) ? max(key_row0 - causal_offset(p, kp), 0) / BM : 0;
    end_s[tid] = on ? (q_len + BM - 1) / BM : 0;
  }
  __syncthreads();

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* do_base = static_cast<const T*>(p.dout) + bh_row0 * p.value_dim;
  // a value of the block: read from shared memory where the loop keeps it there (kChoice)
#define PA_BLOCK(x) (kChoice.block_in_smem ? block_s->x : x)
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];

  auto next_stream = [&](int from) {
    while (from < S && first_s[from] >= end_s[from]) ++from;
    return from;
  };
  // stepped copies in the plain instantiation, per-chunk ones in the features one, by the
  // compiled code (hd128 fp16, cuda_compile_report, stepped vs per-chunk): plain sm_80 5.3 vs
  // 5.8 instructions per HMMA, spills 52 vs 96 B; sm_89 104 vs 352 B; features sm_89 19 vs 2
  // LDL+STL in the loop
  constexpr bool kStepped = !kFeatures;
  // plain: each copy's pointer stepped after it (one live pointer), D = 96 in column blocks
  // (load_tile_async's kOrdered; fewer registers and 1193 -> 868 loop instructions at D = 96)
  constexpr bool kOrderedCopy = kStepped;
  static_assert(BM <= kThreads, "one query row's lse and delta per thread");
  // Q and dO of a query tile by cp.async; its lse and delta (row tid) into registers: they are
  // stored to shared memory (store_rows) only after the current tile's products, so the global
  // load's latency hides behind them instead of stalling the tile's start
  auto load_q = [&](int qs, int tile, int stage, float2& rows) {
    const int q_len = p.q_offsets[qs + 1] - p.q_offsets[qs];
    const int row0 = tile * BM, packed0 = p.q_offsets[qs] + row0;
    const T* q_from = static_cast<const T*>(PA_BLOCK(q_base)) + packed0 * p.q_strides[2];
    const T* do_from = static_cast<const T*>(PA_BLOCK(do_base)) +
                       static_cast<int64_t>(packed0) * p.value_dim;
    load_tile_async<BM, D, T, kStepped, false, kOrderedCopy>(
        q_tiles + stage * BM * D, q_from, p.q_strides[2], q_len - row0, p.head_dim,
        static_cast<const T*>(p.q));
    load_tile_async<BM, D, T, kStepped, false, kOrderedCopy>(
        do_tiles + stage * BM * D, do_from, p.value_dim, q_len - row0, p.value_dim,
        static_cast<const T*>(p.dout));
    rows = make_float2(INFINITY, 0.f);  // rows past the stream: P = 0, delta = 0
    if (tid < BM && row0 + tid < q_len) {
      const int64_t at =
          lse_row_index(p, per_peer, PA_BLOCK(b), PA_BLOCK(h), PA_BLOCK(kp), packed0 + tid);
      rows = make_float2(p.lse[at], p.delta[at]);
    }
  };
  auto store_rows = [&](int stage, float2 rows) {  // log2-domain lse offset, -delta
    if (tid < BM) {
      offset_s[stage * BM + tid] = lse_to_log2_offset(rows.x);
      delta_s[stage * BM + tid] = -rows.y;  // dP^T's initial value (see step)
    }
  };

  float dk[NACC / 8][4], dv[NACC / 8][4];
  zero(dk);
  zero(dv);
  float bias_log2 = 0.f;
  const int local_key[2] = {warp * 16 + g, warp * 16 + g + 8};

  int qs = next_stream(0), tile = 0, stage = 0;
  if (qs < S) {
    tile = first_s[qs];
    const int rows = limit - key_row0;
    const int row0 = p.kv_offsets[kp] + key_row0;
    load_tile_async<BN, D>(k_tile, k_base + row0 * p.k_strides[2], p.k_strides[2], rows,
                           p.head_dim, static_cast<const T*>(p.k));
    load_tile_async<BN, D>(v_tile, v_base + row0 * p.v_strides[2], p.v_strides[2], rows,
                           p.value_dim, static_cast<const T*>(p.v));
    float2 first_rows;
    load_q(qs, tile, 0, first_rows);
    store_rows(0, first_rows);
    cp_async_commit();
  }

  // one query tile (qs, tile) in stage `stage`; (next, next_tile) is the tile after it (next ==
  // S: none). kMasked = false: the whole key block is inside the keys and visible to every row
  // of the tile (first_unmasked_query_tile), no per-score mask (plain instantiation only).
  auto step = [&](auto masked_step, int qs, int tile, int next, int next_tile, int stage) {
    constexpr bool kMasked = decltype(masked_step)::value;
    float2 next_rows;
    if (next < S) {
      load_q(next, next_tile, stage ^ 1, next_rows);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const T* q_tile = q_tiles + stage * BM * D;
    const T* do_tile = do_tiles + stage * BM * D;
    const float* offsets = offset_s + stage * BM;
    const float* deltas = delta_s + stage * BM;
    const float* gate = has_gate ? gate_s : nullptr;

    constexpr int kSlices = kChoice.slices;
    constexpr int SW = BM / kSlices;  // query columns per slice
    const bool causal_pair = p.causal && qs == PA_BLOCK(kp);
    const int diag = causal_offset(p, PA_BLOCK(kp));
    const int q_row0 = tile * BM;
    const int q_len_qs = p.q_offsets[qs + 1] - p.q_offsets[qs];
    using Maps = FusedBwdMaps<BM>;
    // dS^T to shared memory as [key][query] (fused): its own tile, or Q(stage) once every warp
    // is done reading Q (the dK products)
    [[maybe_unused]] T* ds_tile = kOwnDs ? ds_own : q_tiles + stage * BM * D;
    constexpr bool kDsInSlice0 = kDq && !kOwnDs && kChoice.ds_in_slice0;
    static_assert(!kDsInSlice0 || (kSlices == 2 && SW * D >= BN * BM), "dS fits Q's first slice");
    constexpr bool kDkFirst = kDsInSlice0 && kChoice.dk_first;  // see KeyMajorChoice
    constexpr bool kDsEarly = kDsInSlice0 && kChoice.ds_early;
    [[maybe_unused]] uint32_t ds_keep[kDq && !kOwnDs && !kDsInSlice0 ? BM / 16 : 1][4];
#pragma unroll
    for (int sl = 0; sl < kSlices; ++sl) {
      const int c0 = sl * SW;
      float st[SW / 8][4];  // S^T: rows = keys, columns = queries c0..
      zero(st);
      gemm_nt<SW, D, T>(st, k_tile, warp * 16, nullptr, q_tile + c0 * D, nullptr, lane);
      float dpt[SW / 8][4];  // dP^T - delta: the product accumulated onto -delta (deltas)
#pragma unroll
      for (int nt = 0; nt < SW / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[nt][e] = deltas[c0 + nt * 8 + t2 + (e & 1)];
      }
      gemm_nt<SW, D, T>(dpt, v_tile, warp * 16, nullptr, do_tile + c0 * D, gate, lane);

#pragma unroll
      for (int nt = 0; nt < SW / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = c0 + nt * 8 + t2 + (e & 1);
          const int j = PA_BLOCK(key_row0) + local_key[e >> 1];
          const int i = q_row0 + col;
          const bool masked = kMasked && (j >= PA_BLOCK(limit) || (causal_pair && j > i + diag));
          float x = st[nt][e] * p.scale_log2 + bias_log2 - offsets[col];
          if (has_mask && !masked && i < q_len_qs)
            x += mask_log2(p, PA_BLOCK(b), PA_BLOCK(h), p.q_offsets[qs] + i,
                           p.kv_offsets[PA_BLOCK(kp)] + j);
          const float prob = masked ? 0.f : exp2f(x);
          st[nt][e] = prob;
          dpt[nt][e] = prob * dpt[nt][e];  // dS^T = P^T (dP^T - delta)
        }
      }
      // both packed first: S^T and dP^T (fp32) die before the products
      uint32_t pf[SW / 16][4];
      pack_a<SW, T>(pf, st);
      uint32_t dsf[SW / 16][4];
      pack_a<SW, T>(dsf, dpt);
      // dS of the slice to shared memory (fused): kOwnDs and kDsInSlice0 store it now, else it
      // waits in registers for the last slice
      auto store_ds = [&]() {
        if constexpr (kDq) {
          const int ds_lane = Maps::ds_store_lane(warp, lane);
#pragma unroll
          for (int kk = 0; kk < SW / 16; ++kk) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              if constexpr (kOwnDs || kDsInSlice0)
                *reinterpret_cast<uint32_t*>(ds_tile + Maps::ds_store_at(ds_lane, c0 / 16 + kk, r)) =
                    dsf[kk][r];
              else
                ds_keep[c0 / 16 + kk][r] = dsf[kk][r];
            }
          }
        }
      };
      // kDsInSlice0: the dS tile goes over Q's first slice once every warp is done with it (S^T
      // and dK of slice 0 read it), so slice 0 stores after a barrier and slice 1 at any point
      if (kDsEarly && sl > 0) store_ds();
      if (kDkFirst && sl == 0) {
        gemm_rs<SW, D, NACC, T>(dk, dsf, q_tile + c0 * D, channel0, nullptr, lane);
        __syncthreads();
        store_ds();
        gemm_rs<SW, D, NACC, T>(dv, pf, do_tile + c0 * D, channel0, gate, lane);
      } else {
        gemm_rs<SW, D, NACC, T>(dv, pf, do_tile + c0 * D, channel0, gate, lane);
        gemm_rs<SW, D, NACC, T>(dk, dsf, q_tile + c0 * D, channel0, nullptr, lane);
        if (kDsInSlice0 && sl == 0) __syncthreads();
        if (!(kDsEarly && sl > 0)) store_ds();
      }
    }
    if constexpr (kDq) {
      if constexpr (!kOwnDs && !kDsInSlice0) {
        __syncthreads();
        const int ds_lane = Maps::ds_store_lane(warp, lane);
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
          for (int r = 0; r < 4; ++r)
            *reinterpret_cast<uint32_t*>(ds_tile + Maps::ds_store_at(ds_lane, kk, r)) =
                ds_keep[kk][r];
        }
      }
      __syncthreads();  // dS of every warp's keys is in shared memory
      // dQ (queries 16 warp.., D columns) += dS (16 x BN) K (BN x D), summed over the key blocks
      // by float32 atomics, a chunk of columns at a time (few registers beside dK and dV)
      uint32_t dsa[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        ldmatrix_x4_trans(dsa[kk], byte_offset(ds_tile, Maps::ds_load_bytes(warp, lane, kk * 16)));
      // rows past the stream (another stream's, or past the buffer) only in the last, partial
      // query tile, which always takes the masked step
      // a base pointer per row (dq_row(.., 0) and + 8, column 2t), every atomic of the lane at
      // a constant offset from it; unmasked steps: one pointer (+ 8 rows = + 8 D). In the masked
      // steps (the last query tile may be partial) a row past the stream (another stream's, or
      // past the buffer) adds an explicit 0 to the stream's last row instead: in bounds, no
      // branch per atomic, exact (x + 0 = x)
      const int i0 = tile * BM + Maps::dq_row(warp, lane, 0);
      const bool dq_row_ok[2] = {!kMasked || i0 < q_len_qs, !kMasked || i0 + 8 < q_len_qs};
      float* const dq_head = p.dq_accum + (PA_BLOCK(bh_row0) + p.q_offsets[qs]) * D +
                             Maps::dq_col(lane, 0, 0, 0);
      float* const dq_base[2] = {
          dq_head + static_cast<int64_t>(dq_row_ok[0] ? i0 : q_len_qs - 1) * D,
          kMasked ? dq_head + static_cast<int64_t>(dq_row_ok[1] ? i0 + 8 : q_len_qs - 1) * D
                  : dq_head + static_cast<int64_t>(i0 + 8) * D};
      constexpr int kChunk = FusedBwdConfig<D>::kDqChunk;
#pragma unroll
      for (int c0 = 0; c0 < D; c0 += kChunk) {
        float dq[kChunk / 8][4];
        zero(dq);
        gemm_rs<BN, D, kChunk, T>(dq, dsa, k_tile, c0, nullptr, lane);
#pragma unroll
        for (int nt = 0; nt < kChunk / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e)  // row dq_row(.., e), column dq_col(.., c0, nt, e)
            atomicAdd(dq_base[e >> 1] + Maps::dq_at(c0, nt, e), dq_row_ok[e >> 1] ? dq[nt][e] : 0.f);
        }
      }
    }
    // stage ^ 1's rows were last read before the previous iteration's closing barrier, and are
    // next read after this one's
    if (next < S) store_rows(stage ^ 1, next_rows);

    __syncthreads();
  };

  while (qs < S) {
    {  // a new query stream: its gate and bias on this key stream
      const int64_t pair = pair_index(p, PA_BLOCK(b), qs, PA_BLOCK(kp), PA_BLOCK(h));
      if (has_gate) {  // read only through the gate pointer handed to the products
        for (int c = tid; c < D; c += kThreads)
          gate_s[c] = c < p.value_dim ? p.gate[pair * p.value_dim + c] : 1.f;
      }
      bias_log2 = has_bias ? p.bias[pair] * kLog2e : 0.f;
    }
    const int end = end_s[qs];
    const int following = next_stream(qs + 1);
    const int following_tile = following < S ? first_s[following] : 0;
    // the masked tiles come first (the causal diagonal); the plain path runs the rest unmasked
    const int unmasked_from =
        kFeatures ? end
                  : first_unmasked_query_tile(tile, end, PA_BLOCK(key_row0), BN, PA_BLOCK(limit),
                                              p.causal && qs == PA_BLOCK(kp),
                                              causal_offset(p, PA_BLOCK(kp)), BM);
    // fused (dQ rows are written): a partial last query tile takes the masked step too; two
    // call sites of each step either way (a third copy of the step made ptxas spill)
    const int q_len_qs = p.q_offsets[qs + 1] - p.q_offsets[qs];
    const int unmasked_end = kDq && q_len_qs % BM != 0 ? end - 1 : end;
    int masked_end = unmasked_from;  // then, after the unmasked tiles, end
    while (true) {
      for (; tile < masked_end; ++tile, stage ^= 1) {
        const bool last = tile + 1 == end;
        step(MaskedStep<true>{}, qs, tile, last ? following : qs,
             last ? following_tile : tile + 1, stage);
      }
      if (kFeatures || tile >= end) break;
      if constexpr (!kFeatures) {  // the main loop of the plain path
        for (; tile < unmasked_end; ++tile, stage ^= 1) {
          const bool last = tile + 1 == end;
          step(MaskedStep<false>{}, qs, tile, last ? following : qs,
               last ? following_tile : tile + 1, stage);
        }
      }
      masked_end = end;
    }
    qs = following;
    tile = following_tile;
  }

  // every key row of the tile gets its gradient written (zero when no query saw it). D <= 128:
  // the block's rows from shared memory and the lane's from threadIdx anew, so that none of
  // them holds a register through the loop (the loop's closing barrier orders the read)
  const int lane_e = threadIdx.x & 31;
  const int t2_e = (lane_e & 3) * 2, key_e = (threadIdx.x >> 5) * 16 + (lane_e >> 2);
  const KeyBlock out = Cfg::kBlockInSmem
                           ? *block_s
                           : KeyBlock{nullptr, nullptr, bh_row0,
                                      (static_cast<int64_t>(b) * p.kv_heads + hk) * p.total_kv +
                                          p.kv_offsets[kp] + key_row0,
                                      kv_len - key_row0, channel0, group, kp, key_row0, limit,
                                      b, h};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key_e + 8 * r;  // key key_row0 + j
    if (j >= out.rows) continue;
    const int64_t row = out.out_row0 + j;
#pragma unroll
    for (int dt = 0; dt < NACC / 8; ++dt) {
      const int col = out.channel0 + dt * 8 + t2_e;
      if (col < p.head_dim) {
        float* at = p.dk_accum + row * p.head_dim + col;
        const float x = dk[dt][2 * r] * p.scale, y = dk[dt][2 * r + 1] * p.scale;
        if (out.group > 1) {
          atomicAdd(at, x);
          atomicAdd(at + 1, y);
        } else {
          *reinterpret_cast<float2*>(at) = make_float2(x, y);
        }
      }
      if (col < p.value_dim) {
        float* at = p.dv_accum + row * p.value_dim + col;
        if (out.group > 1) {
          atomicAdd(at, dv[dt][2 * r]);
          atomicAdd(at + 1, dv[dt][2 * r + 1]);
        } else {
          *reinterpret_cast<float2*>(at) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
        }
      }
    }
  }
#undef PA_BLOCK
}

template <int D, typename T, bool kFeatures, bool kMask>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(const AttentionParams p) {
  key_major_backward<D, T, kFeatures, kMask, false>(p);
}

// FlashAttention-2's fused backward: dK, dV and (by atomics into p.dq_accum) dQ in one loop
template <int D, typename T>
__global__ void __launch_bounds__(kThreads, 1) bwd_fused_kernel(const AttentionParams p) {
  key_major_backward<D, T, false, false, true>(p);
}

template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_backward_dq_variant(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = DqConfig<D>;
  return launch_over_tiles(dq_kernel<D, T, kFeatures, kMask>, params, TileRows::kQuery,
                           Cfg::kBlockM, Cfg::template smem_bytes<T>(), 1, stream);
}

template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_backward_dkdv_variant(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = DkdvConfig<D>;
  return launch_over_tiles(dkdv_kernel<D, T, kFeatures, kMask>, params, TileRows::kKey,
                           Cfg::kBlockN, Cfg::template smem_bytes<T>(), Cfg::kParts, stream);
}

template <int D, typename T>
cudaError_t run_backward_fused(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = FusedBwdConfig<D>;
  return launch_over_tiles(bwd_fused_kernel<D, T>, params, TileRows::kKey,
                           Cfg::kBlockN, Cfg::template smem_bytes<T>(), 1, stream);
}

}  // namespace peer_attention
