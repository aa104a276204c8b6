// The fast forward for head dims up to 128 (no attn_mask, no recompute: SDPA, causal or not, GQA,
// kv_lengths, several streams), in FlashAttention-2's shape: 128 query rows per block, 4 warps of
// 32 rows (two m16 row tiles, so each K and V fragment loaded from shared memory feeds two mma),
// key tiles of 64. The peer features are compile-time switches (FlashAttention's BOOL_SWITCH,
// launch.h's run_forward), each instantiation carrying only its own code:
//   kGate (joint):  acc = acc * alpha + (P V) * gate[s, p] = acc * alpha + P (V diag(gate)):
//                   V's tile scaled per column in shared memory (scale_tile_columns, a third
//                   barrier per tile), the gate as m = gate / 2^exp (PeerTerms);
//   kBias:          z = scale * S + bias[s, p]: the running max is kept on z (log2 domain)
//                   instead of on the raw S, the bias folded into the exponent's fma;
//   kPeer:          a softmax per peer; after the peer's last tile (outside the tile loop)
//                   out_accum += gate[s, p] * acc / l and lse_p, then a fresh state (MATH.md).
// The per-peer gate and bias live in shared memory (PeerTerms), written once per peer.
//
// Pipeline (FlashAttention-2's, one shared buffer each for Q, K and V): K of the current tile is
// in flight when a step starts; V of the current tile is fetched while S = Q K^T runs, K of the
// next tile (the next peer's first one after a peer's last) while the softmax and P V run. Two
// barriers per tile: the first frees V (every warp is done with the previous P V), the second
// frees K (every warp is done with Q K^T); kGate adds one between the V scaling and P V.
//
// Masking only where it can change something: per peer, the leading key tiles that lie inside
// the keys and (causal self pair) below the diagonal of the block's first row take an unmasked
// step (unmasked_key_tiles); the rest (the last, partial tile, the diagonal tiles) the masked one.
// The element math is forward_kernel's joint path (online softmax with per-thread partial row
// sums; rows that see no key give 0 and lse = -inf) with the running max kept on the raw
// scores and the scale folded into the exponent, as FlashAttention-2 does: this needs
// scale > 0 (launch.h sends other scales to forward_kernel).
//
// Register budget: at D = 128 acc (128 registers), S (64) and the ldmatrix fragments ptxas keeps
// in flight during Q K^T fill the 255, and any other value the loop carries spilled (156-312 B,
// 9-11 LDL+STL per tile). So the block's rarely used values (PlainBlock) and, at D = 128, the
// running max and sum (load_row_state) live in shared memory; the tile copies step one pointer
// after each cp.async (load_tile_async's kOrdered), D = 96 in 32-column blocks; on sm_90+ the Q
// fragments are addressed without a per-ldmatrix base add (qk_rows; not at D = 96 on sm_120).
// No spill in any instantiation at D <= 128 on sm_80 to sm_120 (docs/cuda.md, compile report);
// ptxas's allocation at 255 is chaotic (what spilled: values it hoisted out of the tile loop
// for use after it, see widen, thread_index_here, kReread): rerun
// `python -m peer_attention.cuda_compile_report` after any change here.
#pragma once
#include "kernel_common.cuh"

