"""attn_implementation="peer_attention" in a tiny random Llama: logits match "sdpa" (offline)."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from a config: no downloads
transformers = pytest.importorskip("transformers")

from tests.helpers import recorded_dispatch  # noqa: E402
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
def served():
    with recorded_dispatch("output_and_backend") as calls:
        yield calls


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


# ---------------------------------------------------------------------------------------------
# T5: the relative position bias arrives as `position_bias` and is served as a float mask
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5_models():
    register()
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    build = transformers.T5ForConditionalGeneration._from_config
    built = {name: build(copy.deepcopy(config), attn_implementation=name, dtype=torch.float64).eval()
             for name in ("eager", "sdpa", "peer_attention")}
    for model in built.values():
        model.load_state_dict(built["eager"].state_dict())
    return built


def t5_logits(model, tokens, decoder_tokens, mask=None):
    return model(input_ids=tokens, attention_mask=mask, decoder_input_ids=decoder_tokens).logits


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padding"])
def test_t5_logits_match_eager_and_sdpa(t5_models, served, padded):
    tokens, decoder_tokens = ids(length=9), ids(length=6, seed=1)
    mask = None
    if padded:
        mask = torch.ones_like(tokens)
        mask[0, 6:] = 0
    want = t5_logits(t5_models["eager"], tokens, decoder_tokens, mask)
    sdpa = t5_logits(t5_models["sdpa"], tokens, decoder_tokens, mask)
    served.clear()
    got = t5_logits(t5_models["peer_attention"], tokens, decoder_tokens, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got, sdpa, rtol=0, atol=1e-10)
    # encoder self, decoder self and cross attention of 2 layers, each with the bias as float mask
    assert len(served) == 6
    assert all(p.attn_mask is not None and p.attn_mask.dtype == torch.float64 for p in served)


def test_t5_position_bias_gradient_matches_eager(t5_models):
    tokens, decoder_tokens = ids(length=7), ids(length=5, seed=2)
    grads = {}
    for name in ("eager", "peer_attention"):
        model = t5_models[name]
        model.zero_grad()
        t5_logits(model, tokens, decoder_tokens).square().mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if "relative_attention_bias" in n}
    assert grads["eager"] and all(g.abs().max() > 0 for g in grads["eager"].values())
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["peer_attention"][n], g, rtol=0, atol=1e-10)
