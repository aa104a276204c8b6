"""torch.nn modules built on the fused kernels: the multi-stream PeerAttention block and a
drop-in MultiheadAttention."""
from .multihead import MultiheadAttention
from .peer_attention_block import PeerAttention

__all__ = ["PeerAttention", "MultiheadAttention"]
