"""attn_implementation="peer_attention" in a tiny random Llama: logits match "sdpa" (offline)."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from a config: no downloads
transformers = pytest.importorskip("transformers")

import peer_attention.dispatch as dispatch  # noqa: E402
from peer_attention.integrations.transformers import register  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def models():
    register()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    # each model gets its own config: the attention implementation is stored on it
    build = transformers.AutoModelForCausalLM.from_config
    sdpa = build(copy.deepcopy(config), attn_implementation="sdpa", dtype=torch.float64).eval()
    ours = build(copy.deepcopy(config), attn_implementation="peer_attention", dtype=torch.float64).eval()
    ours.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    assert ours.config._attn_implementation == "peer_attention"
    return sdpa, ours


@pytest.fixture
def served(monkeypatch):
    calls = []
    run = dispatch.run

    def spy(problem, explicit=None):
        calls.append(problem)
        return run(problem, explicit)

    monkeypatch.setattr(dispatch, "run", spy)
    return calls


def ids(batch=2, length=11, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_sdpa(models, served):
    sdpa, ours = models
    tokens = ids()
    torch.testing.assert_close(ours(tokens).logits, sdpa(tokens).logits, rtol=0, atol=1e-10)
    assert len(served) == 2 and all(p.is_causal and p.num_q_heads == 2 * p.num_kv_heads for p in served)


def test_logits_match_sdpa_with_padding(models, served):
    sdpa, ours = models
    tokens = ids(seed=1)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding of the second sequence
    got = ours(tokens, attention_mask=mask).logits
    want = sdpa(tokens, attention_mask=mask).logits
    assert served and all(p.attn_mask is not None for p in served)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], rtol=0, atol=1e-10)


def test_decoding_with_a_cache_matches_sdpa(models):
    sdpa, ours = models
    tokens = ids(seed=2)
    results = []
    for model in (sdpa, ours):
        prefix = model(tokens[:, :-1], use_cache=True)
        step = model(tokens[:, -1:], past_key_values=prefix.past_key_values)
        results.append(step.logits)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-10)


def test_gradients_match_sdpa(models):
    sdpa, ours = models
    tokens = ids(seed=3)
    grads = []
    for model in (sdpa, ours):
        loss = model(tokens, labels=tokens).loss
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters()]))
    for g_ours, g_sdpa in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_ours, g_sdpa, rtol=0, atol=1e-10)
