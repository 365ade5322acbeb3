"""Every random number a render draws, in AUTOMATIC1111's order and from its generators.

One :class:`ImageRNG` per image (AUTOMATIC1111's ``modules/rng.py`` has the same object):

- :meth:`ImageRNG.first` is the starting noise x_T: the seed's draw, with the variation seed's
  draw mixed in by spherical interpolation when the variation strength is not 0 (A1111 draws the
  subseed's noise from a generator of its own, so the order of the two draws changes nothing).
- :meth:`ImageRNG.next` is the next per-step noise (DDIM with eta > 0, the ancestral samplers,
  LCM): the seed's generator continued after the starting noise, or, with an eta noise seed delta
  (ENSD) other than 0, a fresh generator seeded with seed + ENSD. A1111 reseeds whenever ENSD is
  set, for every sampler; its per-sampler ``uses_ensd`` flag only decides whether the infotext
  writes "ENSD" (a sampler without per-step noise never draws from it anyway).
- :meth:`ImageRNG.brownian` is the SDE samplers' noise: k-diffusion's ``BrownianTreeNoiseSampler``
  seeded with the image's seed, whose torchsde tree draws its Gaussians from the same kind of
  generator (A1111 replaces torchsde's ``_randn`` with its ``randn_local``); ENSD plays no part.
- :meth:`ImageRNG.get_state` / :meth:`ImageRNG.set_state`: a retried step draws what the first
  try drew.

Generators (``rng``):

- ``"cpu"``: ``torch.Generator("cpu")`` (sdterm's behaviour before there was a choice, and A1111's
  "CPU"). Device independent.
- ``"gpu"``: ``torch.randn`` on CUDA with a CUDA generator (A1111's default, "GPU"). Needs CUDA.
- ``"nv"``: :class:`PhiloxGenerator`, A1111's "NV": the Philox 4x32-10 counter-based generator
  and Box-Muller transform that ``torch.randn`` runs on an NVIDIA GPU, computed with numpy on any
  device. Where it can't be the GPU's numbers bit for bit, see :class:`PhiloxGenerator`.

Everything here is float32, as A1111 draws it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from ...errors import ConfigError
from .noise import slerp as slerp_whole

GPU_NEEDS_CUDA = "--rng gpu needs an NVIDIA GPU; --rng nv gives the same numbers on any device"

RNG_MODES = ("cpu", "nv", "gpu")

# --------------------------------------------------------------------------------------------
# Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
# generator behind curand's curandStatePhilox4_32_10_t and so behind torch's CUDA sampling.
# --------------------------------------------------------------------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
"""The round multipliers (for counter words 0 and 2)."""
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
"""The Weyl key increments (golden ratio, sqrt(3) - 1) added to the key between rounds."""

_MASK32 = 0xFFFFFFFF
_U64_32 = np.uint64(32)
_U64_MASK32 = np.uint64(_MASK32)

# curand's constants, as float32 (what the CUDA kernel uses): 2^-32 and 2^-32 * 2 pi.
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: Sequence[int], rounds: int = 10) -> np.ndarray:
    """Philox 4x32 with ``rounds`` rounds over many counters at once.

    ``counter``: (4, n) unsigned 32-bit words (word 0 first); ``key``: two 32-bit words. Returns the
    (4, n) uint32 output block for each counter. Ten rounds is the standard Philox4x32-10.
    """
    c = np.asarray(counter, dtype=np.uint64)
    if c.ndim == 1:
        c = c[:, None]
    c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
    k0, k1 = int(key[0]) & _MASK32, int(key[1]) & _MASK32
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        p0 = c0 * m0  # 32 x 32 -> 64 bits: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = ((p1 >> _U64_32) ^ c1 ^ np.uint64(k0), p1 & _U64_MASK32,
                          (p0 >> _U64_32) ^ c3 ^ np.uint64(k1), p0 & _U64_MASK32)
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def box_muller_first(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The first of the two normals curand's ``_curand_box_muller`` makes from words ``x``, ``y``:
    sqrt(-2 ln u) sin(v) with u = (x + 1/2) 2^-32 in (0, 1) and v = (y + 1/2) 2^-32 2 pi.

    Computed as A1111's NV generator computes it: curand's float32 constants, the arithmetic in
    float64, the result rounded to float32. The GPU does it in float32 with ``logf`` and the fast
    ``__sincosf``, which usually lands within a unit in the last place of this: see
    :class:`PhiloxGenerator`.
    """
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A1111's "NV" generator: ``torch.randn`` on an NVIDIA GPU, reproduced with numpy.

    torch's CUDA sampling kernel gives element ``i`` its own Philox stream (curand's subsequence
    ``i``: counter words 2-3), keyed by the seed (key = its low and high 32 bits), starting at the
    generator's offset / 4 (counter words 0-1), and keeps the first normal of the first block it
    draws. Each ``torch.randn`` call then moves the generator's offset on by 4 for a tensor of up
    to four times the kernel's thread count: this generator moves its counter on by one per call.

    Where it matches the GPU: elements whose index is below the kernel's thread count (256 x the
    blocks it launches: multiprocessors x (threads per multiprocessor / 256); 270,336 on an H100
    SXM, 125,952 on an RTX 3090, 14,336 on a GTX 1650), so a 512x512 latent (16,384 numbers) on
    any but the smallest GPUs; beyond that each GPU thread goes on to its next Box-Muller outputs,
    which A1111's generator (and this one) doesn't do: its numbers there are its own, the same on
    every device.

    The Philox words are the GPU's bit for bit (tests/test_cuda.py checks them through
    ``torch.randint``). The Box-Muller step is A1111's: float64, rounded once to float32, where
    curand computes in float32 (u keeps fewer bits of words near 2^32, that is, of outputs near 0)
    with ``logf`` and the hardware's approximate ``__sincosf``. So this is A1111's "NV" bit for bit,
    and the GPU's ``torch.randn`` only nearly: on an H100 (torch 2.11, CUDA 13) 16% of the numbers
    were equal, the median gap 1.2e-7, 99.9% within 1.6e-6, the largest 2.3e-5 (at -0.0006).
    """

    def __init__(self, seed: int, offset: int = 0):
        self.seed = int(seed)
        self.offset = int(offset)

    def words(self, n: int) -> np.ndarray:
        """The (4, n) Philox output blocks of the next call (without moving the counter)."""
        idx = np.arange(n, dtype=np.uint64)
        counter = np.empty((4, n), dtype=np.uint64)
        counter[0] = self.offset & _MASK32
        counter[1] = (self.offset >> 32) & _MASK32
        counter[2] = idx & _U64_MASK32
        counter[3] = idx >> _U64_32
        return philox4x32(counter, (self.seed & _MASK32, (self.seed >> 32) & _MASK32))

    def randn_numpy(self, shape: Sequence[int]) -> np.ndarray:
        n = math.prod(shape)
        w = self.words(n)
        self.offset += 1
        return box_muller_first(w[0], w[1]).reshape(tuple(shape))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal float32 numbers of ``shape`` (on the CPU), as a CUDA ``torch.randn`` with
        this seed would give at this point of its generator."""
        return torch.from_numpy(self.randn_numpy(shape))

    def get_state(self) -> tuple[int, int]:
        return (self.seed, self.offset)

    def set_state(self, state: tuple[int, int]) -> None:
        self.seed, self.offset = int(state[0]), int(state[1])


