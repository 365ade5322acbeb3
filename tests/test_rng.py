"""The noise of a render, drawn in AUTOMATIC1111's order from its generators (issue 13).

References nobody here wrote: Random123's known-answer vectors for Philox4x32-10, the values
A1111's ``rng_philox.py`` documents for ``torch.randn`` on CUDA, torch's CPU generator (what sdterm
drew before, through ``latents_noise``) and k-diffusion's ``BrownianTreeNoiseSampler``. The GPU
half (the "nv" generator against ``torch.randn`` on CUDA) is in tests/test_cuda.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdterm.errors import ConfigError
from sdterm.engine.sampling import rng as rngmod
from sdterm.engine.sampling.noise import latents_noise
from sdterm.engine.sampling.rng import (GPU_NEEDS_CUDA, ImageRNG, PhiloxGenerator, brownian_factory, make_generator,
                                        philox4x32)

# ------------------------------------------------------------------------------------------
# Philox 4x32-10
# ------------------------------------------------------------------------------------------

KAT = [  # Random123 kat_vectors, philox4x32 10 rounds: counter words, key words -> output words
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, dtype=np.uint32)[:, None], key)
    assert out.dtype == np.uint32 and out.shape == (4, 1)
    assert tuple(int(v) for v in out[:, 0]) == expected


def _philox_scalar(counter, key, rounds=10):
    """Philox4x32 on Python integers, written from the paper's description (one block at a time)."""
    c, k = list(counter), list(key)
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 % 2**32, (p0 >> 32) ^ c[3] ^ k[1], p0 % 2**32]
    return c


def test_vectorized_philox_equals_block_by_block():
    rs = np.random.default_rng(7)
    counters = rs.integers(0, 2**32, size=(4, 64), dtype=np.uint64).astype(np.uint32)
    key = (0xDEADBEEF, 0x01234567)
    out = philox4x32(counters, key)
    for j in range(64):
        assert [int(v) for v in out[:, j]] == _philox_scalar([int(v) for v in counters[:, j]], key)


def test_nv_stream_layout_element_is_subsequence_call_is_counter():
    """Element i of the n-th draw of seed s is the first normal of block philox(counter = (n, 0, i, 0),
    key = (s mod 2^32, s >> 32)): curand_init(seed, subsequence=i, offset=4n)."""
    seed = 2**33 + 12345  # a seed with a high word (A1111's seeds + ENSD can pass 2^32)
    g = PhiloxGenerator(seed)
    g.randn((5,))
    w = g.words(300)
    for i in (0, 1, 299):
        assert [int(v) for v in w[:, i]] == _philox_scalar([1, 0, i, 0], [seed % 2**32, seed >> 32])


def _box_muller_python(x: int, y: int) -> float:
    u = x * rngmod._TWO_POW32_INV + rngmod._TWO_POW32_INV / 2
    v = y * rngmod._TWO_POW32_INV_2PI + rngmod._TWO_POW32_INV_2PI / 2
    return float(np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v)))


def test_box_muller_is_curands_first_output():
    # curand's float32 constants 2^-32 and 2^-32 * 2 pi.
    assert rngmod._TWO_POW32_INV == float(np.float32(2.0**-32))
    assert rngmod._TWO_POW32_INV_2PI == pytest.approx(2.0**-32 * 2 * math.pi, rel=1e-7)
    w = PhiloxGenerator(99).words(50)
    got = rngmod.box_muller_first(w[0], w[1])
    for i in range(50):
        ref = _box_muller_python(int(w[0, i]), int(w[1, i]))
        assert abs(float(got[i]) - ref) <= abs(ref) * 2**-23  # the same float32, up to libm's last bit


