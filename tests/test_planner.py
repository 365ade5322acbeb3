"""The planner's decisions for budgets and sizes (full-size SD v1 byte counts, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from sdterm.config import ModelConfig, VAEConfig
from sdterm.engine.memory.planner import GiB, MiB, BudgetTooSmall, ModelSizes, Plan, cheaper, plan_render
from sdterm.engine.memory.tiling import choose_tile, vae_activation_bytes


@pytest.fixture(scope="module")
def sizes() -> ModelSizes:
    from transformers import CLIPTextModel

    from sdterm.engine.networks.clip import clip_config
    from sdterm.engine.networks.unet import UNetModel
    from sdterm.engine.networks.vae import VAEDecoder

    cfg = ModelConfig()
    with torch.device("meta"):
        unet, vae, text = UNetModel(cfg.unet), VAEDecoder(cfg.vae), CLIPTextModel(clip_config(cfg.text))

    def nbytes(m):
        return sum(p.numel() * 2 for p in m.parameters())

    units = tuple((n, nbytes(m), lvl) for n, m, lvl in unet.units())
    return ModelSizes(nbytes(text), sum(b for _, b, _ in units), nbytes(vae), units)


def plan(sizes, budget, w=512, h=512, text_needed=False, cfg_batch=2):
    vae = VAEConfig()
    return plan_render(
        sizes, int(budget), w, h,
        vae_decode_bytes=lambda: vae_activation_bytes(vae, h // 8, w // 8, torch.float16),
        vae_tile_for=lambda avail: choose_tile(vae, h // 8, w // 8, torch.float16, avail),
        cfg_batch=cfg_batch, text_needed=text_needed,
    )


def test_plenty_of_memory_keeps_everything_resident(sizes):
    p = plan(sizes, 8 * GiB, text_needed=True)
    assert (p.text, p.unet, p.vae) == ("resident", "resident", "resident")
    assert p.vae_tile is None and not p.split_cfg


def test_two_gib_keeps_the_unet_whole_within_the_target(sizes):
    p = plan(sizes, 2 * GiB)
    assert p.unet in ("resident", "staged")
    assert p.estimate <= 1.9 * GiB


def test_one_gib_streams_the_unet_within_budget(sizes):
    p = plan(sizes, 1 * GiB)
    assert p.unet == "streamed"
    assert p.estimate <= 1 * GiB
    kept = sum(sizes.units[i][1] for i in p.resident_units)
    assert 0 < kept < sizes.unet
    # The deepest units (weight-heavy, compute-light) are the ones kept.
    levels = {sizes.units[i][2] for i in p.resident_units}
    assert max(u[2] for u in sizes.units) in levels
    assert p.ring_bytes >= 2 * max(b for i, (_, b, _) in enumerate(sizes.units) if i not in p.resident_units)


def test_budget_shrinks_monotonically_to_cheaper_modes(sizes):
    order = {"resident": 0, "staged": 1, "streamed": 2}
    last = -1
    for budget in (8, 4, 3, 2, 1.5, 1.0, 0.8):
        p = plan(sizes, budget * GiB, text_needed=True)
        assert order[p.unet] >= last
        last = order[p.unet]
        assert p.estimate <= budget * GiB


def test_large_images_tile_the_vae(sizes):
    p = plan(sizes, 2.5 * GiB, 1024, 1024)
    assert p.estimate <= 2.5 * GiB
    big = plan(sizes, 4.5 * GiB, 2048, 2048)
    assert big.vae_tile is not None
    assert big.estimate <= 4.5 * GiB


def test_too_small_a_budget_says_what_would_fit(sizes):
    with pytest.raises(BudgetTooSmall, match="needs at least"):
        plan(sizes, 300 * MiB)


def test_cheaper_after_oom_always_reduces(sizes):
    p = plan(sizes, 8 * GiB)
    seen = [p]
    stage_plans = []
    while (p := cheaper(p, "unet", sizes, 512, 512)) is not None:
        stage_plans.append((p.unet, p.split_cfg, len(p.resident_units)))
        seen.append(p)
        assert len(seen) < 20
    assert stage_plans[0] == ("staged", True, 0)
    assert stage_plans[-1][0] == "streamed"
    v = cheaper(Plan(GiB), "vae", sizes, 1024, 1024)
    assert v.vae_tile == 64
    assert cheaper(v, "vae", sizes, 1024, 1024).vae_tile == 32