namespace peer_attention {

// The current peer's gate and bias, written at each peer's start between barriers (the
// __syncthreads before the write: every warp is done with the previous peer's P V and fold; the
// next step's first one publishes them).
// Joint gate (kGate): V's columns are scaled by m = gate / 2^exp in 16 bits (scale_tile_columns),
// exp a power of two per peer with max |m| < 1, so that V m cannot overflow float16; acc then
// holds the output over 2^exp of the current peer, rescaled (exactly) when exp changes and
// multiplied by 2^exp at the end.
template <int D>
struct alignas(16) PeerTerms {
  float gate[D];          // kPeer: the gate in float32 (1 where null), applied at the peer's end
  uint32_t gate_m[D / 2]; // kGate: m in 16 bits (pairs of columns), 0 past value_dim
  float warp_max[kWarps]; // kGate: max |gate| per warp, then over the block
  float bias_log2;
  int exp;                // kGate: the current peer's exponent (0 before the first)
  int64_t pair0;     // pair_index(p, b, s, 0, h); peer p's pair: pair0 + p * q_heads
  int64_t lse_row0;  // ((b * q_heads + h) * S) * total_q + q_first: peer mode's lse row 0
  int unmasked[kMaxStreams];  // kReread: the peer's unmasked_key_tiles, read per tile
};

// Values of the block that the main loop needs rarely (once per tile or after the loop), kept in
// shared memory rather than in registers (the register budget above).
struct PlainBlock {
  const void* k;     // K and V of this block's batch entry and key head
  const void* v;
  int64_t out_row0;  // (b * q_heads + h) * total_q + q_first: the block's first output row
  int s, q_row0, q_len, pad;
};

// The running max and sum of a thread's 4 rows (2 row tiles x 2), one float4 each in shared
// memory (thread tid's own slots, state[tid] and state[kThreads + tid]): read and written once
// per tile, so that they hold no register through Q K^T, where acc (128 at D = 128), S (64) and
// the ldmatrix fragments in flight fill the 255.
__device__ __forceinline__ void load_row_state(const float4* state, int tid, float (&row_max)[2][2],
                                               float (&row_sum)[2][2]) {
  const float4 m = state[tid], l = state[kThreads + tid];
  row_max[0][0] = m.x, row_max[0][1] = m.y, row_max[1][0] = m.z, row_max[1][1] = m.w;
  row_sum[0][0] = l.x, row_sum[0][1] = l.y, row_sum[1][0] = l.z, row_sum[1][1] = l.w;
}
__device__ __forceinline__ void store_row_state(float4* state, int tid,
                                                const float (&row_max)[2][2],
                                                const float (&row_sum)[2][2]) {
  state[tid] = make_float4(row_max[0][0], row_max[0][1], row_max[1][0], row_max[1][1]);
  state[kThreads + tid] = make_float4(row_sum[0][0], row_sum[0][1], row_sum[1][0], row_sum[1][1]);
}

// S (MT row tiles of 16 x BN) = Q K^T for the warp's rows q_row (its first) of the 128-byte
// aligned q_tile, each K fragment loaded once for the MT row tiles: gemm_nt_rows with the Q
// fragments addressed by LdsmOffsets::at_aligned, without the add of the shared-memory base
// per ldmatrix that ptxas emits on sm_90+ (sm_90a: 3.95 instead of 4.11 instructions per HMMA
// in the main loop at D = 128). Used on sm_90+ only (see the call).
template <int MT, int BN, int D, typename T>
__device__ __forceinline__ void qk_rows(float (&sc)[MT][BN / 8][4], const T* q_tile, int q_row,
                                        const T* k_tile, int lane) {
  using Off = LdsmOffsets<D>;
  const uint32_t q_lane = smem_address(q_tile) + static_cast<uint32_t>(Off::a(lane) + q_row * 2 * D);
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], Off::at_aligned(q_lane, 16 * mt, k0));
#pragma unroll
    for (int n0 = 0; n0 < BN; n0 += 16) {
      uint32_t b[4];
      load_b_from_nk<D>(b, k_tile, n0, k0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        DTypeOps<T>::mma(sc[mt][n0 / 8], a[mt], b[0], b[1]);
        DTypeOps<T>::mma(sc[mt][n0 / 8 + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// A non-negative index as int64_t without a sign extension: the sign-extended peer index was
// hoisted out of the tile loop and spilled (peer mode at D = 128 on sm_80-89).
__device__ __forceinline__ int64_t widen(int index) {
  return static_cast<int64_t>(static_cast<uint32_t>(index));
}

// threadIdx.x read anew (a volatile asm, which neither nvcc nor ptxas moves out of a loop): the
// values a peer's fold derives from it are then computed after the tile loop instead of hoisted
// and held, or spilled, through it.
__device__ __forceinline__ int thread_index_here() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
  return t;
}

__device__ __forceinline__ float warp_reduce_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

// x * s for two 16-bit values at once (elementwise), rounded to nearest.
template <typename T>
__device__ __forceinline__ uint32_t mul_pair(uint32_t x, uint32_t s);
template <>
__device__ __forceinline__ uint32_t mul_pair<__half>(uint32_t x, uint32_t s) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&x),
                            *reinterpret_cast<const __half2*>(&s));
  return *reinterpret_cast<const uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t mul_pair<__nv_bfloat16>(uint32_t x, uint32_t s) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x),
                                   *reinterpret_cast<const __nv_bfloat162*>(&s));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// The joint gate on a V tile in shared memory: column c of the ROWS x D (swizzled) tile times
