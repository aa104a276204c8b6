"""attn_implementation="peer_attention" on the models that need SPEC section 9 variants: Gemma 2
(logit softcap), gpt-oss (sinks, s_aux), sliding windows (Mistral, Qwen2) and padding-free packed
batches, built tiny and random from configs (offline), against "eager" in float64."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from a config: no downloads
transformers = pytest.importorskip("transformers")

from tests.helpers import recorded_dispatch  # noqa: E402
from peer_attention.integrations.transformers import register  # noqa: E402

VOCAB = 97
WINDOW = 4
LENGTH = 11  # longer than the window
# eager's softmax runs in float32 even for a float64 model (Llama family), hence 1e-6 not 1e-10;
# a wrong window, softcap or sink moves the logits by 1e-3 or more
ATOL = 1e-6
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def gemma2_config():
    # a small softcap so that it changes the numbers of a tiny random model
    return transformers.Gemma2Config(**SMALL, sliding_window=WINDOW, attn_logit_softcapping=0.3,
                                     query_pre_attn_scalar=8)


def gpt_oss_config():
    return transformers.GptOssConfig(**SMALL, sliding_window=WINDOW, num_local_experts=4,
                                     num_experts_per_tok=2, experts_implementation="eager")


def mistral_config():
    return transformers.MistralConfig(**SMALL, sliding_window=WINDOW)


def qwen2_config():
    return transformers.Qwen2Config(**SMALL, sliding_window=WINDOW, use_sliding_window=True,
                                    max_window_layers=0)


CONFIGS = {"gemma2": gemma2_config, "gpt_oss": gpt_oss_config, "mistral": mistral_config,
           "qwen2": qwen2_config}


def build_pair(config):
    register()
    torch.manual_seed(0)
    build = transformers.AutoModelForCausalLM.from_config
    eager = build(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float64).eval()
    ours = build(copy.deepcopy(config), attn_implementation="peer_attention",
                 dtype=torch.float64).eval()
    with torch.no_grad():  # random sinks: the initialisation may leave them tiny
        for name, param in eager.named_parameters():
            if name.endswith("sinks"):
                param.copy_(torch.randn_like(param))
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_pair(CONFIGS[name]())
        return cache[name]

    return get


@pytest.fixture
def served():
    with recorded_dispatch("select") as problems:
        yield problems


def ids(batch=2, length=LENGTH, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_eager_with_native_variants(name, pairs, served):
    eager, ours = pairs(name)
    tokens = ids()
    torch.testing.assert_close(ours(tokens).logits, eager(tokens).logits, rtol=0, atol=ATOL)
    assert len(served) == 2
    # no materialised mask: causality and the window are the kernel's band
    assert all(p.attn_mask is None and p.is_causal for p in served)
    windows = [p.window_left for p in served]
    if name in ("mistral", "qwen2"):
        assert windows == [WINDOW - 1, WINDOW - 1]
    else:  # layer 0 sliding, layer 1 full attention
        assert windows == [WINDOW - 1, -1]
    if name == "gemma2":
        assert all(p.softcap == 0.3 for p in served)
    if name == "gpt_oss":
        assert all(p.sinks is not None for p in served)


def test_gpt_oss_sink_gradients_match_eager(pairs):
    eager, ours = pairs("gpt_oss")
    tokens = ids(batch=1)
    grads = []
    for model in (eager, ours):
        model.zero_grad()
        model(tokens).logits.square().mean().backward()
        grads.append([p.grad.clone() for n, p in model.named_parameters() if n.endswith("sinks")
                      or n.endswith("q_proj.weight")])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    for model in (eager, ours):
        model.zero_grad()


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_padding_mask_with_softcap_and_sinks(name, pairs, served):
    eager, ours = pairs(name)
    tokens = ids()
    mask = torch.ones_like(tokens)
    # right padding (eager turns left-padded rows into NaN): an explicit mask, while the softcap
    # and the sinks stay in the kernel
    mask[0, -3:] = 0
    got = ours(tokens, attention_mask=mask).logits
    want = eager(tokens, attention_mask=mask).logits
    torch.testing.assert_close(got[0, :-3], want[0, :-3], rtol=0, atol=ATOL)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=ATOL)
    assert all(p.attn_mask is not None for p in served)


@pytest.mark.parametrize("name", ["mistral", "gpt_oss"])
def test_cached_continuation_uses_bottom_right_band(name, pairs, served):
    eager, ours = pairs(name)
    tokens = ids(length=LENGTH + 3)
    logits = []
    for model in (eager, ours):
        first = model(tokens[:, :LENGTH], use_cache=True)
        logits.append(model(tokens[:, LENGTH:], past_key_values=first.past_key_values).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=ATOL)
    continuation = served[2:]
    assert continuation and all(p.attn_mask is None for p in continuation)
    assert any(p.bottom_right for p in continuation)


def test_packed_batch_goes_through_varlen(pairs, served):
    eager, ours = pairs("mistral")
    lengths = [5, 2, 7]
    tokens = ids(batch=1, length=sum(lengths))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    got = ours(tokens, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
               max_length_q=7, max_length_k=7).logits
    # eager: each document alone
    want = torch.cat([eager(part).logits for part in tokens.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert served and all(p.peers == () and p.q_lens == tuple(lengths) for p in served)
    assert all(p.window_left == WINDOW - 1 and p.is_causal for p in served)


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_greedy_generation_matches_eager(name, pairs, served):
    eager, ours = pairs(name)
    prompt = ids(batch=1, length=6)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    want = eager.generate(prompt, **kwargs)
    got = ours.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits):
        torch.testing.assert_close(step_got, step_want, rtol=0, atol=ATOL)
    # the decoding steps (one query, a cache of keys) ran without a mask
    decode = [p for p in served if p.q_lens == (1,)]
    assert decode and all(p.attn_mask is None for p in decode)


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("masked", [True, False], ids=["explicit_mask", "no_mask"])
def test_bad_softcap_is_rejected_on_every_path(softcap, masked):
    """The attention function validates softcap as the public API does, also on the explicit-mask
    path, which sets it on the normalised problem itself (it would reach a kernel unchecked)."""
    from peer_attention.integrations.transformers import variants_forward

    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril() if masked else None
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="softcap"):
        variants_forward(module, q, k, v, mask, softcap=softcap)
