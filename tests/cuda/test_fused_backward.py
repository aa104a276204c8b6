"""The fused backward of csrc/backward.cuh (bwd_fused_kernel: FlashAttention-2's one loop, dQ by
float32 atomics), checked without a GPU:

- its index maps (FusedBwdMaps), compiled from the kernel header as a host program with nvcc:
  the dS^T stores (XOR form) equal swizzle<64> of their (key, query), cover the 64 x 64 dS tile
  once and are free of bank conflicts; the transposing ldmatrix of that tile, emulated element
  by element, hands every lane exactly the A fragment of dS (query x key) that mma.m16n8k16
  expects; the dQ atomics of 4 warps cover every element of the 64 x D tile once, and the
  kernel's base-pointer-plus-constant form addresses the same element; the shared memory of
  every instantiation fits 101376 B (sm_86/89/120), the dS tile inside a Q stage where it is
  not its own (D >= 96; at D = 96 small enough for 2 blocks per SM on sm_80); the query slices
  of the key-major step (key_major_choice) address the same elements as the whole tile, the dS
  tile over Q's first slice stays inside it, and the KeyBlock in shared memory is aligned and
  inside the launch's bytes;
- the query-tile schedule of the key-major loop (masked tiles, unmasked tiles, then a partial
  last tile masked again when dQ rows are written), transcribed from the kernel: every tile once,
  in order, the partial one never unmasked.
"""
import shutil

import pytest

from tests.cuda.host_program import host_program_output

