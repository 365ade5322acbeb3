"""The model cache: a checkpoint's models converted to the run dtype, stored in exactly the
placement's unit layout, so a later start reads them straight into their host buffers (no
parsing, no conversion, no hashing).

One file per (checkpoint path, architecture, dtype) in the cache folder, ``<key>.pack``::

    magic (8 bytes) | format (u32) | header offset (u64) | header length (u64) | header crc32 (u32)
    payload from byte 4096: each model's buffer, one after the other (4096-byte aligned)
    header (JSON) at the header offset, the payload's end; the file ends with it

The header holds the key (the checkpoint's identity: resolved path, size, mtime, ctime, inode,
device; the architecture; the dtype; the format), the checkpoint's sha256, and per model its
offset, its units' layout (each tensor's name, dtype, shape, offset) and a crc32 of every
``BLOCK`` bytes of each unit.

A pack is trusted only when all of this holds (STYLE.md: any read error is a miss): the header's
crc, the key equal to the checkpoint's current identity (a file changed in place, even with its
mtime put back, has a new ctime), the file's length equal to header + payload (a truncated file),
the layout equal to what the code builds now, and every block's crc, computed while reading.
Anything else: the pack is deleted and the model comes from the checkpoint (and is packed again).

Writing happens while a model is converted: each unit goes to a temporary file in the same folder
as soon as it is complete (a writer thread), the header last (after the payload) and the prefix,
then an atomic rename (a thread the process waits for before exiting). A write that fails is
dropped without a word.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ...fsutil import close_quietly, create_temp, open_for_reading, pread_full, remove_quietly
from .host_units import StageLayout
from .pack_format import (FORMAT, MAGIC, PAYLOAD, PREFIX, TEMP_PREFIX, PackError, align, blocks, evict, identity,
                          pack_path, read_header)
from .tensor_reader import byte_view

READ_THREADS = 8
WRITE_THREADS = 4


def architecture(cfg) -> str:
    return repr((cfg.unet, cfg.vae, cfg.text))


def pack_key(checkpoint: Path, cfg, dtype: torch.dtype) -> dict:
    return {"identity": identity(checkpoint), "architecture": architecture(cfg),
            "dtype": str(dtype).removeprefix("torch."), "format": FORMAT}


class Pack:
    """An open, verified-so-far pack; ``read_stage`` verifies each model's data as it reads it."""

    def __init__(self, path: Path, fd: int, header: dict, start: int):
        self.path, self.fd, self.header, self.start = path, fd, header, start
        self._ino = os.fstat(fd).st_ino

    @classmethod
    def open(cls, folder: Path, key: dict) -> Pack | None:
        """The pack for ``key`` if there is one that can be trusted so far; a broken or stale one
        is deleted. Never raises."""
        path = pack_path(folder, key)
        try:
            fd = open_for_reading(path)
        except OSError:
            return None
        try:
            header, start = read_header(fd)
            if header.get("key") != key:
                raise PackError("stale: the checkpoint or the architecture changed")
            pack = cls(path, fd, header, start)
        except (PackError, OSError):
            _discard(path, fd)
            return None
        try:
            os.utime(path)  # most recently used: eviction keeps it
        except OSError:
            pass
        return pack

    @property
    def sha256(self) -> str | None:
        digest = self.header.get("sha256")
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def has(self, stage: str) -> bool:
        return stage in self.header.get("models", {})

    def read_stage(self, stage: str, layout: StageLayout, buffer: torch.Tensor) -> None:
        """Read the model ``stage`` into ``buffer`` (its layout's), checking every block's crc in
        parallel threads; PackError on any mismatch or read error."""
        try:
            entry = self.header["models"][stage]
            stored = [{"nbytes": u["nbytes"], "slots": u["slots"]} for u in entry["units"]]
            if stored != _unit_layout(layout) or entry["nbytes"] != layout.total:
                raise PackError(f"{stage}: layout differs from this version's")
            jobs = []
            for host, unit, start in zip(layout.unit_hosts(buffer), entry["units"], layout.starts):
                for (at, n), crc in zip(blocks(unit["nbytes"]), unit["crc"]):
                    jobs.append((host[at : at + n], self.start + entry["offset"] + start + at, crc))
        except (KeyError, TypeError, ValueError):
            raise PackError(f"{stage}: header unreadable") from None

        def read(job) -> bool:
            view, offset, crc = job
            data = byte_view(view)
            pread_full(self.fd, data, offset)
            return zlib.crc32(data) == crc

        try:
            with ThreadPoolExecutor(min(READ_THREADS, os.cpu_count() or 1), thread_name_prefix="sdterm-pack") as pool:
                good = all(list(pool.map(read, jobs)))
        except OSError as exc:
            raise PackError(f"{stage}: {exc}") from None
        if not good:
            raise PackError(f"{stage}: checksum mismatch")

    def discard(self) -> None:
        """Delete the pack (it can't be trusted) unless it has already been replaced."""
        _discard(self.path, self.fd, self._ino)
        self.fd = -1

    def close(self) -> None:
        self.fd = close_quietly(self.fd)


