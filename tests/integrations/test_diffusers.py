"""peer_attention.integrations.diffusers against diffusers' own processors: tiny SD3, Flux and
Wan I2V models give the same outputs and the same gradient for every parameter and input, and the
replaced processors never call torch's SDPA (or diffusers' attention dispatch)."""
import copy
import dataclasses
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

import peer_attention as pa  # noqa: E402
from peer_attention import dispatch  # noqa: E402
from peer_attention.integrations import diffusers as pa_diffusers  # noqa: E402

from .models import flux, sd3, wan_i2v  # noqa: E402


def _float64_backends():
    """Backends that run here and serve float64 on the CPU (the reference, and any added later)."""
    names = []
    for name, why in pa.available_backends().items():
        caps = dispatch.BACKENDS[name].capabilities
        if why is None and torch.float64 in caps.dtypes and "cpu" in caps.devices:
            names.append(name)
    return names


class _Forbidden:
    """Stands in for an attention entry point the replaced processors must not reach."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.name} was called by a replaced processor")


@pytest.fixture
def forbid_torch_attention(monkeypatch):
    """While active, torch's SDPA and diffusers' attention dispatch raise if called."""
    from diffusers.models.transformers import transformer_flux, transformer_wan

    def arm(backend):
        for module in (transformer_flux, transformer_wan):
            monkeypatch.setattr(module, "dispatch_attention_fn", _Forbidden("dispatch_attention_fn"))
        if backend != "torch":  # the torch backend is, by design, a composition of torch's kernels
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                                _Forbidden("torch.nn.functional.scaled_dot_product_attention"))
    return arm


def _run(model, inputs):
    """Output and the gradient of a fixed random projection of it, for every parameter and input."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False)[0]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out * weights).sum().backward()
    grads = {f"param {n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {k}": v.grad for k, v in inputs.items()
                  if isinstance(v, torch.Tensor) and v.grad is not None})
    return out.detach(), grads


def _compare(tiny, backend, dtype, rtol, atol, arm=None, monkeypatch=None, fused=False):
    """`ours` (apply()'d) against diffusers' processors; with `monkeypatch`, also counts the
    multi-stream peer_attention calls of one forward."""
    model = tiny.build().to(dtype)
    if fused:
        model.fuse_qkv_projections()
    ours = copy.deepcopy(model)
    assert pa_diffusers.apply(ours, backend=backend) == tiny.replaced
    expected, expected_grads = _run(model, tiny.inputs(dtype, True))
    if arm is not None:
        arm(backend)
    calls = []
    if monkeypatch is not None:
        real = pa_diffusers.peer_attention

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)
        monkeypatch.setattr(pa_diffusers, "peer_attention", spy)
    out, grads = _run(ours, tiny.inputs(dtype, True))
    if monkeypatch is not None:
        assert len(calls) == tiny.peer_calls
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    assert out.abs().max() > 0.1
    assert grads.keys() == expected_grads.keys()
    assert len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return calls


# Wan's blocks round through float32 between float64 layers (`.float()`): a looser atol for it
FLOAT64_CASES = [(sd3, 1e-10, 1e-12), (flux, 1e-10, 1e-12), (wan_i2v, 1e-9, 1e-10)]


@pytest.mark.parametrize("backend", _float64_backends())
@pytest.mark.parametrize("make, rtol, atol", FLOAT64_CASES, ids=[c[0].__name__ for c in FLOAT64_CASES])
def test_float64_matches_diffusers_processors(make, rtol, atol, backend, forbid_torch_attention, monkeypatch):
    _compare(make(), backend, torch.float64, rtol, atol, arm=forbid_torch_attention, monkeypatch=monkeypatch)


@pytest.mark.parametrize("make", [lambda: sd3(layers=1, tokens=4, text=3, batch=1),
                                  lambda: flux(tokens=4, text=3, batch=1),
                                  lambda: wan_i2v(frames=1, image_tokens=3)], ids=["sd3", "flux", "wan_i2v"])
def test_triton_interpreter_float32(make, forbid_torch_attention, monkeypatch):
    if pa.available_backends()["triton"] is not None:
        pytest.skip(f"triton: {pa.available_backends()['triton']}")
    _compare(make(), "triton", torch.float32, 2e-4, 2e-5, arm=forbid_torch_attention, monkeypatch=monkeypatch)


@pytest.mark.parametrize("make", [flux, wan_i2v], ids=["flux", "wan_i2v"])
def test_fused_projections(make, monkeypatch):
    """fuse_qkv_projections() keeps Flux's and Wan's processors; ours read the fused weights."""
    _compare(make(), "reference", torch.float64, 1e-10, 1e-11, monkeypatch=monkeypatch, fused=True)


