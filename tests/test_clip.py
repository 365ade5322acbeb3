"""Our CLIP text encoder (engine/networks/clip.py) against transformers' CLIPTextModel on the same
weights: the same outputs (every hidden state: clip skip takes them), the same module names and
tensor registration order (the checkpoint's keys, LoRA targets and the model cache's layout)."""

from __future__ import annotations

import pytest
import torch

from sdterm.config import TextConfig
from sdterm.engine.loading.host_units import stage_layout
from sdterm.engine.networks.clip import CLIPTextEncoder, build_text_encoder, clip_inner, reference_text_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, max_positions=77)


def pair(cfg: TextConfig) -> tuple[CLIPTextEncoder, torch.nn.Module]:
    """Ours with random weights drawn as transformers draws them, and transformers' model with
    the same weights."""
    torch.manual_seed(0)
    ours = build_text_encoder(cfg, torch.float32)
    ref = reference_text_model(cfg).eval()
    clip_inner(ref).load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("cfg", [TINY, TextConfig(), TextConfig(hidden_act="gelu", **{
    k: getattr(TINY, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")})],
                         ids=["tiny", "sd-v1", "gelu"])
def test_outputs_and_every_hidden_state_are_transformers(cfg):
    ours, ref = pair(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=g)
    ids[:, 0] = cfg.vocab_size - 2
    with torch.inference_mode():
        got = ours(input_ids=ids, output_hidden_states=True)
        want = ref(input_ids=ids, output_hidden_states=True)
        short = ours(input_ids=ids[:, :20])  # fewer tokens than positions: the first positions
        want_short = ref(input_ids=ids[:, :20]).last_hidden_state
    assert len(got.hidden_states) == len(want.hidden_states) == cfg.num_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short.last_hidden_state, want_short, rtol=1e-5, atol=1e-5)
    assert ours(input_ids=ids).hidden_states is None


def test_names_order_and_the_model_cache_layout_are_transformers():
    with torch.device("meta"):
        ours, ref = CLIPTextEncoder(TINY), clip_inner(reference_text_model(TINY))
    linear = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)]  # LoRA's targets
    assert linear == [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)] and len(linear) == 18
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()] == ["embeddings.position_ids"]
    with torch.device("meta"):
        ref_model = reference_text_model(TINY)
    assert stage_layout("text", CLIPTextEncoder(TINY).to("meta"), torch.float16).describe() == \
        stage_layout("text", ref_model, torch.float16).describe()


def test_the_random_weights_are_transformers_draw():
    """The demo model and the bench's checkpoints keep the weights they had with CLIPTextModel,
    and so does everything drawn after the text encoder (the generator is left as it left it)."""
    torch.manual_seed(3)
    drawn = clip_inner(reference_text_model(TINY)).state_dict()
    next_draw = torch.rand(4)
    torch.manual_seed(3)
    ours = build_text_encoder(TINY, torch.float32)
    assert torch.equal(torch.rand(4), next_draw)
    assert ours.state_dict().keys() == {k for k in drawn if not k.endswith("position_ids")}
    assert all(torch.equal(v, drawn[k]) for k, v in ours.state_dict().items())
    assert torch.equal(ours.embeddings.position_ids, torch.arange(TINY.max_positions)[None])


def test_an_unknown_activation_is_one_clear_error():
    with pytest.raises(ValueError, match="activation 'relu'"):
        CLIPTextEncoder(TextConfig(hidden_act="relu"))
