"""Context parallelism over torch.distributed: ring and Ulysses attention (SPEC section 10).

    import torch.distributed as dist
    from peer_attention import distributed as cp
    dist.init_process_group("nccl")          # or "gloo" on the CPU; torchrun sets the rest
    out = cp.context_parallel_sdpa(q_shard, k_shard, v_shard, is_causal=True)
    outs = cp.context_parallel_peer_attention(q_shards, k_shards, v_shards, method="ulysses")

`shard`/`unshard` cut a full sequence into a rank's shard and put shards back together (both
layouts). `sdpa_forward/sdpa_backward/peer_forward/peer_backward` are the low-level
(out, lse) / (grad_out, out, lse) pairs for frameworks with their own ring attention.
"""
from .context import METHODS, context_parallel_peer_attention, context_parallel_sdpa
from .layout import CONTIGUOUS, LAYOUTS, ZIGZAG, shard, unshard
from .lowlevel import peer_backward, peer_forward, sdpa_backward, sdpa_forward

__all__ = [
    "context_parallel_sdpa",
    "context_parallel_peer_attention",
    "shard",
    "unshard",
    "sdpa_forward",
    "sdpa_backward",
    "peer_forward",
    "peer_backward",
    "METHODS",
    "LAYOUTS",
    "CONTIGUOUS",
    "ZIGZAG",
]