PROGRAM = r"""
#include <cstdio>
#include <set>
#include <vector>
#include "backward.cuh"
using namespace peer_attention;

constexpr int BM = 64, BN = 64;
using Maps = FusedBwdMaps<BM>;

int id(int q, int key) { return q * BN + key; }  // dS[q][key]

int check_ds() {
  int bad = 0;
  std::vector<int> mem(BN * BM, -1);
  for (int warp = 0; warp < kWarps; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int kk = 0; kk < BM / 16; ++kk)
        for (int r = 0; r < 4; ++r) {
          const int key = Maps::ds_key(warp, lane, r), q = Maps::ds_query(lane, kk, r);
          const int at = Maps::ds_store_offset(warp, lane, kk, r);
          bad += at != swizzle<BM>(key, q);  // the XOR form is the swizzle
          bad += at % 2 != 0 || at < 0 || at + 1 >= BN * BM;
          if (at < 0 || at + 1 >= BN * BM) continue;
          bad += mem[at] != -1 || mem[at + 1] != -1;  // each element stored once
          mem[at] = id(q, key);
          mem[at + 1] = id(q + 1, key);
        }
  for (int x : mem) bad += x < 0;  // every element stored
  // bank conflicts of the stores: per warp, per (kk, r), 32 lanes x 4 bytes
  int worst = 1;
  for (int warp = 0; warp < kWarps; ++warp)
    for (int kk = 0; kk < BM / 16; ++kk)
      for (int r = 0; r < 4; ++r) {
        int count[32] = {0};
        for (int lane = 0; lane < 32; ++lane) {
          const int bank = (Maps::ds_store_offset(warp, lane, kk, r) * 2 / 4) % 32;
          if (++count[bank] > worst) worst = count[bank];
        }
      }
  // dQ's A fragments: ldmatrix.x4.trans, matrix m's row i at the address of lane 8 m + i; lane
  // 4 g + t gets (row 2t, column g) and (row 2t + 1, column g) of matrix m in register m
  for (int warp = 0; warp < kWarps; ++warp)
    for (int k0 = 0; k0 < BN; k0 += 16)
      for (int lane = 0; lane < 32; ++lane)
        for (int m = 0; m < 4; ++m) {
          const int g = lane >> 2, t = lane & 3;
          const int row_lo = Maps::ds_load_bytes(warp, 8 * m + 2 * t, k0) / 2;
          const int row_hi = Maps::ds_load_bytes(warp, 8 * m + 2 * t + 1, k0) / 2;
          const int lo = mem[row_lo + g], hi = mem[row_hi + g];
          // A fragment (m16n8k16, row major 16 x 16): a0 = (g, 2t..), a1 = (g + 8, 2t..),
          // a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..); rows = queries 16 warp.., cols = keys k0..
          const int q = 16 * warp + g + 8 * (m & 1), key = k0 + 2 * t + 8 * (m >> 1);
          bad += lo != id(q, key) || hi != id(q, key + 1);
        }
  std::printf("ds %d %d\n", bad, worst);
  return bad != 0 || worst != 1;
}

template <int D> int check_dq() {
  constexpr int kChunk = FusedBwdConfig<D>::kDqChunk;
  std::vector<int> count(BM * D, 0);
  int bad = 0;
  for (int warp = 0; warp < kWarps; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int c0 = 0; c0 < D; c0 += kChunk)
        for (int nt = 0; nt < kChunk / 8; ++nt)
          for (int e = 0; e < 4; ++e) {
            const int row = Maps::dq_row(warp, lane, e), col = Maps::dq_col(lane, c0, nt, e);
            if (row < 0 || row >= BM || col < 0 || col >= D) { ++bad; continue; }
            ++count[row * D + col];
            const int kernel_form = (Maps::dq_row(warp, lane, 0) + 8 * (e >> 1)) * D +
                                    Maps::dq_col(lane, 0, 0, 0) + Maps::dq_at(c0, nt, e);
            bad += kernel_form != row * D + col;
          }
  for (int c : count) bad += c != 1;
  std::printf("dq %d %d\n", D, bad);
  return bad != 0;
}

template <int D, typename T> int check_smem() {
  using Cfg = FusedBwdConfig<D>;
  const int smem = Cfg::template smem_bytes<T>();
  const bool own = Cfg::template own_ds<T>();
  const bool ok = smem <= kSmallSmemPerBlock && (own || Cfg::kBlockM * D >= BN * BM) &&
                  Cfg::kBlockM == 16 * kWarps && Cfg::kBlockN == BN && D % Cfg::kDqChunk == 0;
  std::printf("smem %d %d %d %d\n", D, int(sizeof(T)), smem, own ? 1 : 0);
  return !ok;
}

// key_major_backward's query slices: S^T, dP^T and the dV / dK products of query rows c0.. read
// the tile at q_tile + c0 * D as a tile of their own, which needs swizzle<D>(c0 + r, col) ==
// c0 * D + swizzle<D>(r, col) for every slice start c0 (multiples of BM / slices); the dS tile
// over Q's first slice (ds_in_slice0) must lie inside that slice's rows and leave the others
template <int D> int check_slices() {
  int bad = 0;
  for (int slices = 1; slices <= 4; slices *= 2) {
    const int sw = BM / slices;
    for (int c0 = 0; c0 < BM; c0 += sw)
      for (int r = 0; r < sw; ++r)
        for (int col = 0; col < D; ++col) bad += swizzle<D>(c0 + r, col) != c0 * D + swizzle<D>(r, col);
  }
  if (D == 128) {  // ds_in_slice0 (2 slices): every dS store inside Q rows 0 .. BM / 2
    for (int warp = 0; warp < kWarps; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int kk = 0; kk < BM / 16; ++kk)
          for (int r = 0; r < 4; ++r) {
            const int at = Maps::ds_store_offset(warp, lane, kk, r);
            bad += at < 0 || at + 1 >= (BM / 2) * D;
          }
  }
  std::printf("slices %d %d\n", D, bad);
  return bad != 0;
}

// the KeyBlock behind the key-major kernels' shared memory: 8-byte aligned, inside the launch's
// bytes (dkdv_kernel's layout; the fused kernel's adds the dS tile before the floats)
template <int D, typename T> int check_key_block() {
  using Cfg = DkdvConfig<D>;
  int bad = 0;
  for (int own = 0; own <= 1; ++own) {
    const int ds = own ? Cfg::kBlockN * Cfg::kBlockM : 0;
    const int at = (2 * Cfg::kBlockN * D + 4 * Cfg::kBlockM * D + ds) * int(sizeof(T)) +
                   (D + 4 * Cfg::kBlockM) * 4 + 2 * kMaxStreams * 4;
    const int total = own ? FusedBwdConfig<D>::template smem_bytes<T>() : Cfg::template smem_bytes<T>();
    if (own && !FusedBwdConfig<D>::template own_ds<T>()) continue;
    bad += at % 8 != 0 || at + int(sizeof(KeyBlock)) > total;
  }
  std::printf("block %d %d %d\n", D, int(sizeof(T)), bad);
  return bad != 0;
}

int main() {
  int failed = check_ds();
  failed += check_slices<32>() + check_slices<64>() + check_slices<96>() + check_slices<128>();
  failed += check_key_block<32, __half>() + check_key_block<64, __half>() +
            check_key_block<96, __half>() + check_key_block<128, __nv_bfloat16>();
  failed += check_dq<32>() + check_dq<64>() + check_dq<96>() + check_dq<128>();
  failed += check_smem<32, __half>() + check_smem<64, __half>() + check_smem<96, __half>() +
            check_smem<128, __half>() + check_smem<128, __nv_bfloat16>();
  return failed;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_fused_backward_index_maps_on_the_host(tmp_path):
    stdout = host_program_output(tmp_path, "fused_backward_host", PROGRAM)
    lines = stdout.split("\n")
    assert "ds 0 1" in lines, stdout  # exact fragments, conflict-free stores
    assert all(f"dq {d} 0" in lines for d in (32, 64, 96, 128)), stdout
    smem = {tuple(map(int, line.split()[1:3])): line.split()[3:] for line in lines
            if line.startswith("smem ")}
    assert len(smem) == 4  # fp16 and bf16 share (D, 2): both checked by the exit status
    # D = 128: the dS tile goes into a Q stage (its own would need 108160 B > 101376)
    assert smem[(128, 2)][1] == "0" and smem[(64, 2)][1] == "1", stdout
    # D = 96: the dS tile in a Q stage too (spill-free there, and 2 blocks per SM on sm_80)
    assert smem[(96, 2)][1] == "0" and int(smem[(96, 2)][0]) <= 167936 // 2 - 1024, stdout
    assert all(f"slices {d} 0" in lines for d in (32, 64, 96, 128)), stdout
    assert sum(line.startswith("block ") and line.endswith(" 0") for line in lines) == 4, stdout


def query_tile_visits(first, end, unmasked_from, q_len, block=64, fused=True):
    """The key-major loop of key_major_backward (plain path), transcribed: (tile, masked)."""
    visits = []
    tile = first
    unmasked_end = end - 1 if fused and q_len % block != 0 else end
    masked_end = unmasked_from
    while True:
        while tile < masked_end:
            visits.append((tile, True))
            tile += 1
        if tile >= end:
            break
        while tile < unmasked_end:
            visits.append((tile, False))
            tile += 1
        masked_end = end
    return visits


@pytest.mark.parametrize("fused", [True, False])
def test_query_tile_schedule_visits_every_tile_once(fused):
    for q_len in range(1, 5 * 64 + 3, 7):
        end = -(-q_len // 64)
        for first in range(end + 1):
            for unmasked_from in range(first, end + 1):
                visits = query_tile_visits(first, end, unmasked_from, q_len, fused=fused)
                assert [t for t, _ in visits] == list(range(first, end))
                for t, masked in visits:
                    if t < unmasked_from:
                        assert masked  # the causal diagonal / key limit tiles
                    partial = (t + 1) * 64 > q_len
                    if fused and partial:
                        assert masked  # dQ rows past the stream: only the masked step tests
                    if not fused and t >= unmasked_from:
                        assert not masked  # dkdv_kernel's schedule is unchanged