A1111_DOC_SEED0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                   [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                   [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
"""``torch.randn((3, 4))`` on CUDA with seed 0 as A1111's ``modules/rng_philox.py`` documents it (an
NVIDIA GPU's numbers; an H100 gives them to within 4e-7), which a CPU emulation meets to a few
units in the last place."""

NV_SEED0_3x4 = [-0.9246624112129211, -0.42534396052360535, -2.643845796585083, 0.14518387615680695,
                -0.12086650729179382, -0.5797256827354431, -0.6228513121604919, -0.32838714122772217,
                -1.0745420455932617, -0.3631440997123718, -1.6710504293441772, 2.265505075454712]
"""PhiloxGenerator(0).randn((3, 4)), pinned: A1111's generator gives these float32 values (its
float64 Box-Muller rounded once), within 3e-7 of the GPU's above."""


def test_nv_matches_the_gpu_values_a1111_documents():
    x = PhiloxGenerator(0).randn((3, 4))
    assert x.dtype == torch.float32 and x.shape == (3, 4)
    assert torch.allclose(x.double(), torch.tensor(A1111_DOC_SEED0, dtype=torch.float64), rtol=0, atol=3e-7)
    assert x.flatten().tolist() == NV_SEED0_3x4


NV_SEED42_512 = ([0.1940188705921173, 2.1613738536834717, -0.17205095291137695, 0.8490599989891052],
                 50.93439804427908)
NV_SEED42_512_SECOND = ([0.13913749158382416, -0.10821615904569626, -0.7174221873283386, 0.7566486597061157],
                        -1.0209135292461724)
"""ImageRNG(42, 512, 512, rng="nv"): the starting noise and the first per-step draw (first four
values, float64 sum). torch.manual_seed(42); torch.randn(4, device="cuda") is the well-known
[0.1940, 2.1614, -0.1721, 0.8491]."""


def test_nv_image_noise_is_pinned():
    r = ImageRNG(42, 512, 512, rng="nv")
    x = r.first()
    assert x.shape == (1, 4, 64, 64) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.flatten()[:4].tolist() == NV_SEED42_512[0]
    assert float(x.double().sum()) == pytest.approx(NV_SEED42_512[1], abs=1e-9)
    n = r.next()
    assert n.flatten()[:4].tolist() == NV_SEED42_512_SECOND[0]
    assert float(n.double().sum()) == pytest.approx(NV_SEED42_512_SECOND[1], abs=1e-9)
    # Each element its own Philox stream: a smaller draw is the start of a larger one.
    assert torch.equal(PhiloxGenerator(42).randn((7,)), x.flatten()[:7])
    # The numbers of a draw depend on its size only through where it ends.
    assert torch.equal(PhiloxGenerator(42).randn((2, 4, 8, 8)).flatten(), PhiloxGenerator(42).randn((512,)))


def test_nv_statistics_look_normal():
    x = PhiloxGenerator(1234).randn((1, 4, 128, 128)).double()
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    assert x.abs().max() < 6.7  # u >= 2^-33: |x| <= sqrt(-2 ln 2^-33) = 6.77


# ------------------------------------------------------------------------------------------
# "cpu": today's pixels
# ------------------------------------------------------------------------------------------

SEED3_64x64_FIRST_STEP = [-2.2754509449005127, 2.133171319961548, -1.3420050144195557, -0.6073615550994873]
"""The first per-step noise (DDIM eta > 0) of seed 3 at 64x64: the seed's CPU generator's second draw."""


@pytest.mark.parametrize("seed,w,h,subseed,strength",
                         [(3, 64, 64, 0, 0.0), (42, 512, 768, 0, 0.0), (7, 96, 64, 9, 0.3), (2**32 - 1, 64, 128, 5, 1.0)])
def test_cpu_mode_draws_what_latents_noise_drew(seed, w, h, subseed, strength):
    x_old, gen = latents_noise(seed, w, h, subseed, strength)
    r = ImageRNG(seed, w, h, subseed=subseed, subseed_strength=strength)
    assert torch.equal(r.first(), x_old)
    for _ in range(3):  # DDIM's eta noise: the seed's generator, continued
        assert torch.equal(r.next(), torch.randn(x_old.shape, generator=gen, dtype=torch.float32))


def test_cpu_mode_is_pinned():
    from .test_engine import SEED3_64x64_NOISE

    r = ImageRNG(3, 64, 64)
    assert r.next().flatten()[:4].tolist() == pytest.approx(SEED3_64x64_NOISE, abs=1e-7)  # next() first: x_T
    assert r.next().flatten()[:4].tolist() == SEED3_64x64_FIRST_STEP


def test_device_moves_the_noise():
    r = ImageRNG(3, 64, 64, rng="nv", device="meta")
    assert r.first().device.type == "meta" and r.next().device.type == "meta"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_mode_without_cuda_says_so_in_one_line():
    with pytest.raises(ConfigError) as err:
        ImageRNG(1, 64, 64, rng="gpu")
    assert str(err.value) == "--rng gpu needs an NVIDIA GPU; --rng nv gives the same numbers on any device"
    assert GPU_NEEDS_CUDA == str(err.value)
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        brownian_factory(1, rng="gpu")
    with pytest.raises(ConfigError, match="unknown rng"):
        ImageRNG(1, 64, 64, rng="mps")


# ------------------------------------------------------------------------------------------
# Variation seed
# ------------------------------------------------------------------------------------------


def _slerp_columns(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Spherical interpolation of each (channel, column) vector on its own, in float64, one at a time."""
    out = np.empty_like(low, dtype=np.float64)
    for c in range(low.shape[0]):
        for col in range(low.shape[2]):
            a, b = low[c, :, col].astype(np.float64), high[c, :, col].astype(np.float64)
            omega = math.acos(float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))))
            out[c, :, col] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    return out


@pytest.mark.parametrize("rng", ["cpu", "nv"])
@pytest.mark.parametrize("strength", [0.1, 0.5, 0.9])
def test_variation_is_a1111s_slerp_per_column(rng, strength):
    r = ImageRNG(11, 64, 96, subseed=22, subseed_strength=strength, rng=rng, variation="a1111")
    x = r.first()[0]
    low = make_generator(rng, 11).randn((4, 12, 8)).numpy()
    high = make_generator(rng, 22).randn((4, 12, 8)).numpy()
    assert np.allclose(x.numpy(), _slerp_columns(strength, low, high), rtol=0, atol=2e-6)
    # Not the whole-tensor slerp sdterm used to do.
    assert not torch.allclose(x, ImageRNG(11, 64, 96, subseed=22, subseed_strength=strength, rng="cpu",
                                          variation="sdterm").first()[0], atol=1e-3) or rng != "cpu"


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_variation_edges_as_a1111(rng, monkeypatch):
    base = ImageRNG(5, 64, 64, rng=rng, variation="a1111").first()
    # Strength 0: no subseed draw at all; whatever the subseed, the seed's noise.
    drawn = []
    real = rngmod.randn_local
    monkeypatch.setattr(rngmod, "randn_local", lambda rng_, seed, shape: drawn.append(seed) or real(rng_, seed, shape))
    assert torch.equal(ImageRNG(5, 64, 64, subseed=77, subseed_strength=0.0, rng=rng, variation="a1111").first(), base)
    assert drawn == []
    ImageRNG(5, 64, 64, subseed=77, subseed_strength=0.01, rng=rng, variation="a1111").first()
    assert drawn == [77]
    # Strength 1: the subseed's noise.
    other = ImageRNG(77, 64, 64, rng=rng, variation="a1111").first()
    assert torch.allclose(ImageRNG(5, 64, 64, subseed=77, subseed_strength=1.0, rng=rng, variation="a1111").first(),
                          other, atol=1e-5)
    # The subseed equal to the seed: A1111's near-parallel branch, a linear blend of equal tensors
    # (no NaN from acos(1) / sin(0)).
    same = ImageRNG(5, 64, 64, subseed=5, subseed_strength=0.4, rng=rng, variation="a1111").first()
    assert torch.allclose(same, base, rtol=0, atol=1e-6)
    # The per-step noise continues the seed's generator: the subseed's draw came from its own.
    r = ImageRNG(5, 64, 64, subseed=77, subseed_strength=0.5, rng=rng, variation="a1111")
    r.first()
    gen = make_generator(rng, 5)
    gen.randn((4, 8, 8))
    assert torch.equal(r.next()[0], gen.randn((4, 8, 8)))


def test_variation_default_keeps_cpu_pixels_and_follows_a1111_elsewhere():
    assert ImageRNG(1, 64, 64).variation == "sdterm"
    assert ImageRNG(1, 64, 64, rng="nv").variation == "a1111"
    with pytest.raises(ValueError):
        ImageRNG(1, 64, 64, variation="linear")


# ------------------------------------------------------------------------------------------
# ENSD
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_ensd_changes_only_the_per_step_noise(rng):
    plain = ImageRNG(100, 64, 64, subseed=3, subseed_strength=0.2, rng=rng)
    delta = ImageRNG(100, 64, 64, subseed=3, subseed_strength=0.2, rng=rng, ensd=31337)
    assert torch.equal(plain.first(), delta.first())
    steps = make_generator(rng, 100 + 31337)  # A1111: a fresh generator seeded with seed + ENSD
    for _ in range(3):
        d = delta.next()
        assert torch.equal(d, steps.randn((1, 4, 8, 8)))
        assert not torch.allclose(d, plain.next())


# ------------------------------------------------------------------------------------------
# Retries
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rng", ["cpu", "nv"])
@pytest.mark.parametrize("ensd", [0, 31337])
def test_state_round_trip(rng, ensd):
    r = ImageRNG(8, 64, 64, rng=rng, ensd=ensd)
    before = r.get_state()
    x = r.next()
    assert r.get_state().first_drawn and not before.first_drawn
    r.next()
    mid = r.get_state()
    tail = [r.next() for _ in range(3)]
    r.set_state(mid)
    assert all(torch.equal(a, r.next()) for a in tail)
    r.set_state(before)  # back before the start: next() is the starting noise again
    assert torch.equal(r.next(), x)
    # The state carries over to a new ImageRNG of the same image (a retry with a fresh object).
    other = ImageRNG(8, 64, 64, rng=rng, ensd=ensd)
    other.set_state(mid)
    assert torch.equal(other.next(), tail[0])


def test_first_is_repeatable_and_restarts_the_steps():
    r = ImageRNG(8, 64, 64, rng="nv")
    x, n1 = r.first(), r.next()
    assert torch.equal(r.first(), x) and torch.equal(r.next(), n1)


# ------------------------------------------------------------------------------------------
# Brownian tree noise (the SDE samplers)
# ------------------------------------------------------------------------------------------


def kdiffusion_sampling():
    """k-diffusion's own ``sampling`` module, loaded without the package's ``__init__`` (which pulls
    in scikit-image and torchvision): the one loader the sampler tests use too."""
    from .kdiff_reference import load

    return load()[0]


def _karras(n=10, sigma_min=0.0292, sigma_max=14.6146, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros([1])])


# torchsde rounds the tree's ends to its tolerance (1e-6) and then warns that sigma_max lies past them,
# in k-diffusion (and A1111) as here.
BROWNIAN_WARNING = "ignore:Should have tb<=t1:UserWarning"


@pytest.mark.filterwarnings(BROWNIAN_WARNING)
def test_brownian_cpu_is_kdiffusions_brownian_tree_noise_sampler():
    import torchsde._brownian.brownian_interval as bi

    kd = kdiffusion_sampling()
    original = bi._randn
    sigmas = _karras()
    x = torch.zeros(1, 4, 8, 8)
    smin, smax = sigmas[sigmas > 0].min(), sigmas.max()
    ref = kd.BrownianTreeNoiseSampler(x, smin, smax, seed=[1234])  # as A1111 makes it: a list of seeds
    ours = brownian_factory(1234, rng="cpu")(x, smin, smax)
    draws = []
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        a, b = ours(s, s_next), ref(s, s_next)
        assert a.shape == x.shape and torch.equal(a, b)
        draws.append(a)
    assert bi._randn is original  # torchsde is left as it was
    # A retried step, on a sampler built afresh, gets the first try's noise.
    again = ImageRNG(1234, 64, 64).brownian(x, smin, smax)
    assert torch.equal(again(sigmas[5], sigmas[6]), draws[5])
    assert torch.equal(again(sigmas[2], sigmas[3]), draws[2])
    z = torch.cat(draws).double()
    assert abs(float(z.std()) - 1) < 0.15  # unit variance


@pytest.mark.filterwarnings(BROWNIAN_WARNING)
def test_brownian_nv_draws_its_tree_from_philox_like_a1111():
    """A1111 replaces torchsde's ``_randn`` with its ``randn_local``: a fresh generator of the chosen
    kind, seeded with the tree node's seed. Reproduced here around k-diffusion's own sampler."""
    import torchsde._brownian.brownian_interval as bi

    kd = kdiffusion_sampling()
    sigmas = _karras()
    x = torch.zeros(1, 4, 8, 8)
    smin, smax = sigmas[sigmas > 0].min(), sigmas.max()
    original = bi._randn
    bi._randn = lambda size, dtype, device, seed: PhiloxGenerator(int(seed)).randn(size).to(device=device, dtype=dtype)
    try:
        ref = kd.BrownianTreeNoiseSampler(x, smin, smax, seed=[99])
        expected = [ref(s, s_next) for s, s_next in zip(sigmas[:-2], sigmas[1:-1])]
    finally:
        bi._randn = original
    ours = ImageRNG(99, 64, 64, rng="nv", ensd=5).brownian(x, smin, smax)  # ENSD plays no part
    cpu = ImageRNG(99, 64, 64, rng="cpu").brownian(x, smin, smax)
    for (s, s_next), e in zip(zip(sigmas[:-2], sigmas[1:-1]), expected):
        got = ours(s, s_next)
        assert torch.equal(got, e)
        assert not torch.allclose(got, cpu(s, s_next))
