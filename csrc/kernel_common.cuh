// Device building blocks shared by the forward and backward kernels: dtype ops, mma.sync
// m16n8k16 (fp32 accumulate), ldmatrix, cp.async, the swizzled shared-memory tile layout and
// the fragment-level matrix products.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs), lane = 4 * g + t:
//   A (16x16, row major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, k x n):      b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// so the C fragments of two adjacent n-tiles are, once packed to 16 bits, the A fragment of the
// next product (P of S = QK^T becomes the A operand of P V without touching shared memory).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "params.h"

namespace peer_attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <typename T>
struct DTypeOps;

template <>
struct DTypeOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct DTypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p)));
}

// 16-byte asynchronous copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)),
               "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Element offset of (row, col) in a rows x D tile of 16-bit values: the 16-byte chunk index is
// XORed with a function of the row so that the 8 row addresses of one ldmatrix phase (8
// consecutive rows, one chunk column) fall in 8 different 16-byte bank groups:
// - D / 8 a multiple of 8 (rows of 128 B multiples): chunk ^ (row & 7) within aligned groups of 8;
// - D = 32 or 96 (rows of 64 or 192 B: two rows cover the 128 B of banks at offsets 0 and 64):
//   chunk ^ ((row >> 1) & 3) within aligned groups of 4; the bank group of row r is then
//   4 * ((r + chunk / 4) & 1) + ((chunk & 3) ^ ((r >> 1) & 3)), distinct for 8 consecutive rows
//   (XOR with row & 3, as before, put rows r and r + 4 in the same banks: 2-way conflicts).
// tests/cuda/test_forward_plain.py checks every phase of load_a / load_b_* for every D.
template <int D>
__host__ __device__ __forceinline__ int swizzle(int row, int col) {
  constexpr int kChunks = D / 8;
  if constexpr (kChunks % 8 == 0) {
    return row * D + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
  } else {
    static_assert(kChunks % 4 == 0, "the swizzle must stay inside the row");
    return row * D + ((((col >> 3) ^ ((row >> 1) & 3)) << 3) | (col & 7));
  }
}

// Which 16-byte chunks of a ROWS x D tile thread `tid` copies. When the threads of a block
// cover whole rows (kThreads a multiple of D / 8: every kernel head dim but 96), each thread
// keeps one column and its i-th copy is row tid / (D / 8) + i * kRowStep: the rows it copies
// are a pointer stepped by kRowStep rows, without a division, modulo or 64-bit multiply per
// chunk. (Host-callable: tests/cuda/test_tile_copy.py checks that every chunk is copied once.)
template <int ROWS, int D>
struct TileCopy {
  static constexpr int kChunks = D / 8;
  static constexpr bool kFixedColumn = kThreads % kChunks == 0;
  static constexpr int kRowStep = kFixedColumn ? kThreads / kChunks : 1;
  static constexpr int kCopies = kFixedColumn ? ROWS / kRowStep : 0;
  static_assert(!kFixedColumn || ROWS % kRowStep == 0, "whole rows per round of copies");
  __host__ __device__ static constexpr int row(int tid, int i) { return tid / kChunks + i * kRowStep; }
  __host__ __device__ static constexpr int col(int tid) { return (tid % kChunks) * 8; }
};

// p += elements as a volatile asm statement, which nvcc keeps after the cp.async before it: one
// stepped source pointer live through a tile copy instead of all of its precomputed addresses
// (the plain forward: its 255 registers leave none to spare). The asm adds bytes.
template <typename T>
__device__ __forceinline__ void step_pointer(const T*& p, int64_t elements) {
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(T));
  asm volatile("add.s64 %0, %0, %1;\n" : "+l"(p) : "l"(bytes));
}

