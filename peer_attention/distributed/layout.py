"""Which positions of a sequence a rank holds, and the causal block pattern that follows.

Two layouts of a length-N sequence over W ranks (rank r):
  "contiguous": the chunk [r*N/W, (r+1)*N/W).
  "zigzag": N cut into 2W chunks of N/(2W); rank r holds chunks r and 2W-1-r, in that order.
            Under a causal mask every rank then has the same amount of work (an early chunk with
            little to attend to paired with a late chunk with much), where "contiguous" gives
            the last rank W times the work of the first.
Both keep a rank's positions in increasing global order, so a key-length limit (kv_lengths)
stays a prefix of a shard and a causal mask inside a rank's own shard stays top-left.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

CONTIGUOUS, ZIGZAG = "contiguous", "zigzag"
LAYOUTS = (CONTIGUOUS, ZIGZAG)

# parts of a shard: all of it, its first or second chunk (zigzag), or nothing
ALL, FIRST, SECOND, NONE = "all", "first", "second", "none"


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == ZIGZAG else 1


def segments(length: int, rank: int, world: int, layout: str) -> List[Tuple[int, int]]:
    """(global start, length) of each chunk rank `rank` holds of a sequence of `length`."""
    if layout == ZIGZAG:
        chunk = length // (2 * world)
        return [(rank * chunk, chunk), ((2 * world - 1 - rank) * chunk, chunk)]
    chunk = length // world
    return [(rank * chunk, chunk)]


def part_segments(local_len: int, rank: int, world: int, layout: str, part: str):
    """The chunks of `part` of rank's shard (local length local_len): [(global start, local
    start, length)]."""
    segs = segments(local_len * world, rank, world, layout)
    local, out = 0, []
    for index, (start, n) in enumerate(segs):
        if part == ALL or (part == FIRST and index == 0) or (part == SECOND and index == 1):
            out.append((start, local, n))
        local += n
    return out


def part_range(local_len: int, layout: str, part: str) -> Tuple[int, int]:
    """[begin, end) of `part` inside a local shard of length local_len."""
    if part == ALL:
        return 0, local_len
    half = local_len // 2
    if part == FIRST:
        return 0, half
    if part == SECOND:
        return half, local_len
    return 0, 0


def self_pattern(rank: int, src: int, layout: str, is_causal: bool) -> Tuple[str, str, bool]:
    """How the queries of `rank` see the keys held by `src` on a self pair: (query part, key
    part, causal inside the parts). Blocks wholly above the causal diagonal are left out."""
    if not is_causal:
        return ALL, ALL, False
    if src == rank:  # own shard: positions are increasing, so plain top-left causal holds
        return ALL, ALL, True
    if layout == ZIGZAG:
        # src < rank: only src's early chunk lies below both of rank's chunks;
        # src > rank: only rank's late chunk lies after both of src's chunks
        return (ALL, FIRST, False) if src < rank else (SECOND, ALL, False)
    return (ALL, ALL, False) if src < rank else (NONE, NONE, False)


def shard_kv_lengths(kv_lengths: Optional[Tensor], kv_local: Tuple[int, ...], src: int, world: int,
                     layout: str, part: str) -> Optional[Tensor]:
    """Global kv_lengths (B, S) -> how many keys of `part` of src's shard are valid, per stream
    (a prefix, since the shard's positions increase)."""
    if kv_lengths is None:
        return None
    columns = []
    for p, n in enumerate(kv_local):
        valid = torch.zeros_like(kv_lengths[:, p])
        for start, _local, length in part_segments(n, src, world, layout, part):
            valid = valid + (kv_lengths[:, p] - start).clamp(0, length)
        columns.append(valid)
    return torch.stack(columns, dim=1)


def shard(x: Tensor, rank: int, world: int, layout: str = CONTIGUOUS, dim: int = -2,
          name: str = "x") -> Tensor:
    """Rank `rank`'s shard of a full sequence tensor (a copy for zigzag, a view otherwise)."""
    check_layout(layout)
    length = x.shape[dim]
    pieces = world * chunks_per_rank(layout)
    if length % pieces:
        raise ValueError(
            f"{name}: the sequence length (dim {dim}) must be divisible by the number of chunks "
            f"({world} ranks x {chunks_per_rank(layout)} for layout={layout!r} = {pieces}), "
            f"got {length}")
    parts = [x.narrow(dim, start, n) for start, n in segments(length, rank, world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard(shards, layout: str = CONTIGUOUS, dim: int = -2) -> Tensor:
    """The full sequence from every rank's shard (in rank order)."""
    check_layout(layout)
    world = len(shards)
    if layout == CONTIGUOUS:
        return torch.cat(list(shards), dim=dim)
    half = shards[0].shape[dim] // 2
    early = [s.narrow(dim, 0, half) for s in shards]
    late = [s.narrow(dim, half, half) for s in reversed(shards)]
    return torch.cat(early + late, dim=dim)


def gather_order(local_len: int, world: int, layout: str, device) -> Tensor:
    """Index that puts W shards concatenated in rank order back into global order."""
    positions = []
    for rank in range(world):
        for start, n in segments(local_len * world, rank, world, layout):
            positions.append(torch.arange(start, start + n))
    return torch.argsort(torch.cat(positions)).to(device)