// factor[c] (16-bit), in place, each 16-byte chunk by one thread (TileCopy's assignment: at
// D = 32, 64, 128 a thread keeps one column of chunks, so one factor load per tile; at D = 96
// TileCopyBlocks', whose cover tests/cuda/test_tile_copy.py checks at 64 x 96). Then
// (P V) * gate = P (V diag(gate)) is the ungated product: the per-element join of a separate
// P V (one fma per accumulator) spilled at every D, ptxas sinking those fma to the loop's end,
// and scaling the B fragments (four HMUL2 per ldmatrix) cost more and spilled on sm_90a.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void scale_tile_columns(T* tile, const T* factor, int tid) {
  // the chunk at element offset `at` (swizzled) times the factors f of its 8 columns
  auto scale_chunk = [&](int at, const uint4& f) {
    uint4* chunk = reinterpret_cast<uint4*>(tile + at);
    uint4 x = *chunk;
    x.x = mul_pair<T>(x.x, f.x);
    x.y = mul_pair<T>(x.y, f.y);
    x.z = mul_pair<T>(x.z, f.z);
    x.w = mul_pair<T>(x.w, f.w);
    *chunk = x;
  };
  using Copy = TileCopy<ROWS, D>;
  if constexpr (Copy::kFixedColumn) {
    const int col = Copy::col(tid);
    const uint4 f = *reinterpret_cast<const uint4*>(factor + col);
#pragma unroll
    for (int i = 0; i < Copy::kCopies; ++i) scale_chunk(swizzle<D>(Copy::row(tid, i), col), f);
  } else {  // D = 96: TileCopyBlocks' chunks, one offset plus immediates (a per-chunk division
            // and modulo held 12 addresses through the loop: spills on sm_120)
    using Blocks = TileCopyBlocks<ROWS, D>;
    static_assert(Blocks::kApplies, "D = 96's column blocks");
    const int at0 = Blocks::offset(tid, 0, 0);
    const T* f0 = factor + Blocks::col(tid, 0);
#pragma unroll
    for (int block = 0; block < Blocks::kBlocks; ++block) {
      const uint4 f = *reinterpret_cast<const uint4*>(f0 + block * Blocks::kBlockChunks * 8);
#pragma unroll
      for (int round = 0; round < Blocks::kRounds; ++round)
        scale_chunk(at0 + round * Blocks::kRowStep * D + block * Blocks::kBlockChunks * 8, f);
    }
  }
}

template <int D>
struct ForwardPlainConfig {
  static_assert(D <= 128, "head dims above 128 run in forward_kernel");
  static constexpr int kRowTiles = 2;               // m16 row tiles per warp (row state: 2 x 2)
  static constexpr int kBlockM = kWarps * 16 * kRowTiles;  // 128
  static constexpr int kBlockN = 64;
  // the running max and sum in shared memory (load_row_state) where registers run out: D = 128
  // (in registers it spilled 156-312 B on every architecture); below, registers (4 KB more shared
  // memory would cost D = 96 its second block per SM on sm_86/89/120)
  static constexpr bool kRowStateInSmem = D > 96;
  static constexpr int kRowStateBytes = kRowStateInSmem ? 2 * kThreads * sizeof(float4) : 0;
  // kTerms: an instantiation with a gate, bias or peer mode (PeerTerms after the rest, at a
  // 16-byte aligned offset)
  template <typename T>
  static constexpr int terms_offset() {
    return ((kBlockM * D + 2 * kBlockN * D) * sizeof(T) + kRowStateBytes + sizeof(PlainBlock) +
            2 * kMaxStreams * sizeof(int) + 15) / 16 * 16;
  }
  template <typename T, bool kTerms = false>
  static constexpr int smem_bytes() {
    return kTerms ? terms_offset<T>() + sizeof(PeerTerms<D>)
                  : (kBlockM * D + 2 * kBlockN * D) * sizeof(T) + kRowStateBytes +
                        sizeof(PlainBlock) + 2 * kMaxStreams * sizeof(int);
  }
};