// The plain forward's copy of a tile whose rows the 128 threads do not cover whole (D = 96: 12
// chunks per row), in FlashAttention-2's hd96 layout: column blocks of 4 chunks (32 elements);
// thread tid keeps chunk tid % 4 of every block and the rows tid / 4 + 32 i, so its copies are
// one pointer stepped by 32 rows plus immediate block offsets, and the shared-memory offsets
// the first one plus immediates (swizzle<96> XORs the chunk's low 2 bits with bits 1-2 of the
// row, which 32 rows do not change): no division or modulo per chunk. (Host-callable:
// tests/cuda/test_tile_copy.py checks the cover and offset() against swizzle<D>.)
template <int ROWS, int D>
struct TileCopyBlocks {
  static constexpr int kBlockChunks = 4;
  static constexpr int kBlocks = D / 8 / kBlockChunks;
  static constexpr int kRowStep = kThreads / kBlockChunks;  // 32
  static constexpr int kRounds = ROWS / kRowStep;
  // only where TileCopy's whole rows do not apply, and within swizzle<D>'s groups of 4 chunks
  static constexpr bool kApplies = kThreads % (D / 8) != 0 && (D / 8) % kBlockChunks == 0 &&
                                   (D / 8) % 8 != 0 && ROWS % kRowStep == 0;
  __host__ __device__ static constexpr int row(int tid, int round) {
    return tid / kBlockChunks + round * kRowStep;
  }
  __host__ __device__ static constexpr int col(int tid, int block) {
    return (tid % kBlockChunks) * 8 + block * kBlockChunks * 8;
  }
  // swizzle<D>(row(tid, round), col(tid, block)) as the kernel computes it
  __host__ __device__ static int offset(int tid, int round, int block) {
    return swizzle<D>(row(tid, 0), col(tid, 0)) + round * kRowStep * D + block * kBlockChunks * 8;
  }
};

// Copy a ROWS x D tile (row stride `row_stride` elements) into swizzled shared memory; rows >=
// valid_rows and columns >= valid_cols are zero-filled (never read). `safe` is any valid address.
// Which thread copies which chunk does not matter to the readers: they read after
// cp_async_wait + __syncthreads.
// kStepped = false keeps the per-chunk loop (see dkdv_kernel: fewer spills there on sm_89).
// kAllRows: the caller knows valid_rows >= ROWS (a tile inside the keys; no row test).
// kOrdered (the plain forward, whose 255 registers leave none to spare): each pointer step is
// issued after its copy, so one source pointer is live instead of kCopies precomputed ones, and
// D = 96 copies in column blocks (TileCopyBlocks) instead of the per-chunk loop.
template <int ROWS, int D, typename T, bool kStepped = true, bool kAllRows = false,
          bool kOrdered = false>
__device__ __forceinline__ void load_tile_async(T* tile, const T* gmem, int64_t row_stride,
                                                int valid_rows, int valid_cols, const T* safe) {
  using Copy = TileCopy<ROWS, D>;
  if constexpr (Copy::kFixedColumn && kStepped) {
    const int row0 = Copy::row(threadIdx.x, 0), col = Copy::col(threadIdx.x);
    const bool col_ok = col < valid_cols;
    // a column past valid_cols reads nothing: its pointer stays at `safe`, not stepped
    const T* src = col_ok ? gmem + row0 * row_stride + col : safe;
    const int64_t step = col_ok ? Copy::kRowStep * row_stride : 0;
    if constexpr (kOrdered) {  // stepped after each copy: one pointer live, not kCopies
#pragma unroll
      for (int i = 0; i < Copy::kCopies; ++i) {
        const int row = row0 + i * Copy::kRowStep;
        const bool row_ok = kAllRows || row < valid_rows;
        cp_async_16(tile + swizzle<D>(row, col), row_ok ? src : safe, col_ok && row_ok);
        step_pointer(src, step);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < Copy::kCopies; ++i, src += step) {
      const int row = row0 + i * Copy::kRowStep;
      const bool row_ok = kAllRows || row < valid_rows;
      cp_async_16(tile + swizzle<D>(row, col), row_ok ? src : safe, col_ok && row_ok);
    }
  } else if constexpr (kOrdered && TileCopyBlocks<ROWS, D>::kApplies) {
    using Blocks = TileCopyBlocks<ROWS, D>;
    const int tid = threadIdx.x, row0 = Blocks::row(tid, 0), col0 = Blocks::col(tid, 0);
    const T* src = gmem + row0 * row_stride + col0;
    const int64_t step = Blocks::kRowStep * row_stride;
#pragma unroll
    for (int round = 0; round < Blocks::kRounds; ++round) {
      const bool row_ok = kAllRows || row0 + round * Blocks::kRowStep < valid_rows;
#pragma unroll
      for (int block = 0; block < Blocks::kBlocks; ++block) {
        const int col = col0 + block * Blocks::kBlockChunks * 8;
        const bool ok = row_ok && col < valid_cols;
        cp_async_16(tile + Blocks::offset(tid, round, block),
                    ok ? src + block * Blocks::kBlockChunks * 8 : safe, ok);
      }
      step_pointer(src, step);
    }
  } else {
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
      const int row = idx / kChunks, col = (idx % kChunks) * 8;
      const bool valid = (kAllRows || row < valid_rows) && col < valid_cols;
      const T* src = valid ? gmem + row * row_stride + col : safe;
      cp_async_16(tile + swizzle<D>(row, col), src, valid);
    }
  }
}

