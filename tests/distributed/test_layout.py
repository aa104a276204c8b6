"""Shards, the causal block pattern, per-shard kv_lengths, the log-sum-exp merge, and the errors
raised before any process group is needed."""
import itertools

import pytest
import torch

from peer_attention import distributed as cp
from peer_attention.distributed import layout as lay
from peer_attention.distributed.merge import merge_into


@pytest.mark.parametrize("layout, world", list(itertools.product(lay.LAYOUTS, (1, 2, 4))))
def test_shards_cover_the_sequence_once_in_increasing_order(layout, world):
    x = torch.arange(8 * world).view(1, 1, -1, 1)
    shards = [cp.shard(x, r, world, layout) for r in range(world)]
    for shard in shards:
        assert (shard.flatten().diff() > 0).all()  # kv_lengths stay a prefix of a shard
    assert torch.equal(cp.unshard(shards, layout), x)
    order = lay.gather_order(8, world, layout, "cpu")
    assert torch.equal(torch.cat(shards, dim=2)[:, :, order], x)


def test_zigzag_holds_chunks_r_and_2w_minus_1_minus_r():
    x = torch.arange(16).view(1, 1, 16, 1)
    assert cp.shard(x, 1, 4, "zigzag").flatten().tolist() == [2, 3, 12, 13]


def test_shard_rejects_lengths_that_do_not_divide():
    with pytest.raises(ValueError, match=r"query: .*divisible by the number of chunks \(3 ranks"):
        cp.shard(torch.zeros(1, 1, 10, 2), 0, 3, name="query")
    with pytest.raises(ValueError, match="layout"):
        cp.shard(torch.zeros(1, 1, 8, 2), 0, 2, layout="striped")


def _global_positions(n_local, rank, world, layout, part):
    return torch.cat([torch.arange(g, g + n) for g, _l, n in
                      lay.part_segments(n_local, rank, world, layout, part)])


@pytest.mark.parametrize("layout, world", list(itertools.product(lay.LAYOUTS, (2, 4))))
def test_self_pattern_is_the_global_causal_mask(layout, world):
    """Each (rank, src) block computed as the pattern says covers exactly the pairs j <= i."""
    n = 4
    for rank, src in itertools.product(range(world), repeat=2):
        q_pos = _global_positions(n, rank, world, layout, lay.ALL)
        k_pos = _global_positions(n, src, world, layout, lay.ALL)
        want = k_pos[None, :] <= q_pos[:, None]
        q_part, k_part, causal = lay.self_pattern(rank, src, layout, is_causal=True)
        got = torch.zeros_like(want)
        if q_part != lay.NONE:
            qb, qe = lay.part_range(n, layout, q_part)
            kb, ke = lay.part_range(n, layout, k_part)
            block = torch.ones(qe - qb, ke - kb, dtype=torch.bool)
            got[qb:qe, kb:ke] = block.tril() if causal else block
        assert torch.equal(got, want), (rank, src)
    if layout == "contiguous":
        assert lay.self_pattern(0, 1, layout, True)[0] == lay.NONE  # a skipped step


@pytest.mark.parametrize("layout", lay.LAYOUTS)
def test_shard_kv_lengths_count_valid_keys_of_a_part(layout):
    world, n = 2, 4
    kv_lengths = torch.tensor([[0, 3, 5, 8]]).T.repeat(1, 2)  # (B=4, S=2)
    for src, part in itertools.product(range(world), (lay.ALL, lay.FIRST, lay.SECOND)):
        if layout == "contiguous" and part != lay.ALL:
            continue
        got = lay.shard_kv_lengths(kv_lengths, (n, n), src, world, layout, part)
        positions = _global_positions(n, src, world, layout, part)
        want = (positions[None, None, :] < kv_lengths[:, :, None]).sum(-1)
        assert torch.equal(got, want)


def test_merge_of_two_key_sets_is_the_softmax_over_their_union():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    scores[2] = float("-inf")  # a row with nothing to attend to
    values = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    acc_out = torch.zeros(3, 2, dtype=torch.float64)
    acc_lse = torch.full((3,), float("-inf"), dtype=torch.float64)
    for cols in (slice(0, 2), slice(2, 6)):
        part = scores[:, cols]
        lse = torch.logsumexp(part, -1)
        weights = torch.nan_to_num(torch.exp(part - lse[:, None]))
        merge_into(acc_out, acc_lse, weights @ values[cols], lse)
    want = torch.nan_to_num(torch.softmax(scores, -1)) @ values
    torch.testing.assert_close(acc_out, want, rtol=0, atol=1e-12)
    assert acc_lse[2] == float("-inf") and not acc_out.isnan().any()


def test_bad_method_layout_and_missing_group_are_named():
    t = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="method: expected one of"):
        cp.context_parallel_sdpa(t, t, t, method="tree")
    with pytest.raises(ValueError, match="layout: expected one of"):
        cp.context_parallel_sdpa(t, t, t, layout="striped")
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="group: the default process group is not"):
            cp.context_parallel_peer_attention([t], [t], [t])
