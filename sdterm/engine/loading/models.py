"""The models of one checkpoint: where they come from, built on first use, kept on the host.

``open_model`` (source.py) resolves what the user passed as ``--model``; :class:`Models` verifies the file up
front (every tensor of the three text-to-image models by name and shape, none read), builds each
model in the run dtype the first time a stage needs it (the VAE encoder only when an image is
encoded: a pruned file without one fails then, in one line), and knows the model's identity (the
A1111 hash, the text encoder's for the embedding cache) and its sizes for the planner."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch

from ..memory.planner import ModelSizes
from ..networks.clip import build_text_encoder, clip_prefix, verify_text_encoder
from ..networks.unet import UNetModel
from ..networks.vae import VAEDecoder, VAEEncoder
from ..prompt.tokenizer import PromptTokenizer, fetch_tokenizer
from .file_hash import TEXT_DIGEST, parts_sha256, recall, recall_sha256, short_hash
from .checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    Checkpoint,
    CheckpointError,
    identify,
    open_checkpoint,
    verify_module,
)
from .hasher import BackgroundHash, running
from .single_pass import SinglePass
from .source import ModelSource, open_model  # noqa: F401 - open_model: where callers import it from
from .host_units import PACKED, model_sizes, stage_units
from .store import HostStore
from .tensor_reader import read_header
from .vae_file import VAEFile, verify_vae_file


ON_DEMAND = frozenset({"vae_encoder"})
"""Models that text-to-image never builds; the checkpoint file is released once all the others are."""

SINGLE_PASS_BYTES = 256 << 20
"""A checkpoint at least this large is read in one pass on its first use (``single_pass.py``)."""

PREFETCH_WHILE_HASHING = 256 << 20
"""A checkpoint at least this large whose hash is asked for before it is known (on a first start,
the model hash of the image) has its text-to-image models loaded while the hash is computed."""


class Models:
    """The text encoder, U-Net and VAE decoder of one checkpoint (or random weights), on the host,
    and the VAE encoder when asked for."""

    def __init__(
        self,
        source: ModelSource,
        dtype: torch.dtype,
        *,
        data_dir: Path | None = None,
        hash_memo: Path | None = None,
        tokenizer_dir: Path | None = None,
        random_seed: int = 0,
        vae: Path | None = None,
        model_cache: Path | None = None,
        pin: bool = False,
    ):
        """``model_cache``: the folder of the model cache (``packed.py``; None: none). ``pin``:
        the host buffers are page-locked (the device is a GPU)."""
        self.source = source
        self.cfg = source.config
        self.dtype = dtype
        self.random_seed = random_seed
        self.data_dir = data_dir
        self.hash_memo = hash_memo
        self.token_memo = True
        """False: no text -> token ids memo on disk (``--no-cache``: no prompt is written to the cache folder)."""
        self._tokenizer_dir = tokenizer_dir or source.tokenizer_dir
        self._tokenizer: PromptTokenizer | None = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._pending: dict[str, Future] = {}  # being built by prefetch
        self._made: set[str] = set()
        """Every stage built in this process (a model let go by ``drop`` stays in it)."""
        self._ckpt: Checkpoint | None = None
        self._sha256: str | None = None
        self._sizes: ModelSizes | None = None
        self._sizes_lock = threading.Lock()  # made once, whichever thread asks first
        # Stage order as data; the factories are attributes so tests can see whether one was called.
        self.factories: dict[str, Callable[[], torch.nn.Module]] = {
            "text": self._build_text,
            "unet": self._build_unet,
            "vae": self._build_vae,
            "vae_encoder": self._build_vae_encoder,
        }
        self._store: HostStore | None = None
        self._hash: BackgroundHash | SinglePass | None = None
        self._pin, self._model_cache = pin, model_cache
        self._vae: VAEFile | None = verify_vae_file(vae, self.cfg.vae) if vae is not None else None
        self._vae_hash: str | None = None
        self._text_digest: BackgroundHash | str | None = None
        if source.checkpoint is not None:
            self._store = self._open_store(dtype)
            if self._store.pack is None:  # a pack is only ever made from a file that passed
                self._store.ensure_verified()
            self._sha256 = self._store.sha256 or recall_sha256(source.checkpoint, hash_memo)
            self._start_loading()
            self._text_digest = self._start_text_digest()

    def _start_loading(self) -> None:
        """A first use of a large safetensors file (no pack): its U-Net and VAE decoder are built
        in one pass over the file, on threads, from now on (the start-up's imports and the text
        encoder run meanwhile), the file hashed on the way (unless the command line began hashing it
        before its imports: that hash is used). Else the hash, if unknown, on a thread."""
        first = None
        begun = running(self.source.checkpoint) if self._sha256 is None else None  # by the command line
        if self._checkpoint_bytes() >= SINGLE_PASS_BYTES and self._store.pack is None:
            stages = tuple(s for s in ("unet", "vae") if s in self._packable())
            first = self._store.start_pass(stages, self._packable(), sha256=self._sha256 is None and begun is None,
                                           memo=self.hash_memo)
        if self._sha256 is None:
            self._hash = begun or first or BackgroundHash(self.source.checkpoint, self.hash_memo)

    def _start_text_digest(self) -> BackgroundHash | str | None:
        """The text encoder's own sha256 (its tensors' names, dtypes, shapes and bytes): remembered,
        else computed on a thread from the file; None for a .ckpt (the file's sha256 stands in)."""
        known = recall(self.source.checkpoint, self.hash_memo, TEXT_DIGEST)
        if known is not None:
            return known
        opened = self._ckpt.tensor_file() if self._ckpt is not None else None  # its header, parsed on a first use
        try:
            entries = opened.entries if opened is not None else read_header(self.source.checkpoint)
        except (OSError, ValueError, KeyError, TypeError):  # a .ckpt, or a file the loader reports
            return None
        prefix = clip_prefix(list(entries))
        parts = [(f"{k} {e.dtype} {list(e.shape)}", e.start, e.nbytes) for k, e in sorted(entries.items())
                 if k.startswith(prefix)]
        return BackgroundHash(self.source.checkpoint, self.hash_memo, compute=lambda p: parts_sha256(p, parts),
                              field=TEXT_DIGEST)

    def _checkpoint_bytes(self) -> int:
        """The checkpoint file's size (0 where it cannot be read: its readers report that)."""
        try:
            return self.source.checkpoint.stat().st_size
        except OSError:
            return 0

    def _open_store(self, dtype: torch.dtype) -> HostStore:
        return HostStore(self.source.checkpoint, self.cfg, dtype, pin=self._pin, folder=self._model_cache,
                         checkpoint=self._checkpoint, verify=self._verify, digest=self._digest)

    @property
    def dtype(self) -> torch.dtype:
        """The run dtype every model is built in (fp16 on a GPU, fp32 on the CPU)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        """Another run dtype, before any model is built (tests run fp16 on the CPU): the host store
        (and its pack, keyed by dtype) follows."""
        if value == getattr(self, "_dtype", None):
            return
        if getattr(self, "_modules", None):
            raise RuntimeError("the run dtype can change only before any model is built")
        self._dtype = value
        if getattr(self, "_store", None) is not None:
            first = self._store.first_pass
            if first is not None:  # its models are in the old dtype: dropped, the hash kept
                first.cancel()
                if self._hash is first:
                    self._hash = None
                    try:
                        self._sha256 = self._sha256 or first.result()
                    except BaseException:  # noqa: BLE001 - cancelled before the end: hashed again
                        pass
            self._store = self._open_store(value)
            if first is not None:
                self._start_loading()

    def _verify(self) -> None:
        """Fail now, with one line, if the file is unreadable, unsafe, another architecture or
        incomplete: every tensor of all three models is checked by name and shape, none is read."""
        ckpt = self._checkpoint()
        what = identify(ckpt)
        if what:
            raise CheckpointError(f"{ckpt.path}: this is {what}; sdterm runs Stable Diffusion v1")
        with torch.device("meta"):
            unet, vae = UNetModel(self.cfg.unet), VAEDecoder(self.cfg.vae)
        verify_module(unet, ckpt, UNET_PREFIX)
        verify_module(vae, ckpt, VAE_PREFIX)
        verify_text_encoder(self.cfg.text, ckpt)

    # ---- models ------------------------------------------------------------------------------

    def _checkpoint(self) -> Checkpoint:
        if self._ckpt is None:
            self._ckpt = open_checkpoint(self.source.checkpoint)
        return self._ckpt

    def _random(self, build: Callable[[], torch.nn.Module], offset: int) -> torch.nn.Module:
        """Random weights, reproducible per (seed, stage), without disturbing the global RNG.
        Offsets 0-2 are the text-to-image stages (seed * 3 + offset); the encoder's offset 3 draws
        from -(seed + 1) instead, which no other (seed, stage) uses."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_seed * 3 + offset if offset < 3 else -(self.random_seed + 1))
            return build().to(self.dtype).eval().requires_grad_(False)

    def _packable(self) -> tuple[str, ...]:
        """The models this process takes from the checkpoint (not a decoder from a VAE file)."""
        return tuple(s for s in PACKED if s != "vae" or self._vae is None)

    def _build_text(self) -> torch.nn.Module:
        if self.source.checkpoint is None:
            return self._random(lambda: build_text_encoder(self.cfg.text, torch.float32), 0)
        return self._store.build("text", self._packable())

    def _build_unet(self) -> torch.nn.Module:
        if self.source.checkpoint is None:
            return self._random(lambda: UNetModel(self.cfg.unet), 1)
        return self._store.build("unet", self._packable())

    def _build_vae(self) -> torch.nn.Module:
        if self._vae is not None:
            return self._vae.load(self.cfg.vae, self.dtype)
        if self.source.checkpoint is None:
            return self._random(lambda: VAEDecoder(self.cfg.vae), 2)
        return self._store.build("vae", self._packable())

    def _build_vae_encoder(self) -> torch.nn.Module:
        """From the external VAE file when it has ``encoder.*`` (A1111 loads the whole VAE), else
        from the checkpoint; CheckpointError (one line) when the checkpoint has none."""
        if self._vae is not None and self._vae.has_encoder:
            return self._vae.load_encoder(self.cfg.vae, self.dtype)
        if self.source.checkpoint is None:
            return self._random(lambda: VAEEncoder(self.cfg.vae), 3)
        self._store.ensure_verified()
        ckpt = self._checkpoint()
        if not any(k.startswith(VAE_PREFIX + "encoder.") for k in ckpt.keys()):
            raise CheckpointError(
                f"{ckpt.path}: has no VAE encoder ({VAE_PREFIX}encoder.*; a pruned file?), so it cannot "
                "encode an image; use a VAE file that has one (--vae)"
            )
        return self._store.build("vae_encoder", ())

    def built(self, stage: str) -> bool:
        """Whether the stage's model is in host memory already (``module`` returns at once)."""
        return stage in self._modules

    def from_cache(self, stage: str) -> bool:
        """Whether the stage's model, not built yet, will be read from the model cache (not converted)."""
        return stage not in self._modules and self._store is not None and self._store.from_pack(stage)

    def before_change(self, stage: str) -> None:
        """Before ``stage``'s weights change in place (a LoRA merge): its model-cache copy is written."""
        if self._store is not None:
            self._store.settle_writes(stage)

    def prefetch(self, stage: str) -> None:
        """Start building the stage's model on a thread (``module`` waits for it and raises what it
        raised), unless it is built or being built."""
        if stage not in self._modules and stage not in self._pending:
            self._pending[stage] = future = Future()
            threading.Thread(target=_fill, args=(future, self.factories[stage]), name="sdterm-prefetch",
                             daemon=True).start()

    def module(self, stage: str) -> torch.nn.Module:
        """The stage's model in host memory, built on first use (from the model cache, else from
        the checkpoint), or waited for where :meth:`prefetch` builds it."""
        if stage not in self._modules:
            pending = self._pending.get(stage)
            try:
                self._modules[stage] = pending.result() if pending is not None else self.factories[stage]()
            finally:
                self._pending.pop(stage, None)  # after a failure, the next use builds it again
            self._made.add(stage)
            if self._ckpt is not None and all(s in self._made for s in self.factories if s not in ON_DEMAND):
                self._ckpt.close()  # every text-to-image model is built: release the file mapping
                self._ckpt = None  # (an encoder asked for later opens the file again)
        return self._modules[stage]

    def drop(self, stage: str) -> None:
        """Let the model ``stage`` go: its host memory is freed once nothing holds it any more (its
        model-cache writes finish first); its next use builds it again."""
        self._modules.pop(stage, None)
        if self._store is not None:
            self._store.forget(stage)

    def set_vae(self, path: Path | None) -> None:
        """Decode with the VAE file ``path`` (None: the checkpoint's own VAE), verified first
        (CheckpointError, one line, nothing changed); the built decoder and encoder are dropped,
        so the next use builds them from the new file (the encoder from the checkpoint where the
        file has none). The other models stay as they are."""
        new = verify_vae_file(path, self.cfg.vae) if path is not None else None
        if self._store is not None:
            self._store.settle()  # not a decoder still being built from the checkpoint
        self._vae, self._vae_hash = new, None
        self.drop("vae")
        self.drop("vae_encoder")

    def unit_hosts(self, stage: str) -> list[torch.Tensor] | None:
        """The host buffers the stage's model was built into, per unit (None: the placement packs it)."""
        return self._store.hosts.get(stage) if self._store is not None and stage in self._modules else None

    @staticmethod
    def units(stage: str, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules of ``model`` that move to the device separately (the U-Net's layers)."""
        return stage_units(stage, model)

    @property
    def vae_name(self) -> str | None:
        """A1111's ``VAE``: the external VAE's file name with its extension; None for the checkpoint's own."""
        return self._vae.name if self._vae is not None else None

    @property
    def vae_path(self) -> Path | None:
        """The external VAE file in use; None for the checkpoint's own."""
        return self._vae.path if self._vae is not None else None

    @property
    def vae_hash(self) -> str | None:
        """A1111's ``VAE hash``: the external VAE file's sha256, first 10 hex digits (remembered
        like the model's); None for the checkpoint's own."""
        if self._vae is not None and self._vae_hash is None:
            self._vae_hash = self._vae.short_hash(self.hash_memo)
        return self._vae_hash if self._vae is not None else None

    @property
    def tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None:
            folder = self._tokenizer_dir
            if folder is None:
                if self.data_dir is None:
                    raise CheckpointError("no CLIP tokenizer found (set SDTERM_TOKENIZER to a folder with vocab.json and merges.txt)")
                folder = fetch_tokenizer(self.data_dir)
            # The token memo sits beside the hash memo (the user's cache folder; none in tests that give none).
            memo = self.hash_memo.parent / "prompt-tokens" if self.hash_memo is not None and self.token_memo else None
            self._tokenizer = PromptTokenizer(folder, self.cfg.text.max_positions, memo=memo)
        return self._tokenizer

    def _digest(self) -> str:
        """The checkpoint's sha256, waiting for the hashing thread if need be."""
        if self._sha256 is None:
            self._sha256 = self._hash.result() if self._hash is not None else "0" * 64
        return self._sha256

    @property
    def sha256(self) -> str:
        """The checkpoint's sha256: from the model cache or the hash memo, else computed on a
        thread since the model was opened (by the first pass over a large file, which builds the
        U-Net and VAE decoder from the same bytes); waited for now, the models not built yet in
        this process loaded meanwhile."""
        if self._hashing():
            big = self._checkpoint_bytes() >= PREFETCH_WHILE_HASHING
            # Never one built before (a model let go stays gone: the one-shot command's text
            # encoder, dropped after its stage, cost 235 MiB of peak RSS built again here).
            for stage in [s for s in self._packable() if s not in self._made] if big else ():
                if self._hash.done():
                    break
                self.module(stage)
        return self._digest()

    @property
    def encoder_id(self) -> str:
        """Identity of the text-encoder weights (the prompt cache's key): their own digest
        (remembered per path, size and mtime; a first start does not wait for the whole file's
        hash), the checkpoint's sha256 for a .ckpt, or the architecture and seed for random weights."""
        if self.source.checkpoint is None:
            return f"random:{self.cfg.text}:{self.random_seed}"
        if isinstance(self._text_digest, BackgroundHash):
            self._text_digest = self._text_digest.result()
        return f"text-sha256:{self._text_digest}" if self._text_digest else f"sha256:{self.sha256}"

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256."""
        return short_hash(self.sha256)

    def known_model_hash(self) -> str:
        """The model hash if known by now, else "" (never waits)."""
        return "" if self._hashing() else self.model_hash

    def _hashing(self) -> bool:
        """Whether the checkpoint's sha256 is still being computed."""
        return self._sha256 is None and self._hash is not None and not self._hash.done()

    # ---- planning ----------------------------------------------------------------------------

    def sizes(self) -> ModelSizes:
        """Bytes of each model and U-Net unit in the run dtype (from meta-device modules)."""
        with self._sizes_lock:
            if self._sizes is None:
                self._sizes = model_sizes(self.cfg, self.dtype)
            return self._sizes


def _fill(future: Future, build: Callable[[], torch.nn.Module]) -> None:
    try:
        future.set_result(build())
    except BaseException as exc:  # handed to the thread that asks for the model
        future.set_exception(exc)
