"""The thread a one-shot command renders on, started before the engine is asked for its first
render, so that what a GPU keeps per thread is ready by then.

cuDNN keeps the plans it builds for attention and convolutions per thread (torch's caches of them
are thread-local): a render's first U-Net call on a thread builds them again, whatever other
threads did. A command that renders on the thread that starts the process (``sdterm generate``)
could only build them once its own preparation was done (opening the model, the prompts, the
plan), on the path to its image. On a thread of its own the first job, made while the command
still prepares, builds them (:meth:`~sdterm.engine.pipeline.Engine.warm_for`), and the render
then runs there.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable


WAKE_SECONDS = 0.2
"""How often a caller waiting for a job looks at its signals: an interrupt that arrives just before
its wait begins wakes no blocked wait, and would otherwise be seen only at the job's end."""


class RenderThread:
    """One daemon thread running the jobs given to it, in order."""

    def __init__(self, name: str = "sdterm-render"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._unread: list[Future] = []
        """Jobs :meth:`submit` queued whose outcome nobody has read yet (see :meth:`call`)."""
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)`` without waiting for it; its future. What it raises is
        raised by the next :meth:`call` (a failure is never dropped unseen)."""
        future = self._queue(fn, args, kwargs)
        self._unread.append(future)
        return future

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on the thread, after the jobs queued before it, and wait
        for it: its result, or its exception raised here; before that, the exception of a job
        :meth:`submit` queued before it, if one failed. An interrupt (Ctrl+C) while waiting goes
        on at once; the job is left to end with the process."""
        future = self._queue(fn, args, kwargs)
        while True:  # a bounded wait: a Ctrl+C that lands just before a wait starts is seen at once
            try:
                result = future.result(timeout=WAKE_SECONDS)
                break
            except FutureTimeout:
                continue
        earlier, self._unread = self._unread, []
        for job in earlier:
            if job.done() and job.exception() is not None:
                raise job.exception()
        return result

    def _queue(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Future:
        if threading.current_thread() is self._thread:
            raise RuntimeError("RenderThread: a job cannot wait for a job of its own thread")
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)


__all__ = ["RenderThread"]
