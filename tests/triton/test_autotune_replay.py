"""Autotuning must not change results (SPEC section 13). On a GPU, triton.autotune runs every
candidate config on the same buffers (several times each), then the winner once more: any output
a kernel does not rewrite in full (per-tile partials, accumulators) would carry what an earlier
config left into the result. The interpreter never autotunes, so this replays it: every kernel is
wrapped by the production decorator (configs.tuned with the GPU's config list and hooks), its
benchmarker replaced by one that runs each config twice, and the buffers after the winner's run
must equal a clean run of the winner, bit for bit, for a winner with the smallest tiles and one
with the largest."""
import pytest
import torch

from peer_attention.problem import AttentionProblem
from peer_attention.triton_kernels import bwd, configs, fwd

pytestmark = pytest.mark.skipif(not configs.INTERPRET, reason="replays autotuning on the interpreter")

# the forward and the preprocess share the forward's list (both row-major); dq and dkdv their own
KINDS = {"fwd": "fwd", "preprocess": "fwd", "dq": "dq", "dkdv": "dkdv"}
# the buffers each kernel writes (everything else it reads)
OUTPUTS = {"fwd": ("out", "lse"), "preprocess": ("delta", "dgate_part"),
           "dq": ("dq", "dbias_part", "dmask"), "dkdv": ("dk", "dv")}


def _problem(normalize, broadcast_mask=False):
    """Three streams with unequal lengths (partial tiles at every block size), gates, biases and
    a float mask needing a gradient: every kernel and every per-tile output. broadcast_mask: one
    stream, the mask shared by the heads (its gradient added atomically into a compact buffer)."""
    torch.manual_seed(0)
    q_lens, kv_lens, n, heads, e, ev = (40, 24, 9), (33, 24, 17), 3, 2, 16, 16
    q = torch.randn(1, heads, sum(q_lens), e)
    k = torch.randn(1, heads, sum(kv_lens), e)
    v = torch.randn(1, heads, sum(kv_lens), ev)
    gate = torch.rand(1, n, n, heads, ev) + 0.5
    bias = torch.randn(1, n, n, heads)
    mask = torch.randn(1, heads, sum(q_lens), sum(kv_lens))
    peers = (1, 1, 0, 0, 1, 1, 1, 0, 1)
    if broadcast_mask:
        q_lens, kv_lens, peers, gate, bias = (sum(q_lens),), (sum(kv_lens),), (1,), None, None
        mask = mask[:, :1].expand(mask.shape)
    return AttentionProblem(q, k, v, q_lens, kv_lens, peers, gate, bias, None, mask, None, 0.0,
                            False, e ** -0.5, normalize)


def _gpu_configs(kind, monkeypatch):
    """Every config the autotuner may try for `kind` on any architecture, one per tile shape
    and dK/dV sweep count (warps and stages change nothing under the interpreter), in the order
    it tries them."""
    monkeypatch.setattr(configs, "INTERPRET", False)
    seen, kept = set(), []
    for c in configs.autotune_configs(kind):
        blocks = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs.get("PHASES", 1))
        if blocks not in seen:
            seen.add(blocks)
            kept.append(c)
    return kept


def _tuner(kernel, kind, winner, monkeypatch):
    """The production autotuner of `kernel` (configs.tuned: its configs, key and hooks), every
    tile shape kept by the pruner, and a benchmarker that runs each config twice (through the
    autotuner's own kernel_call, with its pre/post hooks) and times `winner` fastest."""
    candidates = _gpu_configs(kind, monkeypatch)
    tuner = configs.tuned(kernel, kind)  # (INTERPRET patched off: the GPU's autotuner)
    monkeypatch.setattr(configs, "INTERPRET", True)
    tuner.early_config_prune = lambda cfgs, named_args, **kw: [
        c for c in cfgs if c in candidates]
    timing = {}
    bench_config = tuner._bench

    def bench(*args, config, **meta):
        timing["now"] = 0.5 if config == winner else 1.0
        return bench_config(*args, config=config, **meta)

    def do_bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        return [timing["now"]] * len(quantiles)
    tuner._bench = bench
    tuner._do_bench = do_bench
    return tuner


def _launches(problem, bufs, out, lse, grad_out):
    """[(name, kernel, args, kwargs, grid)] of the forward and the backward on `bufs`."""
    kernel, args, kwargs, grid = fwd.forward_launch(problem, out, lse)
    launches = [("fwd", kernel, args, kwargs, grid)]
    needs = (True,) * 6 + (False,)
    launches += bwd.backward_launches(problem, grad_out, out, lse, needs, bufs)
    return launches


def _buffers(problem):
    q = problem.q
    shape = ((1, q.shape[1], problem.num_streams, q.shape[2]) if problem.normalize == "peer"
             else q.shape[:3])
    out = torch.zeros(q.shape[:3] + (problem.value_dim,))
    lse = torch.full(shape, float("-inf"))
    bufs = bwd.gradient_buffers(problem, (True,) * 6 + (False,))
    return out, lse, bufs


def _run(problem, grad_out, meta_for):
    """Run every kernel once, name -> launch meta from `meta_for(name)` (or a tuner)."""
    out, lse, bufs = _buffers(problem)
    bufs.update(out=out, lse=lse)
    for name, kernel, args, kwargs, grid in _launches(problem, bufs, out, lse, grad_out):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("BLOCK_M", "BLOCK_N")}
        runner = meta_for(name, kernel)
        if isinstance(runner, dict):
            kernel[grid](*args, **kwargs, **runner)
        else:
            runner[grid](*args, **kwargs)
    return bufs


@pytest.mark.parametrize("normalize", ["joint", "peer", "broadcast-mask"])
@pytest.mark.parametrize("pick", [min, max])
def test_autotuning_replay_leaves_no_stale_state(normalize, pick, monkeypatch):
    problem = (_problem("joint", broadcast_mask=True) if normalize == "broadcast-mask"
               else _problem(normalize))
    grad_out = torch.randn(problem.q.shape[:3] + (problem.value_dim,))
    winners, tuners = {}, {}
    for name, kind in KINDS.items():
        candidates = _gpu_configs(kind, monkeypatch)
        winners[name] = pick(candidates, key=lambda c: c.kwargs["BLOCK_M"] * 10000
                             + c.kwargs["BLOCK_N"] * 10 + c.kwargs.get("PHASES", 1))

    def tuned(name, kernel):
        tuners[name] = _tuner(kernel, KINDS[name], winners[name], monkeypatch)
        return tuners[name]

    replayed = _run(problem, grad_out, tuned)
    for name, tuner in tuners.items():
        assert tuner.best_config == winners[name], name
        assert len(tuner.configs_timings) == len(_gpu_configs(KINDS[name], monkeypatch))
    clean = _run(problem, grad_out, lambda name, kernel: dict(winners[name].kwargs))
    for name, outputs in OUTPUTS.items():
        for buf in outputs:
            assert torch.equal(replayed[buf], clean[buf]), (
                f"{name} {buf}: autotuning left stale values (winner "
                f"{winners[name].kwargs}), max diff "
                f"{(replayed[buf] - clean[buf]).abs().max().item():.3g}")
