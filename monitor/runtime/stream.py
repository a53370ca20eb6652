"""Streaming under policy: never hand a caller a token that a block would remove.

``generate`` hands each new token to a streamer right after sampling it, one forward pass
before that token's own activations are evaluated. Both streaming paths here therefore hold
tokens back and release them only up to the request's published :class:`Release`:

* :class:`HoldingStreamer` wraps a caller's own ``streamer=`` (``TextIteratorStreamer`` or any
  ``BaseStreamer``) for ``Monitor.generate`` and pipelines; after the call it releases the rest
  (or the rule's message, on a block) and ends the caller's streamer.
* :func:`stream_text` is ``Monitor.stream``: text chunks from a worker thread, the same rule.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from monitor.report import Report
from monitor.runtime.hf_request import HFRequest
from monitor.runtime.outputs import block_text


class HoldingStreamer:
    """A ``BaseStreamer`` in front of the caller's: tokens reach ``inner`` only once released."""

    def __init__(self, inner: Any, request: HFRequest) -> None:
        self.inner = inner
        self.request = request
        self.prompt_seen = False
        self.generated: list[int] = []
        self.sent = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt: pass it through
            self.prompt_seen = True
            self.inner.put(value)
            return
        self.generated.extend(int(v) for v in value.reshape(-1))
        self._release(self.request.release.limit)

    def end(self) -> None:
        """Called by ``generate`` before the last token is evaluated: wait for :meth:`close`."""

    def _release(self, limit: int | None) -> None:
        upto = len(self.generated) if limit is None else min(limit, len(self.generated))
        if upto > self.sent:
            self.inner.put(torch.tensor(self.generated[self.sent:upto]))
            self.sent = upto

    def close(self, report: Report, encode: Callable[[str], list[int]], *, with_message: bool = True) -> None:
        """The call is over (its last token evaluated): release the rest unless the request
        was refused; on a block release up to the cut and then the rule's message; end."""
        if 0 in report.blocks:
            self._release(self.request.release.limit)
            if with_message:
                text = block_text(report.blocks[0].message, after_text=self.sent > 0)
                self.inner.put(torch.tensor(encode(text)))
        elif not self.request.session.refused:
            self._release(None)
        self.inner.end()


class QueueStreamer:
    """Collects generated token ids (not the prompt) into a queue for :func:`stream_text`."""

    def __init__(self, events: queue.Queue) -> None:
        self.events = events
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1):
            self.events.put(("token", int(token)))

    def end(self) -> None:
        pass


def stream_text(request: HFRequest, run: Callable[[QueueStreamer], None], finish: Callable[[], Report],
                decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Run ``run(streamer)`` (the whole monitored generation) in a worker thread and yield the
    response text as it becomes safe; then ``finish()`` (which may raise) and, on a block, the
    rule's message."""
    import contextvars

    events: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            run(QueueStreamer(events))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
        finally:
            events.put(("done", None))

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
    worker.start()
    generated: list[int] = []
    released = ""

    def chunk(limit: int | None, final: bool = False) -> str:
        nonlocal released
        count = len(generated) if limit is None else min(limit, len(generated))
        text = decode(generated[:count])
        if not final and "\ufffd" in text[len(released):]:  # maybe an unfinished character
            return ""
        piece, released = text[len(released):], text
        return piece

    while True:
        kind, value = events.get()
        if kind == "done":
            break
        generated.append(value)
        piece = chunk(request.release.limit)
        if piece:
            yield piece
    worker.join()
    if failure:
        raise failure[0]
    report = finish()
    release = request.release
    piece = chunk(release.limit, final=not report.blocks)
    if piece:
        yield piece
    if report.blocks:
        yield block_text(report.blocks[0].message, after_text=bool(released))
