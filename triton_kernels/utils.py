"""Host-side helpers shared by the launchers: interpreter flag, dtype and shape helpers."""
from __future__ import annotations

import contextlib
import os

import torch
import triton

# Read once, like triton itself: TRITON_INTERPRET must be set before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# attn_mask kinds (a compile-time flag of the kernels)
MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2

MIN_DIM_PAD = 16  # tl.dot needs every dimension >= 16


def padded_dim(n: int) -> int:
    """Head dims are padded in registers (masked loads) to a power of two, never in memory."""
    return max(MIN_DIM_PAD, triton.next_power_of_2(max(n, 1)))


# dK/dV uses 3xTF32 up to this padded head dim and IEEE above; every other kernel 3xTF32
TF32X3_DKDV_MAX_DIM = 128


def f32_precision(dtype: torch.dtype, e_pad: int, ev_pad: int, kernel: str = "fwd") -> str:
    """A kernel's F32_DOT flag: the input_precision of its products in fp32, or "" for 16-bit
    tensor-core products (bf16/fp16 inputs on a GPU). Under the interpreter bf16 dots are wrong,
    so every product is done in fp32 there (whatever the precision).

    fp32 inputs: "tf32x3" (3xTF32: tensor cores, each operand split into a TF32 high part and a
    TF32 remainder, three products; per-product error ~2^-22, fp32's own size), except "ieee"
    (FMA loops) for the dK/dV kernel ("dkdv") at padded head dims above TF32X3_DKDV_MAX_DIM:
    there the split operands of its four products need more shared memory than sm_86/89/120
    have at every tile (16x32: 147,456 B against IEEE's 100,352) and spill 9x more (sm_80: 61 KB
    against 6.7 KB), docs/triton_compile_report.md. Both meet SPEC section 8's fp32 bound per
    kernel (tests/triton/test_fp32_precision.py); plain "tf32" (100x the bound) never runs."""
    if not (INTERPRET or dtype == torch.float32):
        return ""
    if kernel == "dkdv" and max(e_pad, ev_pad) > TF32X3_DKDV_MAX_DIM:
        return "ieee"
    return "tf32x3"


# the kernels' F32_DOT constexpr: an int code of f32_precision's answer (a str inside the Flags
# constexpr tuple reaches a jit function as a plain Python str, which Triton cannot take)
F32_DOT_CODES = {"": 0, "tf32x3": 1, "ieee": 2}
F32_DOT_PRECISIONS = {code: name for name, code in F32_DOT_CODES.items()}


def f32_dot(dtype: torch.dtype, e_pad: int, ev_pad: int, kernel: str = "fwd") -> int:
    """f32_precision as the kernels' F32_DOT code (F32_DOT_CODES)."""
    return F32_DOT_CODES[f32_precision(dtype, e_pad, ev_pad, kernel)]


def launch_device(tensor):
    """The launch guard: Triton launches on the current CUDA device (and its current stream, and
    allocates tensor-descriptor scratch there), which need not hold the inputs (device_map="auto"
    models put layers on cuda:1 while cuda:0 is current)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def mask_kind(mask) -> int:
    if mask is None:
        return MASK_NONE
    return MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT


def mask_for_kernel(mask):
    """A bool mask is read as bytes (same strides, no copy)."""
    if mask is not None and mask.dtype == torch.bool:
        return mask.view(torch.uint8)
    return mask


def strides_or_zero(t, ndim: int):
    return tuple(t.stride()) if t is not None else (0,) * ndim


# query/key tile sizes the tile schedule serves (BLOCK_M and BLOCK_N of every config)
TILE_SIZES = (16, 32, 64, 128)


def _tile_offsets(lens, device):
    """(8, S+1) int32: row block // 16 - 1 holds the prefix sum of cdiv(len, block) over the
    streams, for each block of TILE_SIZES (other rows unused): the flat (stream, tile)
    schedule of the row-major and key-major kernels."""
    table = torch.zeros(8, len(lens) + 1, dtype=torch.int32)
    for block in TILE_SIZES:
        counts = torch.tensor([-(-n // block) for n in lens], dtype=torch.int32)
        table[block // 16 - 1, 1:] = torch.cumsum(counts, 0)
    return table.to(device)


def num_tiles(lens, block: int) -> int:
    assert block in TILE_SIZES, f"tile size {block} not in {TILE_SIZES}"
    return sum(-(-n // block) for n in lens)


def search_steps(num_streams: int) -> int:
    """Binary-search steps to find a tile's stream among num_streams."""
    return max(num_streams - 1, 0).bit_length()


def stream_tables(problem, device):
    """int32 device tables of the packed problem: prefix offsets of the streams, the tile
    schedules, and the peer table as compact lists (cost follows attended pairs only):
    peers of s = peer_list[peer_start[s]:peer_start[s+1]], streams attending p likewise in
    src_list. The diagonal (varlen) table needs no list: the kernels take p = s."""
    q_offsets = problem.stream_offsets(problem.q_lens)
    kv_offsets = problem.stream_offsets(problem.kv_lens)
    n = problem.num_streams
    peer_start, peer_list, src_start, src_list = [0], [], [0], []
    if not problem.diagonal_peers:
        for s in range(n):
            peer_list += [p for p in range(n) if problem.peers[s * n + p]]
            peer_start.append(len(peer_list))
            src_list += [t for t in range(n) if problem.peers[t * n + s]]
            src_start.append(len(src_list))

    def ints(values):
        return torch.tensor(values or [0], dtype=torch.int32, device=device)

    return dict(q_off=ints(q_offsets), kv_off=ints(kv_offsets),
                q_tiles=_tile_offsets(problem.q_lens, device),
                kv_tiles=_tile_offsets(problem.kv_lens, device),
                peer_start=ints(peer_start), peer_list=ints(peer_list),
                src_start=ints(src_start), src_list=ints(src_list))


def band(problem):
    """(left, right) of the self-pair band with is_causal folded in (-1 = unbounded)."""
    left, right = problem.window_left, problem.window_right
    if problem.is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def tma_ok(*tensors) -> bool:
    """Tensor descriptors (TMA) need the last dim contiguous and 16-byte aligned base and rows."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def dropout_args(problem):
    """(seed, offset, p) for the in-kernel Philox generator; zeros when there is no dropout."""
    if problem.dropout_p > 0 and problem.dropout_seed is not None:
        seed, offset = (int(x) for x in problem.dropout_seed.tolist())
        # tl.rand takes a 32/64-bit seed; keep it and the offset in the positive int63 range
        return seed & ((1 << 62) - 1), offset & ((1 << 40) - 1), float(problem.dropout_p)
    return 0, 0, 0.0


def one_accumulator(problem) -> bool:
    """Whether the forward's peers can share one accumulator: at most one attended peer per
    stream (SDPA, varlen), or "joint" without gates (a peer's bias is a shift of the max)."""
    single = problem.num_streams == 1 or problem.diagonal_peers
    return single or (problem.normalize != "peer" and problem.gate is None)
