"""What the Triton backend declines before any launch (auto then picks another backend)."""
import torch

from peer_attention.api import sdpa_problem
from peer_attention.backends.triton import MAX_GRID_Y, TritonBackend


def test_batch_times_heads_beyond_grid_axis_is_declined():
    q = torch.randn(300, 256, 1, 16)  # 76800 (batch, head) rows > 65535 programs on grid axis 1
    reasons = TritonBackend().not_supported_reasons(sdpa_problem(q, q, q))
    assert any(str(MAX_GRID_Y) in r for r in reasons), reasons
    small = torch.randn(2, 3, 1, 16)
    assert not TritonBackend().not_supported_reasons(sdpa_problem(small, small, small))
