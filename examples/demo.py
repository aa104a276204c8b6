"""A short tour: both operations, checked against torch, with the backend that served each.

    python examples/demo.py
"""
import torch
import torch.nn.functional as F

import peer_attention as pa
from peer_attention import dispatch
from peer_attention.api import peer_problem, sdpa_problem


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    print(f"device {device}, dtype {dtype}")
    print("backends:", {k: v or "available" for k, v in pa.available_backends().items()})

    # 1. The drop-in: causal grouped-query attention, 8 query heads sharing 2 key/value heads.
    q = torch.randn(2, 8, 128, 64, device=device, dtype=dtype)
    k = torch.randn(2, 2, 128, 64, device=device, dtype=dtype)
    v = torch.randn(2, 2, 128, 64, device=device, dtype=dtype)
    out = pa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    served = dispatch.select(sdpa_problem(q, k, v, is_causal=True, enable_gqa=True)).name
    print(f"scaled_dot_product_attention: out {tuple(out.shape)}, served by {served!r}, "
          f"max |diff| vs torch = {(out - expected).abs().max().item():.2e}")

    # 2. Peer attention: RGB (96 tokens), optical flow (64) and audio (32) streams. Audio does not
    #    attend to flow; every pair has a learned per-channel gate and a per-head log-prior.
    lengths = (96, 64, 32)
    queries = [torch.randn(2, 4, n, 32, device=device, dtype=dtype) for n in lengths]
    keys = [torch.randn(2, 4, n, 32, device=device, dtype=dtype) for n in lengths]
    values = [torch.randn(2, 4, n, 32, device=device, dtype=dtype) for n in lengths]
    peers = [[True, True, True], [True, True, True], [True, False, True]]
    gate = torch.sigmoid(torch.randn(2, 3, 3, 4, 32, device=device))
    bias = torch.randn(3, 3, 1, device=device)  # broadcast over batch and heads
    outs = pa.peer_attention(queries, keys, values, peers=peers, gate=gate, bias=bias)
    served = dispatch.select(peer_problem(queries, keys, values, peers=peers, gate=gate, bias=bias)).name
    print(f"peer_attention: 3 streams {lengths}, outputs {[tuple(o.shape) for o in outs]}, "
          f"served by {served!r}")

    # Joint normalisation with a per-pair bias is SDPA over the concatenated keys with an additive
    # mask, once the gate is folded into the values: check stream 0 that way.
    vals = [values[p] * gate[:, 0, p, :, None, :].to(dtype) for p in range(3)]
    mask = torch.cat([bias[0, p].expand(lengths[p]) for p in range(3)]).to(dtype)[None, :]
    ref = F.scaled_dot_product_attention(queries[0], torch.cat(keys, 2), torch.cat(vals, 2),
                                         attn_mask=mask)
    print(f"  stream 0 vs SDPA over concatenated keys: max |diff| = "
          f"{(outs[0] - ref).abs().max().item():.2e}")

    # 3. Gradients flow to every input, gate and bias included.
    gate.requires_grad_(True)
    bias.requires_grad_(True)
    outs = pa.peer_attention(queries, keys, values, peers=peers, gate=gate, bias=bias)
    sum(o.float().sum() for o in outs).backward()
    print(f"  grad gate {tuple(gate.grad.shape)}, grad bias {tuple(bias.grad.shape)}")


if __name__ == "__main__":
    main()
