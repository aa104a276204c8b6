"""SPEC section 9 variants in the Triton kernels (window, bottom-right alignment, softcap, ALiBi,
sinks, the diagonal/varlen peer table), alone and combined: forward and backward (q, k, v, gate,
bias, sinks) of the registered triton op against the reference op, under SPEC section 8."""
import pytest
import torch

import peer_attention  # noqa: F401  (registers the ops)
from peer_attention.backends.triton import TritonBackend
from peer_attention.problem import AttentionProblem
from peer_attention.reference import peer_attention_reference
from peer_attention.triton_kernels.utils import num_tiles
from tests.helpers import assert_matches_reference



def variant_case(*, q_lens, kv_lens, batch=1, q_heads=2, kv_heads=2, head_dim=20, value_dim=12,
                 peers=None, gate_shape=None, bias_shape=None, kv_lengths=None, normalize="joint",
                 is_causal=False, window=(-1, -1), bottom_right=False, softcap=0.0, alibi=False,
                 sinks=False, seed=0):
    """(kernel_fn, reference_fn, inputs, names): the AttentionProblem through the triton_fwd op,
    and the reference formulas in the inputs' dtype (SPEC section 8's "PyTorch's own
    computation"). `peers=None` is the diagonal (varlen) table."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    q = randn(batch, q_heads, sum(q_lens), head_dim)
    k = randn(batch, kv_heads, sum(kv_lens), head_dim)
    v = randn(batch, kv_heads, sum(kv_lens), value_dim)
    inputs, names = [q, k, v], ["q", "k", "v"]
    if gate_shape is not None:
        inputs.append((0.5 + torch.rand(*gate_shape, generator=gen, dtype=torch.float64))
                      .requires_grad_())
        names.append("gate")
    if bias_shape is not None:
        inputs.append(randn(*bias_shape))
        names.append("bias")
    if sinks:
        inputs.append(randn(q_heads))
        names.append("sinks")
    n = len(q_lens)
    table = () if peers is None else tuple(int(x) for row in peers for x in row)
    slopes = (torch.rand(batch, q_heads, generator=gen) * 0.5 + 0.1) if alibi else None

    def make(op_name):
        def run(q, k, v, *rest):
            rest = list(rest)
            gate = rest.pop(0) if gate_shape is not None else None
            bias = rest.pop(0) if bias_shape is not None else None
            sink = rest.pop(0) if sinks else None
            full_gate = gate.expand(batch, n, n, q_heads, value_dim) if gate is not None else None
            full_bias = bias.expand(batch, n, n, q_heads) if bias is not None else None
            problem = AttentionProblem(
                q, k, v, tuple(q_lens), tuple(kv_lens), table, full_gate, full_bias, kv_lengths,
                None, None, 0.0, is_causal, head_dim ** -0.5, normalize, window[0], window[1],
                bottom_right, softcap, slopes, sink)
            if op_name == "triton_fwd":
                return torch.ops.peer_attention.triton_fwd(*problem)[0]
            outs = peer_attention_reference(
                q.split(list(q_lens), 2), k.split(list(kv_lens), 2), v.split(list(kv_lens), 2),
                peers=problem.peers_nested(), gate=full_gate, bias=full_bias,
                normalize=normalize, is_causal=is_causal, kv_lengths=kv_lengths,
                scale=head_dim ** -0.5, window=window, bottom_right=bottom_right,
                softcap=softcap, alibi_slopes=slopes, sinks=sink)
            return torch.cat(outs, dim=2)
        return run

    return make("triton_fwd"), make("reference"), inputs, names


SINGLE = dict(q_lens=[21], kv_lens=[19], peers=[[1]])
CASES = {
    "window": dict(SINGLE, window=(3, 2)),
    "window-left-only": dict(SINGLE, window=(5, -1)),
    "window-bottom-right-L<M": dict(q_lens=[9], kv_lens=[37], peers=[[1]], window=(4, 1),
                                    bottom_right=True),
    "causal-bottom-right-L>M": dict(q_lens=[37], kv_lens=[9], peers=[[1]], is_causal=True,
                                    bottom_right=True),
    "causal-window-left": dict(SINGLE, is_causal=True, window=(4, 3)),
    "softcap-causal": dict(SINGLE, softcap=2.0, is_causal=True),
    "alibi-bottom-right-causal": dict(q_lens=[11], kv_lens=[26], peers=[[1]], batch=2,
                                      alibi=True, is_causal=True, bottom_right=True),
    "sinks-causal-gqa": dict(SINGLE, sinks=True, is_causal=True, kv_heads=1),
    "sinks-empty-rows": dict(q_lens=[6], kv_lens=[9], peers=[[1]], batch=2, sinks=True,
                             kv_lengths=torch.tensor([[0], [4]])),
    "varlen": dict(q_lens=[5, 1, 17, 0, 8], kv_lens=[7, 3, 17, 2, 0], kv_heads=1,
                   is_causal=True, bottom_right=True, window=(6, -1)),
    "peer-mode-softcap-window-alibi": dict(q_lens=[9, 14], kv_lens=[13, 6], normalize="peer",
                                           peers=[[1, 1], [1, 1]], softcap=3.0, window=(2, 1),
                                           alibi=True, gate_shape=(1, 2, 2, 2, 12)),
    # no gate: the peers share one accumulator, each bias a shift of the running max (with a sink)
    "joint-bias-sinks-one-accumulator": dict(q_lens=[7, 12], kv_lens=[10, 5],
                                             peers=[[1, 1], [1, 0]], bias_shape=(1, 2, 2, 2),
                                             sinks=True, softcap=5.0),
    # every variant with every multi-stream feature at once
    "joint-everything": dict(q_lens=[5, 17, 9], kv_lens=[7, 19, 3], batch=2, kv_heads=1,
                             peers=[[1, 0, 1], [1, 1, 1], [0, 1, 1]], gate_shape=(1, 3, 3, 2, 12),
                             bias_shape=(2, 3, 3, 1), kv_lengths=torch.tensor([[7, 2, 3], [0, 19, 1]]),
                             is_causal=True, window=(5, -1), bottom_right=True, softcap=4.0,
                             alibi=True, sinks=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_variant_float32(name):
    kernel_fn, reference_fn, inputs, names = variant_case(**CASES[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)


@pytest.mark.parametrize("name, dtype", [("joint-everything", torch.bfloat16),
                                         ("varlen", torch.float16)], ids=str)
def test_variants_half_precision(name, dtype):
    """Each 16-bit dtype once (the kernels' casts are shared by every variant)."""
    kernel_fn, reference_fn, inputs, names = variant_case(**CASES[name])
    assert_matches_reference(kernel_fn, reference_fn, inputs, dtype, names=names)


def test_many_short_sequences():
    """Varlen with many short sequences (and empty ones): the flat tile schedule finds each
    tile's sequence by binary search; every sequence attends only within itself."""
    gen = torch.Generator().manual_seed(3)
    q_lens = torch.randint(0, 6, (37,), generator=gen).tolist()
    kv_lens = torch.randint(1, 6, (37,), generator=gen).tolist()
    kernel_fn, reference_fn, inputs, names = variant_case(
        q_lens=q_lens, kv_lens=kv_lens, is_causal=True, bottom_right=True, q_heads=1, kv_heads=1,
        head_dim=16, value_dim=16)
    assert_matches_reference(kernel_fn, reference_fn, inputs, torch.float32, names=names)


def test_tile_schedule_counts_only_existing_tiles():
    # 1000 one-token sequences: 1000 programs per head, not 1000 x (longest / BLOCK_M)
    assert num_tiles([1] * 999 + [300], 64) == 999 + 5
    assert num_tiles([0, 0, 17], 16) == 2


def test_backend_serves_every_variant():
    q = torch.zeros(1, 2, 8, 16)
    problem = AttentionProblem(q, q, q, (3, 5), (3, 5), (), None, None, None, None, None, 0.0,
                               True, 0.25, "joint", 2, 0, True, 5.0,
                               torch.ones(1, 2), torch.zeros(2))
    assert TritonBackend().not_supported_reasons(problem) == []