// ldmatrix byte offsets (load_a, load_b_from_nk, load_b_from_kn, every kernel). The swizzle
// XORs the low bits of a row's chunk index (its kGroup = 8 or 4 chunks) with kX(row), a
// function of row & 7 only, and an ldmatrix reads rows (row base, a multiple of 16) + a lane
// part, so kX depends on the lane alone. A row is 2D bytes, a multiple of 16 * kGroup, so the
// lane part's chunk bits (4 .. 3 + log2 kGroup) are its own: the offset of a fragment is the
// lane's offset for k0 = 0 XORed with ((k0 / 8) % kGroup) * 16, plus the row base's bytes and
// the (k0 / 8 / kGroup) whole groups, one LOP3 per k step instead of the swizzle arithmetic
// per ldmatrix. tests/cuda/test_forward_plain.py checks them against swizzle<D> for every
// head dim, lane, row base and k0.
template <int D>
struct LdsmOffsets {
  static constexpr int kGroup = (D / 8) % 8 == 0 ? 8 : 4;  // swizzle<D>'s chunk group
  static_assert((2 * D) % (16 * kGroup) == 0, "whole groups per row");
  // swizzle<D>'s XOR of a row whose low 3 bits are lane & 7 (all three fragment kinds)
  __host__ __device__ static constexpr int x(int lane) {
    return kGroup == 8 ? (lane & 7) : ((lane & 7) >> 1);
  }
  // lane parts (bytes, k0 = 0, row base 0): load_a, load_b_from_nk, load_b_from_kn
  __host__ __device__ static constexpr int a(int lane) {
    return (lane & 15) * 2 * D + (((lane >> 4) ^ x(lane)) << 4);
  }
  __host__ __device__ static constexpr int b_nk(int lane) {
    return ((lane & 7) + ((lane >> 4) << 3)) * 2 * D + ((((lane >> 3) & 1) ^ x(lane)) << 4);
  }
  __host__ __device__ static constexpr int b_kn(int lane) {
    return ((lane & 7) + (((lane >> 3) & 1) << 3)) * 2 * D + (((lane >> 4) ^ x(lane)) << 4);
  }
  // fragment at (row base `row`, column base `k`: multiples of 16); for b_kn the row is k0 and
  // the column n0
  __host__ __device__ static constexpr int at(int lane_part, int row, int k) {
    return (lane_part ^ (((k >> 3) & (kGroup - 1)) << 4)) + row * 2 * D +
           ((k >> 3) & ~(kGroup - 1)) * 16;
  }
  // The same on a shared-memory address: `lane_address` = the tile's address + a lane part + a
  // row base that is a multiple of 16 rows, with the tile 128-byte aligned, so that the XOR
  // (bits 4-6) can act on the address itself: base + (x ^ c) = (base + x) ^ c when the base's
  // low 7 bits are 0. Saves the add of the shared-memory base per ldmatrix that ptxas emits on
  // sm_90+ (the plain forward's Q fragments); tests/cuda/test_forward_plain.py checks it.
  __host__ __device__ static constexpr uint32_t at_aligned(uint32_t lane_address, int row, int k) {
    return (lane_address ^ static_cast<uint32_t>(((k >> 3) & (kGroup - 1)) << 4)) +
           static_cast<uint32_t>(row * 2 * D + ((k >> 3) & ~(kGroup - 1)) * 16);
  }
};

