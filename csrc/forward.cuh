// Forward kernel (FlashAttention-2 style) with in-kernel peer weighting, and its "recompute"
// mode used by the backward.
//
// One block = one tile of kBlockM query rows of stream s, one query head, one batch entry; its 4
// warps own 16 rows each. The block walks the key tiles of every peer p of s (the peer table
// says which), prefetching the next tile with cp.async while it computes the current one:
//   S = Q K^T (mma.sync), z = scale * S + bias[s, p], masked (kv_lengths, causal self pair)
//   joint:  one online softmax over all peers' keys; acc = acc * alpha + (P V) * gate[s, p]
//   peer:   an online softmax per peer; at the peer's end out_accum += gate[s, p] * acc / l
//   recompute (backward): P = exp(z - saved lse) with no running max; at each peer's end
//           U_p = acc gives dgate[s, p] += sum_rows dO * U_p and, in peer mode,
//           delta_p = <dO * gate[s, p], U_p> per row.
// Causal self pairs stop at the last key a row of the tile can see (tile skipping).
#pragma once
#include "forward_plain.cuh"
#include "kernel_common.cuh"

namespace peer_attention {

template <int D>
struct ForwardConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kStages = 2;
  template <typename T>
  static constexpr int smem_bytes() {
    return (kBlockM * D + 2 * kStages * kBlockN * D) * sizeof(T) + D * sizeof(float) +
           2 * kMaxStreams * sizeof(int);
  }
};