def _discard(path: Path, fd: int, ino: int | None = None) -> None:
    try:
        ino = os.fstat(fd).st_ino if ino is None else ino
        if os.stat(path).st_ino == ino:  # not a fresh pack another process just put there
            os.unlink(path)
    except OSError:
        pass
    close_quietly(fd)


def _unit_layout(layout: StageLayout) -> list[dict]:
    """The layout as the header stores it (JSON round-trip: lists, not tuples), without crcs."""
    return json.loads(json.dumps(layout.describe()))


class PackWriter:
    """Writes a pack while its models are converted: ``unit_done`` queues a unit (crc + write on a
    writer thread); ``close_stage`` then waits for a model's units on a thread of its own and
    publishes the file once every model is in (``finish``: the header, then the rename), while the
    model is already in use; ``settle`` waits for a model's units before its weights may change
    in place (a LoRA merge).
    A model named in ``later`` is laid out when it is first built (``add``: the text encoder,
    which a render whose prompts are all cached never builds); the header goes after the payload,
    so it may grow.

    Never raises: the first failure drops the pack (and its temporary file)."""

    def __init__(self, folder: Path, key: dict, layouts: dict[str, StageLayout], *,
                 sha256: Callable[[], str | None], still: Callable[[], dict], later: tuple[str, ...] = ()):
        """``sha256()``: the checkpoint's (waited for on the publishing thread); ``still()``: the
        checkpoint's key now (the pack is dropped if it changed while it was packed)."""
        self.folder, self.key = folder, key
        self._sha256, self._still = sha256, still
        self.failed = False
        self.finished = False
        self.entries: dict[str, dict] = {}
        self.payload = 0
        self.starts: dict[str, list[int]] = {}
        self.pending: dict[str, list[Future]] = {}
        self.expected = set(layouts) | set(later)
        self.done: set[str] = set()
        self.start = PAYLOAD
        self._lock = threading.Lock()
        self._written: dict[str, threading.Event] = {}
        """Per model closed (``close_stage``): set once its units are written."""
        for stage, layout in layouts.items():
            self.add(stage, layout)
        self.temp = _Temp()
        self._cleanup = weakref.finalize(self, self.temp.drop)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.temp.fd, self.temp.path = create_temp(folder, TEMP_PREFIX, ".tmp")
        except OSError:
            self._fail()
        # Blocks are checksummed in parallel (zlib releases the GIL); the writes go to distinct offsets.
        self._writer = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="sdterm-pack-write")

    def add(self, stage: str, layout: StageLayout) -> None:
        """Lay out ``stage`` at the payload's end (once)."""
        with self._lock:
            if stage in self.entries:
                return
            units = _unit_layout(layout)
            for unit in units:
                unit["crc"] = [0] * len(blocks(unit["nbytes"]))  # a unit never written fails verification
            self.entries[stage] = {"offset": self.payload, "nbytes": layout.total, "units": units}
            self.payload += align(layout.total)
            self.starts[stage] = layout.starts
            self.pending[stage] = []
            self.expected.add(stage)

    def _header_json(self, sha256: str | None, stages) -> bytes:
        models = {s: e for s, e in self.entries.items() if s in stages}
        return json.dumps({"key": self.key, "sha256": sha256, "payload": self.payload, "models": models},
                          separators=(",", ":")).encode()

    def _fail(self) -> None:
        self.failed = True
        self.temp.drop()

    def unit_done(self, stage: str, index: int, host: torch.Tensor) -> None:
        """Unit ``index`` of ``stage`` is complete in ``host``: checksum and write it (queued)."""
        if self.failed or stage not in self.entries:
            return
        unit = self.entries[stage]["units"][index]
        offset = self.start + self.entries[stage]["offset"] + self.starts[stage][index]

        data = byte_view(host)
        crcs = unit["crc"] = [0] * len(blocks(unit["nbytes"]))

        def write(k: int, at: int, n: int) -> None:
            if self.failed:
                return
            block = data[at : at + n]
            crcs[k] = zlib.crc32(block)
            done = 0
            while done < n:
                done += os.pwrite(self.temp.fd, block[done:], offset + at + done)

        for k, (at, n) in enumerate(blocks(unit["nbytes"])):
            self.pending[stage].append(self._writer.submit(write, k, at, n))

    def close_stage(self, stage: str) -> None:
        """Every unit of ``stage`` is queued: on a thread, wait for their writes, then publish the
        pack if every model is in (that thread is named as the publishing one, ``finish``'s, and
        like it is waited for before the process exits)."""
        written = threading.Event()
        with self._lock:
            self._written[stage] = written
        threading.Thread(target=self._close, args=(stage, written), name="sdterm-pack-publish", daemon=False).start()

    def _close(self, stage: str, written: threading.Event) -> None:
        try:
            self.stage_done(stage)
        finally:
            written.set()
        if self.complete():
            self.finish()

    def settle(self, stage: str) -> None:
        """Wait until ``stage``'s units are written (not for the publishing, which waits for the
        checkpoint's sha256)."""
        with self._lock:
            written = self._written.get(stage)
        if written is not None:
            written.wait()

    def stage_done(self, stage: str) -> None:
        """Wait until every unit of ``stage`` is written (or the pack has failed)."""
        for job in self.pending.get(stage, []):
            try:
                job.result()
            except (OSError, ValueError, RuntimeError):
                self._fail()
        self.pending[stage] = []
        if stage in self.entries:
            self.done.add(stage)

    def complete(self) -> bool:
        return self.expected <= self.done

    def abandon(self) -> None:
        """Drop the pack (a model could not be read)."""
        self._fail()
        self._writer.shutdown(wait=False)

    def finish(self) -> threading.Thread | None:
        """Publish the pack with the models written so far, on a thread the process waits for
        before exiting: the header (with the sha256, waited for there) after the payload, the
        prefix, and an atomic rename, unless the checkpoint changed meanwhile. The payload and the
        header are checksummed: a file torn by a crash before its data reached the disk fails
        verification."""
        with self._lock:  # the last two models may be done on two threads at once: one publishes
            if self.failed or self.finished or not self.done:
                return None
            self.finished = True
            stages = set(self.done)

        def publish() -> None:
            try:
                header = self._header_json(self._sha256(), stages)
                if self._still() != self.key:
                    raise OSError("the checkpoint changed while it was packed")
                at = self.start + self.payload
                done = 0
                while done < len(header):
                    done += os.pwrite(self.temp.fd, header[done:], at + done)
                os.ftruncate(self.temp.fd, at + len(header))
                os.pwrite(self.temp.fd, PREFIX.pack(MAGIC, FORMAT, at, len(header), zlib.crc32(header)), 0)
                self.temp.close()
                os.replace(self.temp.path, pack_path(self.folder, self.key))
                self.temp.path = None  # published: nothing to clean up
                evict(self.folder)
            except Exception:  # noqa: BLE001 - a pack that can't be written is simply not there
                self._fail()
            finally:
                self._writer.shutdown(wait=False)

        thread = threading.Thread(target=publish, name="sdterm-pack-publish", daemon=False)
        thread.start()
        return thread


class _Temp:
    """The pack being written: its descriptor and temporary file, closed and removed at most once
    (on failure, or when the writer is dropped unfinished, at the latest when the process exits)."""

    def __init__(self):
        self.fd = -1
        self.path: Path | None = None
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.fd = close_quietly(self.fd)

    def drop(self) -> None:
        self.close()
        with self.lock:
            if self.path is not None:
                remove_quietly(self.path)
                self.path = None