template <typename T>
__device__ __forceinline__ const T* byte_offset(const T* tile, int bytes) {
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(tile) + bytes);
}

// A fragment: rows row0..row0+15, columns k0..k0+15 of a tile.
// (row0, k0, n0: multiples of 16; the offsets: LdsmOffsets, equal to swizzle<D>'s.)
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int k0,
                                       int lane) {
  ldmatrix_x4(a, byte_offset(tile, LdsmOffsets<D>::at(LdsmOffsets<D>::a(lane), row0, k0)));
}

// B fragments of two n-tiles (n0..n0+7 -> b[0], b[1]; n0+8..n0+15 -> b[2], b[3]) for k0..k0+15,
// from a tile stored as [n][k] (B = tile^T).
template <int D, typename T>
__device__ __forceinline__ void load_b_from_nk(uint32_t (&b)[4], const T* tile, int n0, int k0,
                                               int lane) {
  ldmatrix_x4(b, byte_offset(tile, LdsmOffsets<D>::at(LdsmOffsets<D>::b_nk(lane), n0, k0)));
}

// The same two n-tiles from a tile stored as [k][n] (B = tile), via the transposing ldmatrix.
template <int D, typename T>
__device__ __forceinline__ void load_b_from_kn(uint32_t (&b)[4], const T* tile, int k0, int n0,
                                               int lane) {
  ldmatrix_x4_trans(b, byte_offset(tile, LdsmOffsets<D>::at(LdsmOffsets<D>::b_kn(lane), k0, n0)));
}

template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t x, float lo, float hi) {
  const float2 f = DTypeOps<T>::unpack(x);
  return DTypeOps<T>::pack(f.x * lo, f.y * hi);
}

// acc (16 x N) += A (rows a_row0.. of a_tile, all D columns) * B^T (b_tile rows 0..N-1, [n][k]).
// a_scale / b_scale (null for none): a factor per k column, applied to the operand fragments.
template <int N, int D, typename T>
__device__ __forceinline__ void gemm_nt(float (&acc)[N / 8][4], const T* a_tile, int a_row0,
                                        const float* a_scale, const T* b_tile,
                                        const float* b_scale, int lane) {
  const int t2 = (lane & 3) * 2;
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[4];
    load_a<D>(a, a_tile, a_row0, k0, lane);
    if (a_scale != nullptr) {
      const float s0 = a_scale[k0 + t2], s1 = a_scale[k0 + t2 + 1];
      const float s8 = a_scale[k0 + t2 + 8], s9 = a_scale[k0 + t2 + 9];
      a[0] = scale_pair<T>(a[0], s0, s1);
      a[1] = scale_pair<T>(a[1], s0, s1);
      a[2] = scale_pair<T>(a[2], s8, s9);
      a[3] = scale_pair<T>(a[3], s8, s9);
    }
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      uint32_t b[4];
      load_b_from_nk<D>(b, b_tile, n0, k0, lane);
      if (b_scale != nullptr) {
        const float s0 = b_scale[k0 + t2], s1 = b_scale[k0 + t2 + 1];
        const float s8 = b_scale[k0 + t2 + 8], s9 = b_scale[k0 + t2 + 9];
        b[0] = scale_pair<T>(b[0], s0, s1);
        b[2] = scale_pair<T>(b[2], s0, s1);
        b[1] = scale_pair<T>(b[1], s8, s9);
        b[3] = scale_pair<T>(b[3], s8, s9);
      }
      DTypeOps<T>::mma(acc[n0 / 8], a, b[0], b[1]);
      DTypeOps<T>::mma(acc[n0 / 8 + 1], a, b[2], b[3]);
    }
  }
}

