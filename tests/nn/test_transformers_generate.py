"""generate() with attn_implementation="peer_attention": greedy tokens equal eager's in float32 on
tiny random models of the integration's families (Llama, Gemma 2, gpt-oss, Mistral, Qwen2; built
from configs, offline), with dynamic and static caches, and the decode steps run through the
split-KV decode kernels (counted on triton_kernels/decode.decode_attention, under the Triton
interpreter on the CPU)."""
import copy
import os
from unittest import mock

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from a config: no downloads
transformers = pytest.importorskip("transformers")

import peer_attention as pa  # noqa: E402
from peer_attention.integrations.transformers import register  # noqa: E402
from tests.nn.test_transformers_variants import CONFIGS, SMALL  # noqa: E402

PROMPT, NEW_TOKENS = 5, 5
FAMILIES = {"llama": lambda: transformers.LlamaConfig(**SMALL), **CONFIGS}


def build_pair(name):
    register()
    config = FAMILIES[name]()
    torch.manual_seed(0)
    build = transformers.AutoModelForCausalLM.from_config
    eager = build(copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32).eval()
    ours = build(copy.deepcopy(config), attn_implementation="peer_attention",
                 dtype=torch.float32).eval()
    with torch.no_grad():  # random sinks: the initialisation may leave them tiny
        for param_name, param in eager.named_parameters():
            if param_name.endswith("sinks"):
                param.copy_(torch.randn_like(param))
    ours.load_state_dict(eager.state_dict())
    return eager, ours


@pytest.fixture
def decode_calls():
    """Each call of the split-KV decode kernels: its query rows per sequence."""
    from peer_attention.triton_kernels import decode

    original, seen = decode.decode_attention, []

    def spy(problem, *args, **kwargs):
        seen.append(problem.q.shape[1])
        return original(problem, *args, **kwargs)

    # the keys of a tiny model are few (a sliding layer's dynamic cache keeps a window of 4): let
    # the drop-in route them as it routes >= 128 keys at full size
    with mock.patch.object(decode, "decode_attention", spy), \
            mock.patch.object(decode, "MIN_DECODE_KEYS", 2):
        yield seen


def greedy(model, tokens, mask, cache):
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                   pad_token_id=0)
    if cache == "static":
        options["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(tokens, attention_mask=mask, **options)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_equals_eager_through_decode_kernels(name, cache, decode_calls):
    eager, ours = build_pair(name)
    tokens = torch.randint(1, SMALL["vocab_size"], (2, PROMPT),
                           generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    want = greedy(eager, tokens, mask, cache)
    with pa.use_backend("triton"):
        got = greedy(ours, tokens, mask, cache)
    assert want.shape == (2, PROMPT + NEW_TOKENS)
    assert torch.equal(got, want)
    # every layer of every decode step (the first new token comes from the prefill) ran one query
    # row through the decode kernels
    steps = (NEW_TOKENS - 1) * ours.config.num_hidden_layers
    assert decode_calls.count(1) == steps, decode_calls


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batch_equals_eager_through_decode_kernels(cache, decode_calls):
    """Padding arrives as a mask: its prefix shape becomes cache_leftpad of
    flash_attn_with_kvcache over transformers' cache, read in place."""
    eager, ours = build_pair("llama")
    tokens = torch.randint(1, SMALL["vocab_size"], (2, PROMPT),
                           generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    tokens[1, :2] = 0
    want = greedy(eager, tokens, mask, cache)
    with pa.use_backend("triton"):
        got = greedy(ours, tokens, mask, cache)
    assert torch.equal(got, want)
    assert decode_calls.count(1) == (NEW_TOKENS - 1) * ours.config.num_hidden_layers


def test_masks_that_are_no_cache_prefix_keep_the_masked_path():
    """A hole in the keys, or autograd, is not a KV-cache decode: cache_decode declines."""
    from peer_attention.integrations.transformers_decode import cache_decode

    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    prefix = torch.zeros(1, 1, 1, 10, dtype=torch.bool)
    prefix[..., 2:7] = True
    with torch.no_grad():
        out = cache_decode(q, k, v, prefix, None, True)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, prefix, enable_gqa=True)
        torch.testing.assert_close(out, want.transpose(1, 2))
        holed = prefix.clone()
        holed[..., 4] = False
        assert cache_decode(q, k, v, holed, None, True) is None
        assert cache_decode(q, k, v, prefix.float(), None, True) is None
    assert cache_decode(q.requires_grad_(), k, v, prefix, None, True) is None


def test_an_empty_mask_row_keeps_the_masked_path():
    from peer_attention.integrations.transformers_decode import cache_decode

    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 10, 8)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        assert cache_decode(q, k, k, mask, None, True) is None


# ---------------------------------------------------------------------------------------------
# continuous batching (generate_batch, a paged cache): transformers 5.23 runs it with "sdpa",
# "paged|eager" or a flash-named implementation only; "sdpa" under patch_torch() is served here
# ---------------------------------------------------------------------------------------------

def _generate_batch(model, **options):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = [[5, 7, 9, 11, 3], [4, 8, 15, 16, 23, 42, 2]]
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    paged = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64,
                                     max_blocks_per_request=4, **options)
    out = model.generate_batch(prompts, generation_config=config,
                               continuous_batching_config=paged, warmup=False)
    return {name: result.generated_tokens for name, result in out.items()}


def test_continuous_batching_through_patch_torch_equals_torch():
    from peer_attention.patching import patch_torch
    from tests.helpers import recorded_dispatch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL), attn_implementation="sdpa", dtype=torch.float32).eval()
    want = _generate_batch(model)
    with patch_torch(), recorded_dispatch("output_and_backend") as served:
        got = _generate_batch(model)
    assert got == want and all(len(tokens) == NEW_TOKENS for tokens in want.values())
    # every forward (one per new token) of both layers attended through this package
    assert len(served) == NEW_TOKENS * model.config.num_hidden_layers


def test_continuous_batching_refuses_a_registered_implementation():
    """transformers' own check (switch_to_cb_friendly_attn); if it starts to accept registered
    implementations, this test says it is time to serve the paged cache natively."""
    _, ours = build_pair("llama")
    with pytest.raises(ValueError, match="not supported for continuous batching"):
        _generate_batch(ours, auto_switch_to_flash=False)


def test_a_paged_cache_reaching_the_function_is_refused_with_the_way_that_works():
    from peer_attention.integrations.transformers import peer_attention_forward

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="cache.*patch_torch"):
        peer_attention_forward(torch.nn.Module(), q, q, q, None, cache=object())
