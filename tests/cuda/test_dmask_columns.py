"""The gradient of a mask broadcast over queries in csrc/backward.cuh's dQ kernel
(add_dmask_columns), checked without a GPU: its reduce-scatter over shuffles, run step by step for
32 emulated lanes with the kernel header's maps (DmaskColumnSum) compiled as a host program,
leaves every key column of a warp's dS fragments summed over its 16 query rows in exactly one
lane, which adds it once (columns past the keys skipped); swapping the kept and sent halves
fails. The kernel itself runs in
tests/cuda/test_kernels.py (GPU) against the reference."""
import shutil

import pytest

from tests.cuda.host_program import host_program_output

PROGRAM = r"""
#include <cstdio>
#include <vector>
#include "backward.cuh"
using namespace peer_attention;

using Sum = DmaskColumnSum;

// dS of a warp: 16 rows x BN columns, small integers (float sums exact)
float ds_at(int row, int col) { return float((row * 7 + col * 13) % 23 - 11); }

// add_dmask_columns for the 32 lanes of a warp, step by step (a shuffle reads the partner's
// value from before the step); `broken` swaps the kept and sent halves (must fail)
int check(int bn, int columns, bool broken = false) {
  const int n = bn / 4;
  int bad = 0;
  // the C fragments as dq_kernel holds them: lane 4 g + t, fragment nt, element e -> row g + 8
  // (e >> 1), column 8 nt + 2t + (e & 1); the lane's row sums ds[nt][c] + ds[nt][c + 2]
  std::vector<std::vector<float>> v(32, std::vector<float>(n));
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < n; ++i) {
      const int g = lane >> 2, col = 8 * (i >> 1) + 2 * (lane & 3) + (i & 1);
      bad += Sum::column_of(lane, i) != col;
      v[lane][i] = ds_at(g, col) + ds_at(g + 8, col);
    }
  for (int step = 0; step < Sum::kSteps; ++step) {
    const int m = n >> step;
    std::vector<std::vector<float>> send(32, std::vector<float>(m / 2)), keep = send;
    for (int lane = 0; lane < 32; ++lane)
      for (int k = 0; k < m / 2; ++k) {
        const bool up = Sum::upper(lane, step) != broken;
        send[lane][k] = Sum::sent(v[lane][k], v[lane][k + m / 2], up);
        keep[lane][k] = Sum::kept(v[lane][k], v[lane][k + m / 2], up);
      }
    for (int lane = 0; lane < 32; ++lane)
      for (int k = 0; k < m / 2; ++k)
        v[lane][k] = keep[lane][k] + send[lane ^ Sum::shuffle_mask(step)][k];
  }
  std::vector<int> adds(bn, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int k = 0; k < n / 8; ++k) {
      const int j = Sum::column(lane, n, k);
      if (j < 0 || j >= bn) { ++bad; continue; }
      if (j >= columns) continue;  // past the keys
      ++adds[j];
      float want = 0;
      for (int row = 0; row < 16; ++row) want += ds_at(row, j);
      bad += v[lane][k] != want;
    }
  for (int j = 0; j < bn; ++j) bad += adds[j] != (j < columns ? 1 : 0);
  std::printf("columns %d %d %d %d\n", bn, columns, broken ? 1 : 0, bad);
  return broken ? bad == 0 : bad != 0;
}

int main() {
  int failed = 0;
  // dq_kernel's key tiles: BN = 64 at D <= 128, 32 above
  for (int columns : {64, 1, 17, 40, 63}) failed += check(64, columns);
  failed += check(32, 32) + check(32, 9);
  failed += check(64, 64, true) + check(32, 32, true);
  return failed;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_query_broadcast_dmask_reduction_on_the_host(tmp_path):
    stdout = host_program_output(tmp_path, "dmask_columns_host", PROGRAM)
    lines = [line for line in stdout.split("\n") if line.startswith("columns ")]
    assert len(lines) == 9, stdout
    assert all(line.endswith(" 0") for line in lines if line.split()[3] == "0"), stdout
    assert all(not line.endswith(" 0") for line in lines if line.split()[3] == "1"), stdout