class _TorchGenerator:
    """``torch.randn`` on ``device`` from a ``torch.Generator`` seeded with ``seed``."""

    def __init__(self, seed: int, device: str):
        self.device = device
        self.gen = torch.Generator(device).manual_seed(int(seed))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.gen, device=self.device, dtype=torch.float32)

    def get_state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)


class Generator(Protocol):
    def randn(self, shape: Sequence[int]) -> torch.Tensor: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


def check_rng(rng: str) -> None:
    """ConfigError (one line) unless ``rng`` names a generator this machine has."""
    if rng not in RNG_MODES:
        raise ConfigError(f"unknown rng {rng!r}; one of: {', '.join(RNG_MODES)}")
    if rng == "gpu" and not torch.cuda.is_available():
        raise ConfigError(GPU_NEEDS_CUDA)


def make_generator(rng: str, seed: int) -> Generator:
    """A fresh generator of kind ``rng`` seeded with ``seed`` (A1111's ``create_generator``)."""
    check_rng(rng)
    if rng == "nv":
        return PhiloxGenerator(seed)
    return _TorchGenerator(seed, "cuda" if rng == "gpu" else "cpu")


def randn_local(rng: str, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """The first draw of a fresh generator (A1111's ``randn_local``): what torchsde's Brownian tree
    draws for each of its nodes."""
    return make_generator(rng, seed).randn(shape)


def slerp_a1111(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's variation-seed slerp, for one image's noise of shape (channels, height, width).

    It normalizes along dim 1, the height: each (channel, column) pair is its own vector with its
    own angle, interpolated in the tensors' dtype (float32). When the vectors are nearly parallel on
    average (mean cosine > 0.9995) it blends linearly with the weights the other way round
    (``low * val + high * (1 - val)``), as A1111 does; that only happens when the two noises are
    (nearly) the same, e.g. the variation seed equal to the seed.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


@dataclass(frozen=True)
class RNGState:
    """Where an :class:`ImageRNG` stands: captured by :meth:`ImageRNG.get_state`, restored by
    :meth:`ImageRNG.set_state`. Opaque to callers."""

    first_drawn: bool
    step_seed: int | None
    """The seed of the per-step generator (seed, or seed + ENSD), once the starting noise is drawn."""
    step_state: Any


class ImageRNG:
    """The random numbers of one image, in AUTOMATIC1111's order (see the module's docstring).

    ``seed``, ``subseed`` (the variation seed) and ``subseed_strength`` (0..1) as A1111's; ``rng``
    one of ``"cpu"``, ``"nv"``, ``"gpu"``; ``ensd`` A1111's eta noise seed delta. ``width`` and
    ``height`` are the image's pixels: the noise is (1, channels, height // 8, width // 8) float32,
    moved to ``device`` when given (else it stays where it was drawn: the CPU, or CUDA for "gpu").

    ``variation`` picks how a variation seed is mixed in: ``"a1111"`` (:func:`slerp_a1111`, per
    column, float32) or ``"sdterm"`` (:func:`sdterm.engine.sampling.noise.slerp`: the whole tensor
    as one vector, float64: what sdterm did before it followed A1111, which keeps earlier images'
    pixels). Left None it is "sdterm" for ``rng="cpu"`` and "a1111" for the others.
    """

    def __init__(self, seed: int, width: int, height: int, *, subseed: int = 0, subseed_strength: float = 0.0,
                 rng: str = "cpu", ensd: int = 0, variation: str | None = None,
                 device: torch.device | str | None = None, channels: int = 4):
        check_rng(rng)
        if variation is None:
            variation = "sdterm" if rng == "cpu" else "a1111"
        if variation not in ("a1111", "sdterm"):
            raise ValueError(f"variation must be 'a1111' or 'sdterm', got {variation!r}")
        self.seed, self.subseed, self.subseed_strength = int(seed), int(subseed), float(subseed_strength)
        self.rng, self.ensd, self.variation = rng, int(ensd), variation
        self.device = torch.device(device) if device is not None else None
        self.shape: tuple[int, int, int, int] = (1, channels, height // 8, width // 8)
        self._step_gen: Generator | None = None
        self._step_seed: int | None = None

    # -- the starting noise ------------------------------------------------------------------

    def first(self) -> torch.Tensor:
        """The starting noise x_T (unit variance), and the per-step generator set up after it.

        Drawn from fresh generators each time it is called (so it is always the same tensor);
        afterwards :meth:`next` gives the first per-step noise.
        """
        image_shape = self.shape[1:]  # A1111 draws each image's noise as (C, H, W)
        gen = make_generator(self.rng, self.seed)
        if self.variation == "sdterm":
            x = gen.randn(image_shape)
            if self.subseed_strength > 0:
                sub = randn_local(self.rng, self.subseed, image_shape)
                x = slerp_whole(self.subseed_strength, x, sub)
        else:
            # A1111's order: the subseed's noise (its own generator; none at strength 0), then the
            # seed's, then the slerp.
            sub = randn_local(self.rng, self.subseed, image_shape) if self.subseed_strength != 0 else None
            x = gen.randn(image_shape)
            if sub is not None:
                x = slerp_a1111(self.subseed_strength, x, sub)
        if self.ensd:
            self._step_seed, self._step_gen = self.seed + self.ensd, make_generator(self.rng, self.seed + self.ensd)
        else:
            self._step_seed, self._step_gen = self.seed, gen
        return self._out(x.unsqueeze(0))

    # -- per-step noise ----------------------------------------------------------------------

    def next(self) -> torch.Tensor:
        """The next noise draw in A1111's order: the starting noise on the first call (unless
        :meth:`first` was called), then the per-step noise, one tensor of :attr:`shape` a call."""
        if self._step_gen is None:
            return self.first()
        return self._out(self._step_gen.randn(self.shape))

    __call__ = next

    # -- retries -----------------------------------------------------------------------------

    def get_state(self) -> RNGState:
        """Where the draws stand now (a copy: later draws don't change it)."""
        if self._step_gen is None:
            return RNGState(False, None, None)
        return RNGState(True, self._step_seed, self._step_gen.get_state())

    def set_state(self, state: RNGState) -> None:
        """Go back to ``state`` (from :meth:`get_state` of this or an equal ImageRNG): the draws
        that follow are the ones that followed it."""
        if not state.first_drawn:
            self._step_gen = self._step_seed = None
            return
        gen = make_generator(self.rng, state.step_seed)
        gen.set_state(state.step_state)
        self._step_seed, self._step_gen = state.step_seed, gen

    # -- the SDE samplers' Brownian noise ---------------------------------------------------

    def brownian(self, x: torch.Tensor, sigma_min: Any, sigma_max: Any) -> "BrownianNoise":
        """The SDE samplers' noise sampler for ``x``: see :func:`brownian_factory`."""
        return BrownianNoise(x, sigma_min, sigma_max, [self.seed], rng=self.rng)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None else x.to(self.device)


# --------------------------------------------------------------------------------------------
# Brownian tree noise (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE)
# --------------------------------------------------------------------------------------------

_RANDN_PATCH = threading.RLock()


@contextlib.contextmanager
def _torchsde_draws_from(rng: str) -> Iterator[None]:
    """While inside, torchsde's Brownian interval draws each node's Gaussians with
    :func:`randn_local` of ``rng`` (float32, then moved to the tree's device and dtype), as A1111's
    ``replace_torchsde_browinan`` makes it do; torchsde's own function is back on leaving."""
    import torchsde._brownian.brownian_interval as bi

    def draw(size, dtype, device, seed):
        return randn_local(rng, int(seed), size).to(device=device, dtype=dtype)

    with _RANDN_PATCH:
        saved = bi._randn
        bi._randn = draw
        try:
            yield
        finally:
            bi._randn = saved


class BrownianNoise:
    """k-diffusion's ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds)`` as A1111
    builds it (a list of seeds: one torchsde ``BrownianTree`` per batch item, each started at
    ``zeros_like(x[0])``), drawing from ``rng``'s generator (A1111's ``randn_local``).

    ``noise(sigma, sigma_next)`` is the tree's increment over [sigma_next, sigma] divided by
    sqrt(|sigma_next - sigma|): unit-variance noise, the same for the same interval however many
    times and in whatever order it is asked (a retried step gets the first try's noise). The tree's
    arithmetic runs on x's device in x's dtype; its Gaussians are drawn as ``rng`` draws them
    ("cpu": on the CPU, "nv": Philox on the CPU, "gpu": on CUDA) and moved there, so for "cpu" and
    "nv" the noise is the same on any device up to the float rounding of that arithmetic. (With
    torchsde's own draws, which k-diffusion uses outside A1111, it would be drawn on x's device
    and differ between the CPU and a GPU.)
    """

    def __init__(self, x: torch.Tensor, sigma_min: Any, sigma_max: Any, seeds: Sequence[int], *, rng: str = "cpu"):
        import torchsde

        check_rng(rng)
        if len(seeds) != x.shape[0]:
            raise ValueError(f"one seed per batch item: {len(seeds)} seeds for a batch of {x.shape[0]}")
        self.rng = rng
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x)[0]
        with _torchsde_draws_from(rng):
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with _torchsde_draws_from(self.rng):
            w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return w / (t1 - t0).abs().sqrt()


def brownian_factory(seeds: int | Sequence[int], rng: str = "cpu") -> Callable[[torch.Tensor, Any, Any], BrownianNoise]:
    """``brownian(x, sigma_min, sigma_max) -> noise_sampler(sigma, sigma_next)`` for the SDE
    samplers, seeded as A1111 seeds them: with the image's seed (one per batch item; not the
    variation seed, not ENSD). A1111 passes ``sigma_min = sigmas[sigmas > 0].min()`` and
    ``sigma_max = sigmas.max()`` of the schedule (0-d float32 tensors)."""
    seed_list = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    check_rng(rng)

    def brownian(x: torch.Tensor, sigma_min: Any, sigma_max: Any) -> BrownianNoise:
        return BrownianNoise(x, sigma_min, sigma_max, seed_list, rng=rng)

    return brownian


__all__ = ["GPU_NEEDS_CUDA", "RNG_MODES", "BrownianNoise", "ImageRNG", "PhiloxGenerator", "RNGState",
           "box_muller_first", "brownian_factory", "check_rng", "make_generator", "philox4x32", "randn_local",
           "slerp_a1111"]
