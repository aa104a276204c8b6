"""Example: SD3 and Flux transformers on peer_attention through diffusers' processors.

Builds a small randomly initialised SD3Transformer2DModel and FluxTransformer2DModel (from
configs; nothing is downloaded), replaces their attention processors with
`peer_attention.integrations.diffusers.apply`, checks that the output equals the one of diffusers'
default processors, and prints the forward time and peak memory of both.

    python examples/diffusers_mmdit.py                    # CPU float32 / GPU bfloat16
    python examples/diffusers_mmdit.py --model flux --size medium --repeats 10

Peak memory of one forward over what was allocated before it: on a GPU from
torch.cuda.max_memory_allocated(); on the CPU (torch keeps no CPU allocator statistics) the most
bytes of tensor storages created during the forward that were alive at once, counted by a
TorchDispatchMode.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peer_attention.integrations.diffusers import apply

SIZES = {  # layers, heads, head dim, latent side (patch 2 for SD3 -> (side/2)^2 tokens), text tokens
    "tiny": dict(layers=2, heads=2, head_dim=16, side=8, text=8),
    "small": dict(layers=2, heads=4, head_dim=32, side=32, text=77),
    "medium": dict(layers=4, heads=24, head_dim=64, side=64, text=333),
}


def build(model: str, size: str, device: str, dtype: torch.dtype):
    """(transformer, forward kwargs) for a seeded random model of the chosen size."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg = SIZES[size]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if model == "sd3":
        net = SD3Transformer2DModel(
            sample_size=cfg["side"], patch_size=2, in_channels=16, out_channels=16, num_layers=cfg["layers"],
            attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=256,
            caption_projection_dim=cfg["heads"] * cfg["head_dim"], pooled_projection_dim=64,
            pos_embed_max_size=cfg["side"], qk_norm="rms_norm")
        kwargs = dict(hidden_states=rand(1, 16, cfg["side"], cfg["side"]),
                      encoder_hidden_states=rand(1, cfg["text"], 256), pooled_projections=rand(1, 64),
                      timestep=torch.tensor([500.0], device=device))
    else:
        tokens = (cfg["side"] // 2) ** 2
        net = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=cfg["layers"] // 2, num_single_layers=cfg["layers"],
            attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=256,
            pooled_projection_dim=64, axes_dims_rope=(cfg["head_dim"] // 4, 3 * cfg["head_dim"] // 8,
                                                      3 * cfg["head_dim"] // 8))
        row = torch.arange(tokens) // (cfg["side"] // 2)
        col = torch.arange(tokens) % (cfg["side"] // 2)
        kwargs = dict(hidden_states=rand(1, tokens, 64), encoder_hidden_states=rand(1, cfg["text"], 256),
                      pooled_projections=rand(1, 64), timestep=torch.tensor([0.5], device=device),
                      img_ids=torch.stack([torch.zeros(tokens), row, col], 1).to(device),
                      txt_ids=torch.zeros(cfg["text"], 3, device=device))
    return net.to(device=device, dtype=dtype).eval(), kwargs


def forward(net, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return net(**kwargs, return_dict=False)[0]


def median_ms(net, kwargs, device: str, repeats: int) -> float:
    forward(net, kwargs)  # warm-up (and, on a GPU, kernel compilation)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        forward(net, kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class LiveStorageBytes(TorchDispatchMode):
    """The peak of the bytes of tensor storages created inside the block and alive at once
    (outputs that share an input's storage, views and in-place results, are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive = set()

    def _freed(self, key, nbytes):
        self._alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and key not in inputs and key not in self._alive:
                self._alive.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, nbytes)  # storages keep their Python object
        return out


def peak_mb(net, kwargs, device: str) -> float:
    if device == "cuda":
        forward(net, kwargs)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward(net, kwargs)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with LiveStorageBytes() as counter:
        forward(net, kwargs)
    return counter.peak / 2**20


def run(model: str, size: str, device: str, dtype: torch.dtype, repeats: int, memory: bool = True) -> dict:
    default, kwargs = build(model, size, device, dtype)
    ours = copy.deepcopy(default)
    replaced = apply(ours)
    expected, got = forward(default, kwargs), forward(ours, kwargs)
    scale = expected.float().abs().max().item()
    result = dict(model=model, replaced=replaced, tokens=kwargs["hidden_states"].shape,
                  max_abs_diff=(got.float() - expected.float()).abs().max().item(), output_scale=scale,
                  default_ms=median_ms(default, kwargs, device, repeats),
                  ours_ms=median_ms(ours, kwargs, device, repeats))
    if memory:
        result.update(default_peak_mb=peak_mb(default, kwargs, device), ours_peak_mb=peak_mb(ours, kwargs, device))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd3", "flux", "both"), default="both")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: small on CPU, medium on GPU")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = args.size or ("medium" if device == "cuda" else "small")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}, {str(dtype).replace('torch.', '')}, size {size} {SIZES[size]}")
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for model in (("sd3", "flux") if args.model == "both" else (args.model,)):
        r = run(model, size, device, dtype, args.repeats)
        ok = r["max_abs_diff"] <= tolerance * max(1.0, r["output_scale"])
        print(f"{model}: {r['replaced']} processors replaced; output max |ours - diffusers| = "
              f"{r['max_abs_diff']:.2e} (output scale {r['output_scale']:.2f}) -> {'OK' if ok else 'MISMATCH'}")
        print(f"  forward, diffusers' processors: {r['default_ms']:8.2f} ms, peak {r['default_peak_mb']:8.1f} MB")
        print(f"  forward, peer_attention       : {r['ours_ms']:8.2f} ms, peak {r['ours_peak_mb']:8.1f} MB")
        if not ok:
            raise SystemExit(f"{model}: outputs differ beyond {tolerance} (relative)")


if __name__ == "__main__":
    main()
