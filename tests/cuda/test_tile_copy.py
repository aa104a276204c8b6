"""The pointer-stepped tile copies of csrc/kernel_common.cuh (TileCopy and TileCopyBlocks, used by
load_tile_async):
over the threads of a block, every 16-byte chunk of every kernel's tile is copied exactly once,
and the shared-memory offsets (swizzle) of the copies are distinct and inside the tile. Compiled
as a host program with nvcc (no GPU); the mapping is the one the kernels use."""
import re
import shutil
import subprocess

import pytest

from tests.cuda.host_program import CSRC, host_program_output

PROGRAM = r"""
#include <cstdio>
#include <set>
#include <utility>
#include "kernel_common.cuh"
using namespace peer_attention;

template <int ROWS, int D> int check() {
  using Copy = TileCopy<ROWS, D>;
  if (!Copy::kFixedColumn) { std::printf("per-chunk %d %d\n", ROWS, D); return 0; }
  std::set<std::pair<int, int>> chunks;
  std::set<int> offsets;
  for (int tid = 0; tid < kThreads; ++tid)
    for (int i = 0; i < Copy::kCopies; ++i) {
      const int row = Copy::row(tid, i), col = Copy::col(tid);
      if (row < 0 || row >= ROWS || col < 0 || col >= D || col % 8) {
        std::printf("FAIL outside %d %d: tid %d copy %d -> (%d, %d)\n", ROWS, D, tid, i, row, col);
        return 1;
      }
      chunks.insert({row, col});
      const int at = swizzle<D>(row, col);
      if (at < 0 || at >= ROWS * D || at % 8) {
        std::printf("FAIL smem %d %d: (%d, %d) -> %d\n", ROWS, D, row, col, at);
        return 1;
      }
      offsets.insert(at);
    }
  const size_t expected = size_t(ROWS) * (D / 8);
  if (chunks.size() != expected || offsets.size() != expected ||
      size_t(kThreads) * Copy::kCopies != expected) {
    std::printf("FAIL cover %d %d: %zu chunks, %zu offsets, %d copies, expected %zu\n", ROWS, D,
                chunks.size(), offsets.size(), kThreads * Copy::kCopies, expected);
    return 1;
  }
  std::printf("ok %d %d\n", ROWS, D);
  return 0;
}

// TileCopyBlocks (the plain forward's D = 96 copies, load_tile_async with kOrdered): every chunk
// once, the kernel's offsets (offset(): the first copy's swizzled offset plus immediates) equal
// swizzle<D> and are distinct, and the source steps the kernel takes (one pointer stepped by
// kRowStep rows, plus block * 32 elements) reach row(tid, round), col(tid, block)
template <int ROWS, int D> int check_blocks() {
  using Blocks = TileCopyBlocks<ROWS, D>;
  if (!Blocks::kApplies) { std::printf("blocks n/a %d %d\n", ROWS, D); return 0; }
  std::set<std::pair<int, int>> chunks;
  std::set<int> offsets;
  for (int tid = 0; tid < kThreads; ++tid)
    for (int round = 0; round < Blocks::kRounds; ++round)
      for (int block = 0; block < Blocks::kBlocks; ++block) {
        const int row = Blocks::row(tid, round), col = Blocks::col(tid, block);
        const bool stepped = row == Blocks::row(tid, 0) + round * Blocks::kRowStep &&
                             col == Blocks::col(tid, 0) + block * Blocks::kBlockChunks * 8;
        if (!stepped || row < 0 || row >= ROWS || col < 0 || col >= D || col % 8 ||
            Blocks::offset(tid, round, block) != swizzle<D>(row, col)) {
          std::printf("FAIL blocks %d %d: tid %d round %d block %d -> (%d, %d) at %d, swizzle %d\n",
                      ROWS, D, tid, round, block, row, col, Blocks::offset(tid, round, block),
                      swizzle<D>(row, col));
          return 1;
        }
        chunks.insert({row, col});
        offsets.insert(Blocks::offset(tid, round, block));
      }
  const size_t expected = size_t(ROWS) * (D / 8);
  if (chunks.size() != expected || offsets.size() != expected ||
      size_t(kThreads) * Blocks::kRounds * Blocks::kBlocks != expected) {
    std::printf("FAIL blocks cover %d %d: %zu chunks, %zu offsets\n", ROWS, D, chunks.size(),
                offsets.size());
    return 1;
  }
  std::printf("blocks ok %d %d\n", ROWS, D);
  return 0;
}

int main() {
  int failed = 0;
  failed += check_blocks<32, 96>() + check_blocks<64, 96>() + check_blocks<128, 96>();
  failed += check_blocks<64, 160>() + check_blocks<64, 32>() + check_blocks<64, 64>();
  failed += check_blocks<64, 128>() + check_blocks<64, 192>() + check_blocks<64, 256>();
  failed += check<32, 32>() + check<64, 32>() + check<32, 64>() + check<64, 64>();
  failed += check<32, 96>() + check<64, 96>() + check<32, 128>() + check<64, 128>();
  failed += check<32, 256>() + check<64, 256>();
  failed += check<32, 160>() + check<64, 160>() + check<32, 192>() + check<64, 192>();
  return failed;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_every_chunk_is_copied_once(tmp_path):
    stdout = host_program_output(tmp_path, "tile_copy", PROGRAM)
    lines = stdout.split("\n")
    # every kernel head dim but 96, 160 and 192 (12, 20, 24 chunks per row: 128 threads do not
    # cover whole rows)
    # takes the stepped path
    assert sum(line.startswith("ok") for line in lines) == 8, stdout
    assert "per-chunk 64 96" in lines and "per-chunk 32 96" in lines
    assert all(f"per-chunk {r} {d}" in lines for r in (32, 64) for d in (160, 192))
    # the plain forward's D = 96 copies (kOrdered): 32-column blocks, every chunk once; the
    # dims whose rows 128 threads cover whole keep TileCopy (D = 192: groups of 8 chunks)
    assert all(f"blocks ok {r} 96" in lines for r in (32, 64, 128)), stdout
    assert "blocks ok 64 160" in lines, stdout
    assert all(f"blocks n/a 64 {d}" in lines for d in (32, 64, 128, 192, 256)), stdout


STEP_PROBE = r"""
#include "kernel_common.cuh"
__global__ void probe(const __half** out, const __half* p) {
  peer_attention::step_pointer(p, 3);  // 3 elements of 2 bytes
  *out = p;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_step_pointer_adds_bytes(tmp_path):
    # step_pointer (the kOrdered copies) adds with an asm statement, which counts bytes, not
    # elements: 3 half elements must become 6 in the PTX that feeds the add
    source = tmp_path / "step.cu"
    source.write_text(STEP_PROBE)
    ptx = tmp_path / "step.ptx"
    subprocess.run(["nvcc", "-ptx", "-arch=sm_80", "-std=c++17", "--expt-relaxed-constexpr",
                    f"-I{CSRC}", "-o", str(ptx), str(source)], check=True, capture_output=True)
    text = ptx.read_text()
    add = re.search(r"add\.s64\s+(%rd\d+),\s*\1,\s*(%rd\d+);", text)
    assert add, text
    assert re.search(rf"mov\.u64\s+{re.escape(add.group(2))},\s*6;", text), text
