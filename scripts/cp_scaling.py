"""Context parallelism on paper: per-rank compute and communication of ring and Ulysses.

    python scripts/cp_scaling.py                                  # 3 streams x 64k, W = 2, 4, 8
    python scripts/cp_scaling.py --streams 1 --tokens 131072 --world 8 16 --tflops 450

For S streams of N tokens each (every stream attending every stream unless --pairs self), batch
B, Hq query and H key/value heads of dims E and Ev, on W ranks:

Ring (per step; W steps): each rank computes its N/W queries of every stream against one rank's
N/W keys of every stream, while it sends that key/value shard on (and receives the next):
    compute = sum over attended pairs of 2 B Hq (N/W)^2 (E + Ev)          (bench/flops.py)
    bytes   = B H S (N/W) (E + Ev) * dtype bytes                            (sent = received)
Causal self pairs: with "zigzag" every rank computes half of every self block; with "contiguous"
the last rank computes whole blocks on every step but its diagonal, and the ring moves at the
pace of its slowest rank, so a step costs a whole block. The transfer hides behind the compute
when bytes / bandwidth <= compute / rate. Backward: 2.5x the compute; K/V (dtype) plus the dK/dV
accumulators (fp32) travel.
Ulysses: all-to-all of q, k, v before and of the output after (backward: the same volume in
gradients); a rank keeps 1/W of its data and sends the rest:
    bytes   = (W-1)/W * B (Hq S (N/W) (E + Ev) + H S (N/W) (E + Ev)) * dtype bytes
    compute = the one-process FLOPs / W (full sequences, Hq/W heads; causal halves self pairs).
The local kernel needs the all-to-all's result, so this communication adds to the compute.

The kernel rate is an argument. Its default, 300 TFLOP/s forward, is an ASSUMPTION for an
H100-class GPU in bf16 (FlashAttention-2 reports ~300-350 there), not a measurement of our
kernels: pass what `python -m bench` measured on your GPU. Link bandwidths: NVLink about
450 GB/s per direction (H100 SXM), InfiniBand NDR about 50 GB/s per GPU. Latency, kernel launch
and the partial merges are left out: this is a bound on when overlap is possible, not a timing.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.flops import BACKWARD_FACTOR, pair_flops  # noqa: E402

ASSUMED_TFLOPS = 300.0
LINKS_GBPS: Dict[str, float] = {"NVLink": 450.0, "InfiniBand": 50.0}


@dataclass(frozen=True)
class Sizes:
    streams: int = 3
    tokens: int = 65536          # per stream (queries and keys)
    batch: int = 1
    q_heads: int = 24
    kv_heads: int = 24
    head_dim: int = 128
    value_dim: int = 128
    dtype_bytes: int = 2         # bf16
    causal: bool = True          # on the self pairs
    all_pairs: bool = True       # every stream attends every stream (else: itself only)

    def pairs(self):
        n = self.streams
        return [(s, p) for s in range(n) for p in range(n) if self.all_pairs or s == p]


@dataclass(frozen=True)
class RingCost:
    step_flops: float            # forward, the slowest rank's step
    step_bytes: float            # forward, sent per rank per step
    bwd_step_flops: float
    bwd_step_bytes: float
    steps: int


@dataclass(frozen=True)
class UlyssesCost:
    flops: float                 # forward, per rank
    bytes: float                 # forward, sent per rank (all-to-alls before and after)
    bwd_flops: float
    bwd_bytes: float


def ring_cost(sizes: Sizes, world: int, layout: str = "zigzag") -> RingCost:
    n = sizes.tokens // world
    flops = 0.0
    for s, p in sizes.pairs():
        # zigzag: half of every causal self block; contiguous: the slowest rank's whole block
        half = sizes.causal and s == p and layout == "zigzag" and world > 1
        flops += pair_flops(sizes.batch, sizes.q_heads, n, n, sizes.head_dim, sizes.value_dim,
                            causal_self=half or (sizes.causal and s == p and world == 1))
    elems = sizes.batch * sizes.kv_heads * sizes.streams * n * (sizes.head_dim + sizes.value_dim)
    kv_bytes = elems * sizes.dtype_bytes if world > 1 else 0.0
    grad_bytes = elems * 4 if world > 1 else 0.0  # fp32 dK/dV accumulators
    return RingCost(flops, kv_bytes, BACKWARD_FACTOR * flops, kv_bytes + grad_bytes, world)


def ulysses_cost(sizes: Sizes, world: int) -> UlyssesCost:
    total = sum(pair_flops(sizes.batch, sizes.q_heads, sizes.tokens, sizes.tokens,
                           sizes.head_dim, sizes.value_dim, causal_self=sizes.causal and s == p)
                for s, p in sizes.pairs())
    n = sizes.tokens // world
    dims = sizes.head_dim + sizes.value_dim
    # q (E) and out (Ev) per query head, k (E) and v (Ev) per key/value head
    local = sizes.batch * sizes.streams * n * dims * (sizes.q_heads + sizes.kv_heads)
    sent = (world - 1) / world * local * sizes.dtype_bytes
    return UlyssesCost(total / world, sent, BACKWARD_FACTOR * total / world, sent)


def ms(amount: float, rate_per_s: float) -> float:
    return amount / rate_per_s * 1e3


def rows(sizes: Sizes, worlds: Sequence[int], tflops: float, links: Dict[str, float]) -> List[dict]:
    """One row per (world, link): per-step and total times of ring (both layouts) and Ulysses."""
    rate = tflops * 1e12
    out = []
    for world in worlds:
        uly = ulysses_cost(sizes, world)
        for link, gbps in links.items():
            bw = gbps * 1e9
            row = dict(world=world, link=link)
            for layout in ("zigzag", "contiguous"):
                ring = ring_cost(sizes, world, layout)
                compute, comm = ms(ring.step_flops, rate), ms(ring.step_bytes, bw)
                bwd_compute, bwd_comm = ms(ring.bwd_step_flops, rate), ms(ring.bwd_step_bytes, bw)
                row[layout] = dict(
                    step_compute_ms=compute, step_comm_ms=comm, hidden=comm <= compute,
                    bwd_hidden=bwd_comm <= bwd_compute,
                    fwd_ms=ring.steps * max(compute, comm),
                    bwd_ms=ring.steps * max(bwd_compute, bwd_comm),
                    step_mb=ring.step_bytes / 1e6)
            if sizes.q_heads % world or sizes.kv_heads % world:
                row["ulysses"] = None  # it needs Hq and H divisible by W
                out.append(row)
                continue
            row["ulysses"] = dict(compute_ms=ms(uly.flops, rate), comm_ms=ms(uly.bytes, bw),
                                  fwd_ms=ms(uly.flops, rate) + ms(uly.bytes, bw),
                                  bwd_ms=ms(uly.bwd_flops, rate) + ms(uly.bwd_bytes, bw),
                                  mb=uly.bytes / 1e6)
            out.append(row)
    return out


def markdown(sizes: Sizes, table: List[dict], tflops: float) -> str:
    lines = [
        f"{sizes.streams} stream(s) x {sizes.tokens} tokens, B={sizes.batch}, Hq={sizes.q_heads}, "
        f"H={sizes.kv_heads}, E={sizes.head_dim}, Ev={sizes.value_dim}, "
        f"{sizes.dtype_bytes}-byte dtype, {'causal' if sizes.causal else 'not causal'}, "
        f"{'all stream pairs' if sizes.all_pairs else 'self pairs only'}; kernel rate "
        f"{tflops:g} TFLOP/s (assumed unless measured), forward (backward in brackets).",
        "",
        "| W | link | ring step compute ms | ring step transfer ms (MB) | ring hides transfer "
        "| ring zigzag total ms | ring contiguous total ms | Ulysses compute + all-to-all ms "
        "(MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        z, c, u = row["zigzag"], row["contiguous"], row["ulysses"]
        ulysses = ("n/a (heads not divisible by W)" if u is None else
                   f"{u['compute_ms']:.1f} + {u['comm_ms']:.1f} ({u['mb']:.0f})")
        lines.append(
            f"| {row['world']} | {row['link']} | {z['step_compute_ms']:.2f} "
            f"| {z['step_comm_ms']:.2f} ({z['step_mb']:.0f}) "
            f"| {'yes' if z['hidden'] else 'no'} ({'yes' if z['bwd_hidden'] else 'no'}) "
            f"| {z['fwd_ms']:.1f} ({z['bwd_ms']:.1f}) | {c['fwd_ms']:.1f} ({c['bwd_ms']:.1f}) "
            f"| {ulysses} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Sizes()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="per stream")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--heads", type=int, default=defaults.q_heads)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--value-dim", type=int, default=None, help="default: --head-dim")
    parser.add_argument("--dtype-bytes", type=int, default=defaults.dtype_bytes)
    parser.add_argument("--not-causal", action="store_true")
    parser.add_argument("--pairs", choices=("all", "self"), default="all")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tflops", type=float, default=ASSUMED_TFLOPS,
                        help=f"forward kernel rate per GPU (default {ASSUMED_TFLOPS:g}, assumed)")
    parser.add_argument("--link", nargs="+", default=None, metavar="NAME=GBPS",
                        help="link bandwidths per direction (default NVLink=450 InfiniBand=50)")
    args = parser.parse_args(argv)
    sizes = Sizes(args.streams, args.tokens, args.batch, args.heads, args.kv_heads or args.heads,
                  args.head_dim, args.value_dim or args.head_dim, args.dtype_bytes,
                  not args.not_causal, args.pairs == "all")
    for world in args.world:
        if sizes.tokens % (2 * world):
            parser.error(f"--tokens {sizes.tokens} is not divisible by 2 x world {world}")
    links = LINKS_GBPS if not args.link else {
        name: float(value) for name, value in (item.split("=") for item in args.link)}
    print(markdown(sizes, rows(sizes, args.world, args.tflops, links), args.tflops))


if __name__ == "__main__":
    main()
