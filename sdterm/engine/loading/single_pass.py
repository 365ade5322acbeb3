"""A checkpoint's first use in one pass over the file: every byte is read once, in file order, and
hashed (sha256, A1111's model hash) as it goes by, while the tensors of the models asked for are
converted from the bytes just read straight into their places in the models' host buffers (and
each unit, once complete, handed to the pack writer).

The file is cut into spans of about ``SPAN`` bytes (whole tensors, or whole rows of a large one:
a row is a slice along the first dimension, so a channels-last destination takes it as it is).
``WORKERS`` threads read and convert spans; one thread hashes them in order and hands their
buffers back: at most ``BUFFERS`` spans are in memory at once, the only memory the pass adds to
the models' own. Reads, conversions and sha256 release the GIL, so the pass runs beside the
start-up's imports on the main thread.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...fsutil import close_quietly, open_for_reading, pread_full
from .file_hash import remember_if_unchanged
from .tensor_reader import Entry

SPAN = 16 << 20
WORKERS = 3
BUFFERS = WORKERS + 2
NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
"""Source dtypes viewed through numpy (no GIL handed over: see ``_convert``)."""


@dataclass
class Span:
    start: int
    end: int
    pieces: list[tuple[str, int, int, int]] = field(default_factory=list)
    """(key, first row, end row, offset of the rows in the span)."""


def _rows(entry: Entry) -> int:
    return entry.shape[0] if entry.shape else 1


def plan_spans(entries: dict[str, Entry], size: int, wanted, span: int | None = None) -> list[Span]:
    """Contiguous spans covering the whole file (``size`` bytes, header included); the pieces of
    the tensors named in ``wanted`` they hold."""
    span = span or SPAN
    spans: list[Span] = []
    cur = Span(0, 0)

    def close(end: int) -> Span:
        nonlocal cur
        cur.end = end
        spans.append(cur)
        cur = Span(end, end)
        return cur

    for key, e in sorted(entries.items(), key=lambda kv: kv[1].start):
        keep = key in wanted
        if e.start + e.nbytes - cur.start <= span or e.nbytes == 0:
            if keep:
                cur.pieces.append((key, 0, _rows(e), e.start - cur.start))
            continue
        if e.start > cur.start:
            close(e.start)
        if e.nbytes <= span:
            if keep:
                cur.pieces.append((key, 0, _rows(e), 0))
            continue
        rows = _rows(e) if keep else e.nbytes  # a tensor only hashed: cut anywhere
        row = e.nbytes // max(rows, 1)
        per = max(1, span // row)
        for first in range(0, rows, per):
            last = min(rows, first + per)
            if keep:
                cur.pieces.append((key, first, last, 0))
            close(e.start + last * row)
    if size > cur.start or not spans:
        close(size)
    return spans


class SinglePass:
    """Runs the pass on a thread of its own as soon as it is made.

    ``targets``: checkpoint key -> (stage, unit index, destination tensor). ``units``: per
    (stage, unit index), the unit's host slice (``on_unit(stage, index, host)`` once all its
    tensors are in). ``on_stage(stage)`` runs (on a thread of its own) once a stage is complete;
    ``model(stage)`` waits for what it returned. ``result()`` waits for the sha256 (None when not
    asked for), recorded in ``memo`` (the hash memo) when the file did not change meanwhile.
    ``on_error(exc)`` runs once if the pass fails (a read error: every stage not complete and
    the digest raise it)."""

    def __init__(self, path: Path, entries: dict[str, Entry], targets: dict[str, tuple[str, int, torch.Tensor]],
                 units: dict[tuple[str, int], torch.Tensor], *, sha256: bool, memo: Path | None = None,
                 on_unit: Callable[[str, int, torch.Tensor], None] | None,
                 on_stage: Callable[[str], object], on_error: Callable[[BaseException], None]):
        self.path, self.memo = Path(path), memo
        self.entries, self.targets, self.units = entries, targets, units
        self._on_unit, self._on_stage, self._on_error = on_unit, on_stage, on_error
        self._hash = hashlib.sha256() if sha256 else None
        self._lock = threading.Lock()
        self._rows_left: dict[tuple[str, int], int] = {u: 0 for u in units}
        for key, (stage, index, _) in targets.items():
            self._rows_left[(stage, index)] += _rows(entries[key])
        self._units_left: dict[str, int] = {}
        for stage, _ in units:
            self._units_left[stage] = self._units_left.get(stage, 0) + 1
        self.stages: dict[str, Future] = {stage: Future() for stage in self._units_left}
        self._digest: Future = Future()
        self._stop = threading.Event()
        # Every tensor op of the pass runs here or on executor threads (which the interpreter
        # joins at exit): the pass's own thread is a daemon (a process that never needs the
        # models does not wait for it) and a daemon must not be inside torch when the process
        # ends (taking the GIL back there aborts it).
        self._before = os.stat(self.path)
        self._spans = plan_spans(entries, self._before.st_size, targets)
        self._jobs = [self._pieces(span) for span in self._spans]
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="sdterm-first-stage")
        for stage, index in [u for u, rows in self._rows_left.items() if rows == 0]:
            self._rows_done(stage, index, 0)  # a unit with nothing to read
        self._thread = threading.Thread(target=self._run, name="sdterm-first-pass", daemon=True)
        self._thread.start()

    # ---- what the caller waits for -----------------------------------------------------------

    def model(self, stage: str):
        """What ``on_stage(stage)`` returned, waited for; the pass's error if it failed."""
        return self.stages[stage].result()

    def release(self, stage: str) -> None:
        """Keep no reference to the model built for ``stage`` (its user let it go); a stage not
        complete yet is left as it is."""
        future = self.stages.get(stage)
        if future is not None and future.done() and not future.cancelled() and future.exception() is None:
            self.stages[stage] = kept = Future()
            kept.set_result(None)

    def result(self) -> str | None:
        """The sha256, waited for (``BackgroundHash``'s interface)."""
        return self._digest.result()

    def wait(self) -> None:
        """Until every stage is complete or failed."""
        for future in self.stages.values():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - whoever asks for the stage sees it
                pass

    def done(self) -> bool:
        """Whether the hash is known (or failed): ``BackgroundHash``'s interface."""
        return self._digest.done()

    def cancel(self) -> None:
        """Stop reading (the stages not complete fail); waits for the pass to end."""
        self._stop.set()
        self._thread.join()

    # ---- the pass ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            fd = open_for_reading(self.path)
        except OSError as exc:
            return self._fail(exc)
        try:
            if os.fstat(fd).st_size != self._before.st_size:
                raise ValueError("the file changed size")
            error = self._stream(fd, self._spans, self._jobs)
            if error is None and self._stop.is_set():
                error = RuntimeError("cancelled")
            if error is None and any(self._units_left.values()):  # never left waiting forever
                error = ValueError("the pass did not cover every tensor")
            if error is not None:
                return self._fail(error)
            digest = self._hash.hexdigest() if self._hash is not None else None
            if digest is not None:
                remember_if_unchanged(self.path, self._before, digest, self.memo)
            close_quietly(fd)
            fd = -1
            self._digest.set_result(digest)  # not held back by a stage still being finished
            self._finisher.shutdown(wait=True)  # every stage done: nothing left on other threads
            # No view of the models' buffers is kept past the pass (a model dropped later is freed).
            self.targets, self.units, self._jobs, self._on_stage = {}, {}, [], None
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self._fail(exc)
        finally:
            close_quietly(fd)

    def _stream(self, fd: int, spans: list[Span], jobs: list[list[tuple]]) -> BaseException | None:
        size = max(s.end - s.start for s in spans)
        pool = np.empty((BUFFERS, max(size, 1)), dtype=np.uint8)
        free: queue.Queue = queue.Queue()
        for i in range(BUFFERS):
            free.put(i)
        order: queue.Queue = queue.Queue()
        errors: list[BaseException] = []

        def hashing() -> None:
            while (item := order.get()) is not None:
                job, span, b = item
                try:
                    job.result()
                    if self._hash is not None and not errors:
                        self._hash.update(memoryview(pool[b, : span.end - span.start]))
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)
                free.put(b)

        hasher = threading.Thread(target=hashing, name="sdterm-first-hash", daemon=True)
        hasher.start()
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="sdterm-first-read") as workers:
            for span, job in zip(spans, jobs):
                b = free.get()
                if errors or self._stop.is_set():
                    free.put(b)
                    break
                order.put((workers.submit(self._convert, fd, span, job, pool[b]), span, b))
            order.put(None)
            hasher.join()
        return errors[0] if errors else None

    def _pieces(self, span: Span) -> list[tuple]:
        """Per piece of ``span``: its destination rows, source dtype and shape, where it lies in the
        span, and its unit (made before the pass: no tensor op is left for the workers but one)."""
        out = []
        for key, first, last, at in span.pieces:
            entry = self.entries[key]
            stage, index, dst = self.targets[key]
            n = (last - first) * (entry.nbytes // max(_rows(entry), 1))
            shape = (last - first, *entry.shape[1:]) if entry.shape else ()
            out.append((dst[first:last] if entry.shape else dst, entry.dtype, shape, at, n, stage, index, last - first))
        return out

    def _convert(self, fd: int, span: Span, pieces: list[tuple], buf: np.ndarray) -> None:
        """Read ``span`` into ``buf`` and convert its pieces. Sources are numpy views of the bytes
        and all copies go in one call: a worker hands the GIL over a few times a span (each time
        it takes it back it may wait up to the switch interval while the main thread imports)."""
        data = buf[: span.end - span.start]
        pread_full(fd, memoryview(data), span.start)
        dsts, srcs = [], []
        for dst, dtype, shape, at, n, _stage, _index, _rows_in in pieces:
            raw = data[at : at + n]
            kind = NUMPY.get(dtype)
            if kind is None or raw.ctypes.data % np.dtype(kind).itemsize:
                src = torch.from_numpy(raw.copy()).view(dtype).view(shape)  # bf16, or an odd offset: rare
            else:
                src = torch.from_numpy(raw.view(kind).reshape(shape))
            dsts.append(dst)
            srcs.append(src)
        if dsts:
            copy_all(dsts, srcs)
        for _dst, _dtype, _shape, _at, _n, stage, index, rows in pieces:
            if rows:
                self._rows_done(stage, index, rows)

    def _rows_done(self, stage: str, index: int, rows: int) -> None:
        with self._lock:
            self._rows_left[(stage, index)] -= rows
            unit_complete = self._rows_left[(stage, index)] == 0
            if unit_complete:
                self._units_left[stage] -= 1
            stage_complete = unit_complete and self._units_left[stage] == 0
        if unit_complete and self._on_unit is not None:
            self._on_unit(stage, index, self.units[(stage, index)])
        if stage_complete:
            self._finisher.submit(self._finish_stage, stage)

    def _finish_stage(self, stage: str) -> None:
        future = self.stages[stage]
        try:
            result = self._on_stage(stage)
        except BaseException as exc:  # noqa: BLE001
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(result)

    def _fail(self, exc: BaseException) -> None:
        try:
            self._on_error(exc)
        finally:
            for future in [*self.stages.values(), self._digest]:
                if not future.done():
                    future.set_exception(exc)


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for each pair (converting), in one call where torch has it."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None:
        try:
            foreach(dsts, srcs)
            return
        except (RuntimeError, TypeError):  # a torch whose foreach copy does not convert: one by one
            pass
    for dst, src in zip(dsts, srcs):
        dst.copy_(src)
