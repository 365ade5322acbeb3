"""The attention warm-up (engine/attention_warm.py) makes exactly the attention calls a render's
U-Net makes: the same query, key and value shapes and strides (what cuDNN's plan cache is keyed
by), for every way guidance calls the U-Net and for latent sides the downsampling rounds up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdterm.config import UNetConfig
from sdterm.engine.attention_warm import transformer_inputs, warm_attention
from sdterm.engine.networks.unet import UNetModel
from sdterm.engine.sampling.guidance import guided, runs_apart, unet_calls

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = UNetConfig(model_channels=32, channel_mult=(1, 2, 3), attention_resolutions=(1, 4), num_heads=2,
                 context_dim=8, num_res_blocks=1)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every SDPA call's (query shape, query strides, key shape, key strides, value shape, dtype)."""
    calls = set()
    real = F.scaled_dot_product_attention

    def recorded(q, k, v, *args, **kwargs):
        calls.add((tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape), v.stride(), q.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return calls


@pytest.mark.parametrize("scale,cond_tokens,uncond_tokens,split", [
    (7.5, 77, 77, False),  # one batch of two
    (7.5, 154, 77, False),  # token counts differ: two passes
    (7.5, 77, 77, True),  # two passes asked for (low VRAM)
    (1.0, 77, 154, False),  # the prompt alone
])
@pytest.mark.parametrize("h,w", [(8, 8), (13, 7)])
def test_warm_up_calls_are_the_renders_calls(sdpa_calls, scale, cond_tokens, uncond_tokens, split, h, w):
    unet = UNetModel(CFG).eval()
    cond, uncond = torch.randn(1, cond_tokens, 8), torch.randn(1, uncond_tokens, 8)
    with torch.inference_mode():
        guided(unet, cond, uncond, scale, split=split)(torch.randn(1, 4, h, w), 500.0)
    rendered = set(sdpa_calls)
    sdpa_calls.clear()
    apart = runs_apart(cond, uncond, split)
    warm_attention(CFG, unet_calls(scale, apart, cond_tokens, uncond_tokens), h, w, torch.float32,
                   torch.device("cpu"))
    assert sdpa_calls == rendered


def test_transformer_inputs_round_odd_sides_up():
    # 13x7 -> 7x4 -> 4x2: attention at factors 1 and 4, the middle block at the deepest level
    assert transformer_inputs(CFG, 13, 7) == [(32, 91), (96, 8)]
    sd = UNetConfig()
    assert transformer_inputs(sd, 64, 64) == [(320, 4096), (640, 1024), (1280, 64), (1280, 256)]


def test_built_meanwhile_runs_both_at_once_and_hands_over_the_error():
    import threading

    from sdterm.engine.loading.checkpoint import CheckpointError
    from sdterm.engine.unet_stage import built_meanwhile

    started, order = threading.Event(), []

    def build():
        assert started.wait(10), "meanwhile did not run while the build waited"
        order.append(threading.current_thread().name)
        raise CheckpointError("model.safetensors: truncated")

    def meanwhile():
        started.set()
        order.append("meanwhile")

    with pytest.raises(CheckpointError, match="truncated"):
        built_meanwhile(build, meanwhile)
    assert order == ["meanwhile", "sdterm-build"]
    built_meanwhile(lambda: None, lambda: None)  # nothing raised, nothing left behind


def test_built_meanwhile_waits_for_the_build_after_an_error_but_not_after_an_interrupt():
    import threading

    from sdterm.engine.unet_stage import built_meanwhile

    release, finished = threading.Event(), threading.Event()

    def build():
        release.wait(10)
        finished.set()

    def failing():
        threading.Timer(0.2, release.set).start()
        raise ValueError("a bug in the warm-up")

    with pytest.raises(ValueError):
        built_meanwhile(build, failing)
    assert finished.is_set()  # waited for: nothing builds the model beside a retry

    release.clear()
    finished.clear()

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        built_meanwhile(build, interrupted)
    assert not finished.is_set()  # not waited for
    release.set()
    assert finished.wait(10)