// MT row tiles of 16 at once (rows a_row0 + 16 * mt): acc[mt] (16 x N) += A_mt * B^T, B
// ([n][k], rows 0..N-1 of b_tile) loaded once per k step for all MT row tiles, which halves the
// ldmatrix per mma at MT = 2 (FlashAttention-2's 32 query rows per warp).
template <int MT, int N, int D, typename T>
__device__ __forceinline__ void gemm_nt_rows(float (&acc)[MT][N / 8][4], const T* a_tile,
                                             int a_row0, const T* b_tile, int lane) {
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) load_a<D>(a[mt], a_tile, a_row0 + 16 * mt, k0, lane);
#pragma unroll
    for (int n0 = 0; n0 < N; n0 += 16) {
      uint32_t b[4];
      load_b_from_nk<D>(b, b_tile, n0, k0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        DTypeOps<T>::mma(acc[mt][n0 / 8], a[mt], b[0], b[1]);
        DTypeOps<T>::mma(acc[mt][n0 / 8 + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// C fragments of 16 x K (fp32) -> A fragments of the same 16 x K matrix in 16 bits.
template <int K, typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[K / 16][4], const float (&c)[K / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    a[kk][0] = DTypeOps<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = DTypeOps<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = DTypeOps<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = DTypeOps<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// acc (16 x NOUT) += A (16 x K, registers) * B (b_tile rows 0..K-1, [k][n] with D columns, the
// NOUT columns from n_base). n_scale (null for none): a factor per tile column applied to B.
template <int K, int D, int NOUT, typename T>
__device__ __forceinline__ void gemm_rs(float (&acc)[NOUT / 8][4], const uint32_t (&a)[K / 16][4],
                                        const T* b_tile, int n_base, const float* n_scale,
                                        int lane) {
  const int g = lane >> 2;
#pragma unroll
  for (int n0 = 0; n0 < NOUT; n0 += 16) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t b[4];
      load_b_from_kn<D>(b, b_tile, kk * 16, n_base + n0, lane);
      if (n_scale != nullptr) {  // b[0], b[1] hold column n0 + g; b[2], b[3] column n0 + 8 + g
        const float s0 = n_scale[n_base + n0 + g], s8 = n_scale[n_base + n0 + 8 + g];
        b[0] = scale_pair<T>(b[0], s0, s0);
        b[1] = scale_pair<T>(b[1], s0, s0);
        b[2] = scale_pair<T>(b[2], s8, s8);
        b[3] = scale_pair<T>(b[3], s8, s8);
      }
      DTypeOps<T>::mma(acc[n0 / 8], a[kk], b[0], b[1]);
      DTypeOps<T>::mma(acc[n0 / 8 + 1], a[kk], b[2], b[3]);
    }
  }
}

// MT row tiles: acc[mt] (16 x NOUT) += A_mt (16 x K, registers) * B (b_tile rows 0..K-1,
// [k][n], columns 0..NOUT-1), each B fragment loaded once for all MT row tiles.
template <int MT, int K, int D, int NOUT, typename T>
__device__ __forceinline__ void gemm_rs_rows(float (&acc)[MT][NOUT / 8][4],
                                             const uint32_t (&a)[MT][K / 16][4],
                                             const T* b_tile, int lane) {
#pragma unroll
  for (int n0 = 0; n0 < NOUT; n0 += 16) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t b[4];
      load_b_from_kn<D>(b, b_tile, kk * 16, n0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        DTypeOps<T>::mma(acc[mt][n0 / 8], a[mt][kk], b[0], b[1]);
        DTypeOps<T>::mma(acc[mt][n0 / 8 + 1], a[mt][kk], b[2], b[3]);
      }
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
  }
}

// Sum / max over the 4 lanes of a quad (the lanes holding one row of a C fragment).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
// Sum over the 8 lanes sharing a column of a C fragment (same lane & 3).
__device__ __forceinline__ float column_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// A saved log-sum-exp (natural log) as the log2-domain row offset of P = exp2(s2 - offset):
// rows with nothing to attend to (lse = -inf) get +inf so that every P of theirs is 0.
__device__ __forceinline__ float lse_to_log2_offset(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// Which stream a block of a packed grid belongs to: the s with tile_offsets[s] <= x < [s + 1].
__device__ __forceinline__ int stream_of_tile(const int* tile_offsets, int num_streams, int x) {
  int s = 0;
  while (s + 1 < num_streams && tile_offsets[s + 1] <= x) ++s;
  return s;
}

// Keys of stream p that exist for batch b: kv_lens[p], cut by kv_lengths[b, p].
__device__ __forceinline__ int key_limit(const AttentionParams& p, int b, int stream) {
  int limit = p.kv_offsets[stream + 1] - p.kv_offsets[stream];
  if (p.kv_lengths != nullptr) limit = min(limit, max(p.kv_lengths[b * p.num_streams + stream], 0));
  return limit;
}

// Diagonal offset of stream s's causal self pair: key j visible to query i iff j <= i + off.
__device__ __forceinline__ int causal_offset(const AttentionParams& p, int s) {
  if (!p.bottom_right) return 0;
  return (p.kv_offsets[s + 1] - p.kv_offsets[s]) - (p.q_offsets[s + 1] - p.q_offsets[s]);
}

// How many leading key tiles [0, n) of a peer need no masking for a query block whose rows
// (within stream s) start at q_row0: every key j of such a tile is below `limit` and, on a
// causal self pair, j <= i + diag for every row i >= q_row0 of the block (q_row0 decides).
// The tiles [n, ntiles) take the masked path. Host-callable: tests/cuda/test_forward_plain.py
// checks it against the per-element mask.
__host__ __device__ __forceinline__ int unmasked_key_tiles(int ntiles, int limit,
                                                           bool causal_pair, int q_row0,
                                                           int diag, int block_keys) {
  int n = limit / block_keys;  // limit >= 0: tiles that end at or before the limit
  n = n < ntiles ? n : ntiles;
  if (causal_pair) {
    const int reach = q_row0 + diag + 1;  // keys [0, reach) are visible to row q_row0
    const int full = reach > 0 ? reach / block_keys : 0;
    n = n < full ? n : full;
  }
  return n > 0 ? n : 0;
}

// Key-major blocks (dK/dV): the first query tile of [first, end) from which the key block
// [key_row0, key_row0 + block_keys) needs no masking: all its keys are below `limit` and, on a
// causal self pair, every row i of the tile has i >= j - diag for every key j of the block. The
// tiles [first, result) take the masked path. Host-callable: tests/cuda/test_forward_plain.py.
__host__ __device__ __forceinline__ int first_unmasked_query_tile(int first, int end,
                                                                  int key_row0, int block_keys,
                                                                  int limit, bool causal_pair,
                                                                  int diag, int block_queries) {
  if (key_row0 + block_keys > limit) return end;  // keys past the limit: every tile masked
  int from = first;
  if (causal_pair) {
    const int need = key_row0 + block_keys - 1 - diag;  // rows i >= need see the whole block
    const int t = need <= 0 ? 0 : (need + block_queries - 1) / block_queries;
    from = from > t ? from : t;
  }
  return from < end ? from : end;
}

// The tag of a tile step with (true) or without (false) the per-score length/causal mask.
template <bool kValue>
struct MaskedStep {
  static constexpr bool value = kValue;
};

// Query-major blocks (forward, dQ): thread `tid` < S plans peer `tid` of stream s for the block
// whose first row (within s) is q_row0: its key count, and how many key tiles of BN the block
// visits (0 for a pair the peer table leaves out; a causal self pair stops at the diagonal).
__device__ __forceinline__ void plan_peer_tiles(const AttentionParams& p, int b, int s, int q_row0,
                                                int block_rows, int block_keys, int tid,
                                                int* limit_s, int* ntiles_s) {
  if (tid >= p.num_streams) return;
  const int limit = key_limit(p, b, tid);
  int reach = limit;
  if (p.causal && tid == s) reach = max(min(reach, q_row0 + block_rows + causal_offset(p, s)), 0);
  limit_s[tid] = limit;
  ntiles_s[tid] = ((p.peer_rows[s] >> tid) & 1u) ? (reach + block_keys - 1) / block_keys : 0;
}

// The attn_mask term of the score of (packed query row, packed key row), log2 domain.
__device__ __forceinline__ float mask_log2(const AttentionParams& p, int b, int h, int row,
                                           int key) {
  const float m = p.mask[b * p.mask_strides[0] + h * p.mask_strides[1] +
                         row * p.mask_strides[2] + key * p.mask_strides[3]];
  return m * kLog2e;
}

__device__ __forceinline__ int64_t pair_index(const AttentionParams& p, int b, int s, int peer,
                                              int h) {
  return ((static_cast<int64_t>(b) * p.num_streams + s) * p.num_streams + peer) * p.q_heads + h;
}

// Blocks of a grid flattened into x (gridDim.y and .z are capped at 65535, x at 2^31 - 1):
// x = tile + tiles * (head + heads * batch), tile fastest so neighbouring blocks share K/V.
struct BlockCoord {
  int tile, head, batch;
};
__device__ __forceinline__ BlockCoord unflatten_block(int tiles, int heads) {
  const int64_t x = blockIdx.x;
  const int64_t rest = x / tiles;
  return {static_cast<int>(x % tiles), static_cast<int>(rest % heads),
          static_cast<int>(rest / heads)};
}

// Host side: the flat grid size, or 0 when it does not fit gridDim.x.
inline unsigned flat_grid(int tiles, int heads, int batch) {
  const int64_t blocks = static_cast<int64_t>(tiles) * heads * batch;
  return blocks <= 0x7fffffff ? static_cast<unsigned>(blocks) : 0u;
}

// Host side: the tile prefix sums of a packed grid (one block per tile of each stream).
inline int fill_tile_offsets(int* tile_offsets, const int* offsets, int num_streams, int tile) {
  tile_offsets[0] = 0;
  for (int s = 0; s < num_streams; ++s) {
    const int len = offsets[s + 1] - offsets[s];
    tile_offsets[s + 1] = tile_offsets[s] + (len + tile - 1) / tile;
  }
  return tile_offsets[num_streams];
}

// Host side, every kernel's launch: `kernel` over the flat grid of the tiles of `block_rows`
// rows of each stream (TileRows: its query rows or its key rows) x q_heads * head_parts x batch,
// with `smem` bytes of dynamic shared memory. Nothing to do is success.
enum class TileRows { kQuery, kKey };
template <typename Kernel>
cudaError_t launch_over_tiles(Kernel kernel, AttentionParams p, TileRows rows, int block_rows,
                              int smem, int head_parts, cudaStream_t stream) {
  const bool query = rows == TileRows::kQuery;
  const int tiles = fill_tile_offsets(query ? p.q_tile_offsets : p.kv_tile_offsets,
                                      query ? p.q_offsets : p.kv_offsets, p.num_streams, block_rows);
  if (tiles == 0 || p.batch == 0 || p.q_heads == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const unsigned blocks = flat_grid(tiles, p.q_heads * head_parts, p.batch);
  if (blocks == 0) return cudaErrorInvalidConfiguration;
  kernel<<<blocks, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace peer_attention