template <int D, typename T, bool kGate, bool kBias, bool kPeer>
__global__ void __launch_bounds__(kThreads, 1) forward_plain_kernel(const AttentionParams p) {
  using Cfg = ForwardPlainConfig<D>;
  using Ops = DTypeOps<T>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  static_assert(MT == 2, "load_row_state / store_row_state hold 2 row tiles");
  static_assert(!(kGate && kPeer), "peer mode applies the gate at each peer's end (kGate: joint)");
  constexpr bool kTerms = kGate || kBias || kPeer;
  // 128-byte aligned: qk_rows XORs the swizzle into shared-memory addresses (at_aligned)
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem);  // BM x D
  T* k_tile = q_tile + BM * D;             // BN x D
  T* v_tile = k_tile + BN * D;             // BN x D
  // per thread: row max, row sum (kRowStateInSmem; else nothing)
  float4* state_s = reinterpret_cast<float4*>(v_tile + BN * D);
  PlainBlock* blk_s = reinterpret_cast<PlainBlock*>(reinterpret_cast<unsigned char*>(state_s) +
                                                    Cfg::kRowStateBytes);
  int* limit_s = reinterpret_cast<int*>(blk_s + 1);  // keys per stream for this batch entry
  int* ntiles_s = limit_s + kMaxStreams;             // key tiles this block visits per peer
  // kTerms: the peer's gate and bias
  PeerTerms<D>* terms_s = reinterpret_cast<PeerTerms<D>*>(smem + Cfg::template terms_offset<T>());

  const int S = p.num_streams;
  const BlockCoord blk = unflatten_block(p.q_tile_offsets[S], p.q_heads);
  const int b = blk.batch, h = blk.head;
  const int s = stream_of_tile(p.q_tile_offsets, S, blk.tile);
  const int q_row0 = (blk.tile - p.q_tile_offsets[s]) * BM;  // within stream s
  const int q_len = p.q_offsets[s + 1] - p.q_offsets[s];
  const int q_first = p.q_offsets[s] + q_row0;                // within the packed Tq
  const int hk = h / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  plan_peer_tiles(p, b, s, q_row0, BM, BN, tid, limit_s, ntiles_s);
  // kReread: the tile count, the next peer and the unmasked tile count re-read from shared
  // memory after each step's barriers rather than held in registers through it: at D = 128 the
  // held ones spilled in these instantiations, the re-read ones in the others (ptxas at 255
  // registers; chosen by the compile report)
  constexpr bool kReread = D > 96 ? kPeer || (kBias && !kGate) : kPeer;
  static_assert(!kReread || kTerms, "the unmasked tile counts live in PeerTerms");
  if constexpr (kReread) {
    if (tid < S)  // thread tid planned peer tid
      terms_s->unmasked[tid] = unmasked_key_tiles(ntiles_s[tid], limit_s[tid],
                                                  p.causal && tid == s, q_row0,
                                                  causal_offset(p, s), BN);
  }
  if (tid == 0) {
    blk_s->k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
    blk_s->v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
    blk_s->out_row0 = (static_cast<int64_t>(b) * p.q_heads + h) * p.total_q + q_first;
    blk_s->s = s;
    blk_s->q_row0 = q_row0;
    blk_s->q_len = q_len;
    if constexpr (kTerms) {
      terms_s->pair0 = pair_index(p, b, s, 0, h);
      terms_s->exp = 0;
      terms_s->lse_row0 = (static_cast<int64_t>(b) * p.q_heads + h) * S * p.total_q + q_first;
    }
  }
  __syncthreads();

  const T* q_base = static_cast<const T*>(p.q) + b * p.q_strides[0] + h * p.q_strides[1];

  auto next_peer = [&](int from) {
    while (from < S && ntiles_s[from] == 0) ++from;
    return from;
  };
  auto load_k = [&](int peer, int tile) {
    const int row0 = p.kv_offsets[peer] + tile * BN;
    load_tile_async<BN, D, T, true, false, true>(
        k_tile, static_cast<const T*>(blk_s->k) + row0 * p.k_strides[2], p.k_strides[2],
        limit_s[peer] - tile * BN, p.head_dim, static_cast<const T*>(p.k));
  };

  // this thread's rows (local to the block): warp * 32 + 16 * mt + g + 8 * r
  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero(acc[mt]);
  float row_max[MT][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  float row_sum[MT][2] = {{0.f, 0.f}, {0.f, 0.f}};
  if constexpr (Cfg::kRowStateInSmem) store_row_state(state_s, tid, row_max, row_sum);

  // one key tile of `peer`; (next, next_tile) is the tile after it (next == S: none)
  auto step = [&](auto masked_step, int peer, int tile, int next, int next_tile) {
    constexpr bool kMasked = decltype(masked_step)::value;
    float sc[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(sc[mt]);
    cp_async_wait<0>();
    __syncthreads();  // K(tile) (and Q) landed; every warp is done with the previous P V
    {
      const int row0 = p.kv_offsets[peer] + tile * BN;
      // an unmasked tile lies inside the keys: all BN rows valid
      load_tile_async<BN, D, T, true, !kMasked, true>(
          v_tile, static_cast<const T*>(blk_s->v) + row0 * p.v_strides[2], p.v_strides[2],
          limit_s[peer] - tile * BN, p.value_dim, static_cast<const T*>(p.v));
      cp_async_commit();
    }
    // qk_rows on sm_90+; not on sm_80-89 (ptxas adds no base there; qk_rows made it spill, 12 B
    // at D = 128) nor at D = 96 on sm_120 (the same loop, and its held Q addresses spilled)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kQkRows = !(D == 96 && __CUDA_ARCH__ >= 1200);
#else
    constexpr bool kQkRows = false;
#endif
    if constexpr (kQkRows)
      qk_rows<MT, BN, D, T>(sc, q_tile, warp * 32, k_tile, lane);
    else
      gemm_nt_rows<MT, BN, D, T>(sc, q_tile, warp * 32, k_tile, lane);
    cp_async_wait<0>();
    __syncthreads();  // V(tile) landed; every warp is done with K(tile)
    if (next < S) {
      load_k(next, next_tile);
      cp_async_commit();
    }

    // kGate: V(tile) times the gate's m per column, published by a barrier before P V (the
    // softmax runs in between)
    if constexpr (kGate)
      scale_tile_columns<BN, D, T>(v_tile, reinterpret_cast<const T*>(terms_s->gate_m), tid);

    // scores in the log2 domain; lengths and the causal diagonal on the masked tiles only
    if constexpr (kMasked) {
      const int key0 = tile * BN, limit = limit_s[peer];
      const int bs = blk_s->s, row0 = blk_s->q_row0;
      const bool causal_pair = p.causal && peer == bs;
      const int diag = causal_offset(p, bs);
      const int warp_row = warp * 32 + (lane >> 2), t2 = (lane & 3) * 2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = key0 + nt * 8 + t2 + (e & 1);
            const int i = row0 + warp_row + 16 * mt + 8 * (e >> 1);
            const bool masked = j >= limit || (causal_pair && j > i + diag);
            if (masked) sc[mt][nt][e] = -INFINITY;
          }
        }
      }
    }

    // online softmax on the raw scores S (row sums per thread; the quad adds them up at the
    // end): with c = scale * log2(e) > 0 (the launcher sends other scales to forward_kernel),
    // max(c S) = c max(S) and P = exp2(c S - c max) is one fma and one ex2 per score. With a
    // bias b (log2 domain, constant over the peer's keys) the running max is kept on
    // z = c S + b instead: max over the tile's z = c max(S) + b, P = exp2(c S + (b - max)).
    const float c = p.scale_log2;
    if constexpr (Cfg::kRowStateInSmem) load_row_state(state_s, tid, row_max, row_sum);
    // kBias: read where used (a volatile load per use at D = 128: no register held across the
    // rows; one load at D <= 96)
    [[maybe_unused]] float bias_once = 0.f;
    if constexpr (kBias && D <= 96) bias_once = terms_s->bias_log2;
    auto bias2 = [&]() -> float {
      if constexpr (D <= 96) return bias_once;
      else return *reinterpret_cast<const volatile float*>(&terms_s->bias_log2);
    };
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));
        float new_max, base, alpha, shift;
        if constexpr (kBias) {  // row_max on z (log2 domain); c * (-inf) + b = -inf
          new_max = fmaxf(row_max[mt][r], fmaf(quad_max(tile_max), c, bias2()));
          base = new_max == -INFINITY ? 0.f : new_max;
          alpha = exp2f(row_max[mt][r] - base);
          shift = bias2() - base;
        } else {
          new_max = fmaxf(row_max[mt][r], quad_max(tile_max));  // raw, like row_max
          // no NaN from (-inf) - (-inf): a row with no key yet keeps base 0 and P = 0
          base = new_max == -INFINITY ? 0.f : new_max * c;
          alpha = exp2f(row_max[mt][r] * c - base);
          shift = -base;
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {  // acc = acc * alpha (+ P V below)
          acc[mt][dt][2 * r] *= alpha;
          acc[mt][dt][2 * r + 1] *= alpha;
        }
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          sc[mt][nt][2 * r] = exp2f(fmaf(sc[mt][nt][2 * r], c, shift));
          sc[mt][nt][2 * r + 1] = exp2f(fmaf(sc[mt][nt][2 * r + 1], c, shift));
          sum += sc[mt][nt][2 * r] + sc[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
        row_max[mt][r] = new_max;
      }
    }

    uint32_t pf[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) pack_a<BN, T>(pf[mt], sc[mt]);
    if constexpr (Cfg::kRowStateInSmem) store_row_state(state_s, tid, row_max, row_sum);
    if constexpr (kGate) __syncthreads();  // every chunk of V scaled (scale_tile_columns)
    gemm_rs_rows<MT, BN, D, D, T>(acc, pf, v_tile, lane);
  };

  // the row's log-sum-exp (natural log) from its quad-summed total and running max
  auto row_lse = [&](float total, float max) {
    const float m2 = kBias ? max : max * p.scale_log2;  // kBias: max is on z already
    return total > 0.f ? (m2 + log2f(total)) * kLn2 : -INFINITY;
  };

  int peer = next_peer(0);
  if (peer < S) {
    load_tile_async<BM, D, T, true, false, true>(q_tile, q_base + q_first * p.q_strides[2],
                                                 p.q_strides[2], q_len - q_row0, p.head_dim,
                                                 static_cast<const T*>(p.q));
    load_k(peer, 0);
    cp_async_commit();
  }
  while (peer < S) {
    if constexpr (kTerms) {  // this peer's gate and bias (see PeerTerms)
      __syncthreads();
      const int64_t pair = terms_s->pair0 + widen(peer) * p.q_heads;
      if constexpr (kGate) {
        const int old_exp = terms_s->exp;
        const float gv = tid < p.value_dim ? p.gate[pair * p.value_dim + tid] : 0.f;  // D <= 128
        const float wmax = warp_reduce_max(fabsf(gv));
        if (lane == 0) terms_s->warp_max[warp] = wmax;
        __syncthreads();
        float gmax = terms_s->warp_max[0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) gmax = fmaxf(gmax, terms_s->warp_max[w]);
        int exp = 0;  // gmax = f 2^exp, f in [0.5, 1): |gate| / 2^exp < 1
        if (gmax > 0.f && gmax < INFINITY) frexpf(gmax, &exp);
        const float m = ldexpf(gv, -exp);
        const float m_next = __shfl_down_sync(0xffffffffu, m, 1);  // column tid + 1
        if (tid < D && (tid & 1) == 0) terms_s->gate_m[tid / 2] = Ops::pack(m, m_next);
        if (exp != old_exp) {  // acc was over 2^old_exp: now over 2^exp (exact, block-uniform)
          const float f = ldexpf(1.f, old_exp - exp);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[mt][dt][e] *= f;
            }
          }
        }
        if (tid == 0) terms_s->exp = exp;  // every thread read old_exp before the barrier
      }
      if constexpr (kPeer) {  // applied at the peer's end in float32; 1 without a gate
        const bool gated = p.gate != nullptr;
        for (int col = tid; col < D; col += kThreads)
          terms_s->gate[col] = gated && col < p.value_dim ? p.gate[pair * p.value_dim + col] : 1.f;
      }
      if (kBias && tid == 0) terms_s->bias_log2 = p.bias[pair] * kLog2e;
    }
    const int ntiles = ntiles_s[peer];
    [[maybe_unused]] int unmasked = 0;
    if constexpr (!kReread) {
      const int bs = blk_s->s, row0 = blk_s->q_row0;
      unmasked = unmasked_key_tiles(ntiles, limit_s[peer], p.causal && peer == bs, row0,
                                    causal_offset(p, bs), BN);
    }
    int tile = 0;
    [[maybe_unused]] const int following = kReread ? 0 : next_peer(peer + 1);
    auto after = [&] { return kReread ? next_peer(peer + 1) : following; };
    auto count = [&] { return kReread ? ntiles_s[peer] : ntiles; };
    auto unmasked_count = [&] { return kReread ? terms_s->unmasked[peer] : unmasked; };
    // the main loop: tiles inside the keys, below the diagonal
    for (; tile < unmasked_count(); ++tile) {
      const bool last = tile + 1 == count();
      step(MaskedStep<false>{}, peer, tile, last ? after() : peer, last ? 0 : tile + 1);
    }
    for (; tile < count(); ++tile) {
      const bool last = tile + 1 == count();
      step(MaskedStep<true>{}, peer, tile, last ? after() : peer, last ? 0 : tile + 1);
    }
    if constexpr (kPeer) {  // the peer's end: out_accum += gate * acc / l, lse_p; a fresh state
      const int e_row0 = blk_s->q_row0, e_len = blk_s->q_len;
      const int64_t e_out0 = blk_s->out_row0;
      const int64_t e_lse0 = terms_s->lse_row0 + widen(peer) * p.total_q;
      // D = 96: the row from the thread index read here (thread_index_here), not hoisted
      const int f_tid = D == 96 ? thread_index_here() : tid;
      const int warp_row = (f_tid >> 5) * 32 + ((f_tid & 31) >> 2), t2 = (lane & 3) * 2;
      if constexpr (Cfg::kRowStateInSmem) load_row_state(state_s, tid, row_max, row_sum);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float total = quad_sum(row_sum[mt][r]);
          const float inv = total > 0.f ? 1.f / total : 0.f;
          const float lse = row_lse(total, row_max[mt][r]);
          const int local_row = warp_row + 16 * mt + 8 * r;
          if (e_row0 + local_row < e_len) {
            float* o = p.out_accum + (e_out0 + local_row) * p.value_dim;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
              const int col = dt * 8 + t2;
              if (col < p.value_dim) {
                // indexed per float2 (the lane's pair of columns), not by col: the latter's
                // address ptxas hoisted out of the tile loop and spilled (sm_90a)
                const float2 gj =
                    reinterpret_cast<const float2*>(terms_s->gate)[dt * 4 + (lane & 3)];
                float2 v = *reinterpret_cast<float2*>(o + col);
                v.x += acc[mt][dt][2 * r] * inv * gj.x;
                v.y += acc[mt][dt][2 * r + 1] * inv * gj.y;
                *reinterpret_cast<float2*>(o + col) = v;
              }
            }
            if ((lane & 3) == 0) p.lse[e_lse0 + local_row] = lse;
          }
          row_max[mt][r] = -INFINITY;
          row_sum[mt][r] = 0.f;
        }
        zero(acc[mt]);
      }
      if constexpr (Cfg::kRowStateInSmem) store_row_state(state_s, tid, row_max, row_sum);
    }
    peer = kReread ? next_peer(peer + 1) : following;
  }
  if constexpr (kPeer) return;  // every peer folded into out_accum

  // out = acc / l, lse (natural log)
  T* out = static_cast<T*>(p.out);
  const int e_row0 = blk_s->q_row0, e_len = blk_s->q_len;
  const int64_t e_out0 = blk_s->out_row0;
  const int warp_row = warp * 32 + (lane >> 2), t2 = (lane & 3) * 2;
  if constexpr (Cfg::kRowStateInSmem) load_row_state(state_s, tid, row_max, row_sum);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float total = quad_sum(row_sum[mt][r]);
      // kGate: acc is over 2^exp (PeerTerms)
      const float inv = total > 0.f ? (kGate ? ldexpf(1.f, terms_s->exp) : 1.f) / total : 0.f;
      const int local_row = warp_row + 16 * mt + 8 * r;
      if (e_row0 + local_row >= e_len) continue;
      const int64_t row_index = e_out0 + local_row;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int col = dt * 8 + t2;
        if (col < p.value_dim)
          *reinterpret_cast<uint32_t*>(out + row_index * p.value_dim + col) =
              Ops::pack(acc[mt][dt][2 * r] * inv, acc[mt][dt][2 * r + 1] * inv);
      }
      if ((lane & 3) == 0) p.lse[row_index] = row_lse(total, row_max[mt][r]);
    }
  }
}

template <int D, typename T, bool kGate, bool kBias, bool kPeer>
cudaError_t run_forward_plain(const AttentionParams& params, cudaStream_t stream) {
  using Cfg = ForwardPlainConfig<D>;
  constexpr bool kTerms = kGate || kBias || kPeer;
  return launch_over_tiles(forward_plain_kernel<D, T, kGate, kBias, kPeer>, params,
                           TileRows::kQuery, Cfg::kBlockM,
                           Cfg::template smem_bytes<T, kTerms>(), 1, stream);
}

}  // namespace peer_attention