template <int D, typename T, bool kFeatures, bool kMask>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const AttentionParams p) {
  using Cfg = ForwardConfig<D>;
  using Ops = DTypeOps<T>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);
  T* k_tiles = q_tile + BM * D;                      // kStages x BN x D
  T* v_tiles = k_tiles + Cfg::kStages * BN * D;      // kStages x BN x D
  float* gate_s = reinterpret_cast<float*>(v_tiles + Cfg::kStages * BN * D);  // D
  int* limit_s = reinterpret_cast<int*>(gate_s + D);  // keys per stream for this batch entry
  int* ntiles_s = limit_s + kMaxStreams;             // key tiles this block visits per peer

  const int S = p.num_streams;
  const BlockCoord blk = unflatten_block(p.q_tile_offsets[S], p.q_heads);
  const int b = blk.batch, h = blk.head;
  const int s = stream_of_tile(p.q_tile_offsets, S, blk.tile);
  const int q_row0 = (blk.tile - p.q_tile_offsets[s]) * BM;  // within stream s
  const int q_len = p.q_offsets[s + 1] - p.q_offsets[s];
  const int q_first = p.q_offsets[s] + q_row0;                // within the packed Tq
  const int hk = h / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t2 = (lane & 3) * 2;
  // the features this instantiation serves: all of them, or none (kFeatures = false, the plain
  // path of most calls: their code is compiled out); the launcher picks by the params
  const bool has_gate = kFeatures && p.gate != nullptr;
  const bool has_bias = kFeatures && p.bias != nullptr;
  const bool has_mask = kMask && p.mask != nullptr;  // kMask implies kFeatures
  const bool per_peer = kFeatures && p.per_peer;
  const bool recompute = kFeatures && p.recompute;

  plan_peer_tiles(p, b, s, q_row0, BM, BN, tid, limit_s, ntiles_s);
  __syncthreads();

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v_base = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];

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

  // this thread's two rows (local to the tile: warp * 16 + g and + 8)
  const int local_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  bool row_ok[2];
  int64_t row_index[2];  // (b, h, packed row) in a (B, Hq, Tq) layout
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_ok[r] = q_row0 + local_row[r] < q_len;
    row_index[r] = (static_cast<int64_t>(b) * p.q_heads + h) * p.total_q + q_first + local_row[r];
  }

  float acc[D / 8][4];
  zero(acc);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float row_offset[2] = {INFINITY, INFINITY};  // recompute: log2-domain lse of the rows
  if (recompute && !per_peer) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
      row_offset[r] = row_ok[r] ? lse_to_log2_offset(p.lse[row_index[r]]) : INFINITY;
  }
  const bool fold_per_peer = per_peer || recompute;
  const bool gate_in_tile = has_gate && !fold_per_peer;
  float bias_log2 = 0.f;

  int peer = next_peer(0), tile = 0, stage = 0;
  if (peer < S) {
    load_tile_async<BM, D>(q_tile, q_base + q_first * p.q_strides[2], p.q_strides[2],
                           q_len - q_row0, p.head_dim, static_cast<const T*>(p.q));
    load_kv(peer, 0, 0);
    cp_async_commit();
  }

  while (peer < S) {
    int next = peer, next_tile = tile + 1;
    if (next_tile >= ntiles_s[peer]) {
      next = next_peer(peer + 1);
      next_tile = 0;
    }
    if (tile == 0) {  // a new peer: its gate, bias and (per-peer modes) fresh state
      const int64_t pair = pair_index(p, b, s, peer, h);
      if (kFeatures) {  // read by the gated tile product and the per-peer folds only
        for (int c = tid; c < D; c += kThreads)
          gate_s[c] = (has_gate && c < p.value_dim) ? p.gate[pair * p.value_dim + c] : 1.f;
      }
      bias_log2 = has_bias ? p.bias[pair] * kLog2e : 0.f;
      if (fold_per_peer) {
        zero(acc);
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.f;
      }
      if (recompute && per_peer) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t at = ((static_cast<int64_t>(b) * p.q_heads + h) * S + peer) * p.total_q +
                             q_first + local_row[r];
          row_offset[r] = row_ok[r] ? lse_to_log2_offset(p.lse[at]) : INFINITY;
        }
      }
    }
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

    // scores in the log2 domain, masked
    const int key0 = tile * BN, limit = limit_s[peer];
    const bool causal_pair = p.causal && peer == s;
    const int diag = causal_offset(p, s);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = key0 + nt * 8 + t2 + (e & 1);
        const int i = q_row0 + local_row[e >> 1];
        const bool masked = j >= limit || (causal_pair && j > i + diag);
        float x = masked ? -INFINITY : sc[nt][e] * p.scale_log2 + bias_log2;
        if (has_mask && !masked && q_row0 + local_row[e >> 1] < q_len)  // rows past the stream: no mask entry
          x += mask_log2(p, b, h, q_first + local_row[e >> 1], p.kv_offsets[peer] + j);
        sc[nt][e] = x;
      }
    }

    float alpha[2] = {1.f, 1.f};
    if (!recompute) {  // online softmax
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
        const float new_max = fmaxf(row_max[r], quad_max(tile_max));
        const float base = new_max == -INFINITY ? 0.f : new_max;  // no NaN from (-inf) - (-inf)
        alpha[r] = exp2f(row_max[r] - base);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          sc[nt][2 * r] = exp2f(sc[nt][2 * r] - base);
          sc[nt][2 * r + 1] = exp2f(sc[nt][2 * r + 1] - base);
          sum += sc[nt][2 * r] + sc[nt][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * alpha[r] + sum;
        row_max[r] = new_max;
      }
    } else {  // probabilities from the saved lse
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[nt][e] = exp2f(sc[nt][e] - row_offset[e >> 1]);
      }
    }

    uint32_t pf[BN / 16][4];
    pack_a<BN, T>(pf, sc);
    // acc = acc * alpha + (P V) * gate, 16 channels at a time (the gate multiplies P V, so the
    // product of this tile is formed apart before it joins the accumulator)