def test_bfloat16_keeps_dtypes():
    """A bfloat16 model stays bfloat16 through our processors, within bfloat16 rounding of diffusers'."""
    tiny = sd3(layers=2, tokens=4, text=3, batch=1)
    model = tiny.build().to(torch.bfloat16)
    ours = copy.deepcopy(model)
    pa_diffusers.apply(ours, backend="reference")
    with torch.no_grad():
        expected = model(**tiny.inputs(torch.bfloat16, False), return_dict=False)[0]
        out = ours(**tiny.inputs(torch.bfloat16, False), return_dict=False)[0]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_padded_caption_becomes_kv_lengths(monkeypatch):
    """Flux with a caption mask: the double-stream blocks pass kv_lengths (no mask), and the
    numbers (forward and backward) are those of diffusers' masked SDPA."""
    calls = _compare(flux(text_padding="right"), "reference", torch.float64, 1e-10, 1e-12, monkeypatch=monkeypatch)
    assert calls[0]["kv_lengths"].tolist() == [[6, 12], [4, 12]]


def test_other_caption_mask_goes_through_as_a_mask(monkeypatch):
    """Masked tokens inside the caption are no right padding: the double-stream block runs the
    drop-in SDPA with the mask over the joint sequence, with diffusers' numbers."""
    from peer_attention.integrations import diffusers as module

    masks = []
    real = module.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "scaled_dot_product_attention", spy)
    tiny = dataclasses.replace(flux(text_padding="inside"), peer_calls=0)
    _compare(tiny, "reference", torch.float64, 1e-10, 1e-12, monkeypatch=monkeypatch)
    assert len(masks) == 2 and all(m is not None and m.shape == (2, 1, 1, 18) for m in masks)


def test_right_padding_lengths():
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    assert pa_diffusers.right_padding_lengths(mask, 2, [3, 2]).tolist() == [[2, 2], [1, 2]]
    assert pa_diffusers.right_padding_lengths(mask[:, None, None], 2, [3, 2]).tolist() == [[2, 2], [1, 2]]
    hole = torch.tensor([[1, 0, 1, 1, 1]], dtype=torch.bool)  # padding inside the first stream
    assert pa_diffusers.right_padding_lengths(hole, 1, [3, 2]) is None
    assert pa_diffusers.right_padding_lengths(mask.float(), 2, [3, 2]) is None  # float masks stay masks
    assert pa_diffusers.right_padding_lengths(mask, 2, [2, 3]) is None  # the second stream is padded first


def _wan_cross_attention():
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    torch.manual_seed(0)
    return WanAttention(dim=16, heads=2, dim_head=8, added_kv_proj_dim=16, cross_attention_dim_head=8,
                        processor=WanAttnProcessor()).double()


@pytest.mark.parametrize("kind", ["right_padding", "float"])
def test_wan_i2v_text_mask(kind):
    """A text mask on Wan's I2V cross-attention: right padding runs as kv_lengths, any other
    mask goes through as a mask; both give diffusers' numbers and gradients."""
    attn = _wan_cross_attention()
    ours = copy.deepcopy(attn)
    ours.set_processor(pa_diffusers.WanAttnProcessor("reference"))
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 3 + 512, 16, generator=gen, dtype=torch.float64)
    keep = torch.arange(512)[None, :] < torch.tensor([[512], [300]])
    mask = keep if kind == "right_padding" else torch.where(keep, 0.0, -1e4).double() - 0.1 * torch.rand(2, 512)
    results = []
    for module in (attn, ours):
        x, c = video.clone().requires_grad_(), context.clone().requires_grad_()
        out = module(x, c, mask)
        out.pow(2).sum().backward()
        results.append([out] + [x.grad, c.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_apply_rejects_unsupported_models():
    with pytest.raises(TypeError, match="Linear"):
        pa_diffusers.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a torch.nn.Module.*str"):
        pa_diffusers.apply("flux")
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                       layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="UNet2DModel"):
        pa_diffusers.apply(unet)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        pa_diffusers.apply(flux().build(), backend="fast")


def test_apply_refuses_processor_options_it_cannot_serve():
    model = sd3().build()
    model.fuse_qkv_projections()
    with pytest.raises(NotImplementedError, match="fused QKV"):
        pa_diffusers.apply(model)
    model = flux().build()
    pa_diffusers.apply(model, backend="reference")
    model.set_attention_backend("native")
    tiny = flux()
    with pytest.raises(NotImplementedError, match="set_attention_backend"):
        model(**tiny.inputs(torch.float32, False))


def test_import_does_not_pull_in_diffusers():
    code = "import sys, peer_attention, peer_attention.integrations; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