#pragma unroll
    for (int n0 = 0; n0 < D; n0 += 16) {
      float pv[2][4];
      zero(pv);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t bf[4];
        load_b_from_kn<D>(bf, v_tile, kk * 16, n0, lane);
        Ops::mma(pv[0], pf[kk], bf[0], bf[1]);
        Ops::mma(pv[1], pf[kk], bf[2], bf[3]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = n0 + j * 8 + t2;
        const float g0 = gate_in_tile ? gate_s[col] : 1.f;
        const float g1 = gate_in_tile ? gate_s[col + 1] : 1.f;
        float* a = acc[n0 / 8 + j];
        a[0] = a[0] * alpha[0] + pv[j][0] * g0;
        a[1] = a[1] * alpha[0] + pv[j][1] * g1;
        a[2] = a[2] * alpha[1] + pv[j][2] * g0;
        a[3] = a[3] * alpha[1] + pv[j][3] * g1;
      }
    }

    if (fold_per_peer && tile == ntiles_s[peer] - 1) {
      if (!recompute) {  // peer mode forward: out_accum += gate * acc / l, and lse_p
        float inv[2], lse[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float total = quad_sum(row_sum[r]);
          inv[r] = total > 0.f ? 1.f / total : 0.f;
          lse[r] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, col = dt * 8 + t2 + (e & 1);
            if (row_ok[r] && col < p.value_dim)
              p.out_accum[row_index[r] * p.value_dim + col] += acc[dt][e] * inv[r] * gate_s[col];
          }
        }
        if ((lane & 3) == 0) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t at = ((static_cast<int64_t>(b) * p.q_heads + h) * S + peer) *
                                   p.total_q + q_first + local_row[r];
            if (row_ok[r]) p.lse[at] = lse[r];
          }
        }
      } else {  // recompute: acc = U_p
        const T* dout = static_cast<const T*>(p.dout);
        const int64_t pair = pair_index(p, b, s, peer, h);
        float dot[2] = {0.f, 0.f};
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          const int col = dt * 8 + t2;
          float2 d[2];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            d[r] = make_float2(0.f, 0.f);
            if (row_ok[r] && col < p.value_dim)
              d[r] = Ops::unpack(
                  *reinterpret_cast<const uint32_t*>(dout + row_index[r] * p.value_dim + col));
            dot[r] += d[r].x * gate_s[col] * acc[dt][2 * r] +
                      d[r].y * gate_s[col + 1] * acc[dt][2 * r + 1];
          }
          if (p.dgate != nullptr) {  // warp-uniform
            const float c0 = column_sum(d[0].x * acc[dt][0] + d[1].x * acc[dt][2]);
            const float c1 = column_sum(d[0].y * acc[dt][1] + d[1].y * acc[dt][3]);
            if (g == 0 && col < p.value_dim) {
              atomicAdd(p.dgate + pair * p.value_dim + col, c0);
              atomicAdd(p.dgate + pair * p.value_dim + col + 1, c1);
            }
          }
        }
        if (per_peer && p.delta != nullptr) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float total = quad_sum(dot[r]);
            const int64_t at = ((static_cast<int64_t>(b) * p.q_heads + h) * S + peer) *
                                   p.total_q + q_first + local_row[r];
            if ((lane & 3) == 0 && row_ok[r]) p.delta[at] = total;
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
    peer = next;
    tile = next_tile;
    stage ^= 1;
  }

  if (!per_peer && !recompute) {  // joint forward: out = acc / l, lse
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(row_sum[r]);
      const float inv = total > 0.f ? 1.f / total : 0.f;
      if (!row_ok[r]) continue;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + t2;
        if (col < p.value_dim)
          *reinterpret_cast<uint32_t*>(out + row_index[r] * p.value_dim + col) =
              Ops::pack(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
      }
      if ((lane & 3) == 0)
        p.lse[row_index[r]] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
}

template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t launch_forward_kernel(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = ForwardConfig<D>;
  return launch_over_tiles(forward_kernel<D, T, kFeatures, kMask>, params, TileRows::kQuery,
                           Cfg::kBlockM, Cfg::template smem_bytes<T>(), 1, stream);
}


// up to D = 128 launch.h's run_forward sends the plain path, gate, bias and peer mode to
// forward_plain.cuh's kernel (run_forward_plain); this one serves the rest (attn_mask,
// recompute, scale <= 0, D > 128)
template <int D, typename T, bool kFeatures, bool kMask>
cudaError_t run_forward_variant(const AttentionParams& params, cudaStream_t stream) {
  return launch_forward_kernel<D, T, kFeatures, kMask>(params, stream);
}

}  // namespace peer_attention
