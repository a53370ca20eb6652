"""Teacher-forced scanning of finished transcripts, batched.

A transcript is split into prompt and response tokens the way a live call would see them
(:func:`scan_token_ids`). Many transcripts are scanned together: sorted by length into
buckets, right-padded (so every real token keeps its position and, under the causal mask, its
activations), run through the model only up to the deepest layer the policy reads (the SAE's,
or a catalog probe's own ``layer``: one temporary hook per such layer, acting only for this
thread's scan), encoded in one call per batch, and then each transcript's session steps the
policy over its own prompt and response spans.
Per-item results equal scanning one at a time up to float rounding of batched matmuls.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from monitor.data import token_ids
from monitor.errors import MonitorError, MonitorUnavailable, UnsupportedModelError
from monitor.runtime.hf_request import CURRENT

if TYPE_CHECKING:
    from monitor.report import Report
    from monitor.runtime.hf import Monitor

Messages = Sequence[Mapping[str, str]]

DTYPES = ("float32", "bfloat16")  # forward precision of a scan; float32 is the live monitor's


class DtypeError(MonitorError):
    """A forward precision (``--dtype``, ``Monitor.scan_many(dtype=)``, ``BacktestConfig.dtype``)
    that is not one of :data:`DTYPES`."""


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`DTYPES`, else a :class:`DtypeError` naming the option."""
    if dtype not in DTYPES:
        raise DtypeError(f"--dtype (scan_many(dtype=), BacktestConfig.dtype) must be one of {', '.join(DTYPES)}, "
                         f"not {dtype!r}: float32 matches Monitor.scan exactly, bfloat16 runs the forward "
                         "under autocast")
    return dtype


def forward_precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a teacher-forced forward runs in: nothing for float32, ``torch.autocast`` to
    bfloat16 on ``device``'s type for bfloat16 (matmuls in bfloat16, the model's weights stay as
    loaded; 2-3x faster on CPUs with native bfloat16 and on GPUs). Activations then differ from
    float32 by bfloat16 rounding (about 1e-2 relative), so a token near a threshold can flip."""
    if check_dtype(dtype) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class ScanItem:
    """A transcript to scan: ``text`` (a string, or chat ``messages`` whose last assistant turn
    is the response) and, for a string, an optional ``prompt`` that precedes it."""

    text: str | Messages
    prompt: str | None = None


Scannable = Union[str, Messages, ScanItem]


def as_scan_item(item: Scannable) -> ScanItem:
    return item if isinstance(item, ScanItem) else ScanItem(item)


def scan_token_ids(tokenizer: Any, item: ScanItem) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of a transcript.

    ``messages``: the last assistant turn is the response, everything before it (with the
    generation prompt) the prompt; without a final assistant turn all of it is prompt. A plain
    string is all response, unless ``prompt`` is given (prompt + text).
    """
    text, prompt = item.text, item.prompt
    if isinstance(text, str):
        prompt_ids = token_ids(tokenizer(prompt, add_special_tokens=True)) if prompt else []
        return prompt_ids, token_ids(tokenizer(text, add_special_tokens=not prompt))
    messages = [dict(m) for m in text]
    if messages and messages[-1].get("role") == "assistant":
        prompt_ids = token_ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
        full = token_ids(tokenizer.apply_chat_template(messages, tokenize=True))
        return prompt_ids, full[len(prompt_ids):]
    return token_ids(tokenizer.apply_chat_template(messages, tokenize=True)), []


def monitor_mask(ids: torch.Tensor, lengths: torch.Tensor, special_ids: torch.Tensor,
                 include_special_tokens: bool) -> torch.Tensor:
    """Positions of right-padded ``ids[B, T]`` to monitor: real (within ``lengths``), and,
    unless ``include_special_tokens``, neither a special token nor position 0 (the sink)."""
    cols = torch.arange(ids.shape[1])
    mask = cols[None, :] < lengths[:, None]
    if not include_special_tokens:
        mask &= ~torch.isin(ids, special_ids)
        mask[:, 0] = False
    return mask


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so a memory problem
    shows at once), at most ``batch_size`` items and, if given, ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= batch_size or (max_tokens and width * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids[B, T]`` and the attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention[row, : len(seq)] = 1
    return ids, attention


class ScanComplete(Exception):
    """Raised by :class:`ScanCapture` to stop the forward once every layer it needs has run."""


class ScanCapture:
    """The current request of a scanning thread: takes the residual at the monitor's hook (and
    at ``extra_layers``) and stops the forward once all are captured. It goes through the
    monitor's own hook and the thread's context variable, so a ``generate`` running in another
    thread on the same model is untouched (the extra layers' temporary hooks do nothing for it)."""

    def __init__(self, owner: object, extra_layers: Sequence[int] = ()) -> None:
        self.owner = owner
        self.current_ids: torch.Tensor | None = None
        self.resid: torch.Tensor | None = None
        self.wanted = tuple(extra_layers)
        self.extra: dict[int, torch.Tensor] = {}

    def on_residual(self, resid: torch.Tensor) -> None:
        self.resid = resid
        self._stop_when_done()

    def on_layer(self, layer: int, resid: torch.Tensor) -> None:
        self.extra[layer] = resid
        self._stop_when_done()

    def _stop_when_done(self) -> None:
        if self.resid is not None and len(self.extra) == len(self.wanted):
            raise ScanComplete


def read_residual(monitor: Monitor, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """The residual ``[B, T, d]`` at the monitor's hook point for a teacher-forced batch."""
    return read_residuals(monitor, ids, attention)[0]


def read_residuals(monitor: Monitor, ids: torch.Tensor, attention: torch.Tensor,
                   extra_layers: Sequence[int] = (), dtype: str = "float32"
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The residual at the monitor's hook point and at each of ``extra_layers`` (resid_post of
    that block), for a teacher-forced batch; the forward stops after the deepest of them and
    runs at ``dtype`` (:func:`forward_precision`); the residuals come back in float32."""
    from monitor.capture import HookPoint, residual_hook

    capture = ScanCapture(monitor, extra_layers)
    token = CURRENT.set(capture)  # type: ignore[arg-type]
    # Without padding no mask is needed, and the model keeps its fast causal attention path
    # (an explicit mask makes CPU attention materialise [B, heads, T, T]).
    mask = None if bool(attention.all()) else attention

    def hook_for(layer: int) -> Callable[[torch.Tensor], None]:
        def on(resid: torch.Tensor) -> None:
            if CURRENT.get() is capture:  # another thread's forward: not ours
                capture.on_layer(layer, resid)
        return on
    try:
        with contextlib.ExitStack() as hooks, torch.no_grad():
            for layer in extra_layers:
                hooks.enter_context(residual_hook(monitor.model, HookPoint(layer), hook_for(layer)))
            hooks.enter_context(forward_precision(dtype, next(monitor.model.parameters()).device))
            monitor.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except ScanComplete:
        pass
    finally:
        CURRENT.reset(token)
    if capture.resid is None:
        raise UnsupportedModelError(
            f"the monitor's hook at {monitor.point.name} never ran during the scan's forward pass")
    missing = [layer for layer in extra_layers if layer not in capture.extra]
    if missing:
        raise UnsupportedModelError(f"the scan's forward pass never reached layer(s) {missing} that "
                                    "the policy's probes read; check the catalog's 'layer' values")
    return capture.resid.float(), {layer: x.float() for layer, x in capture.extra.items()}


def scan_transcripts(monitor: Monitor, items: Sequence[Scannable], *, batch_size: int = 16,
                     max_batch_tokens: int = 1024, progress: Callable[[int], Any] | None = None,
                     refuse: bool = False, dtype: str = "float32") -> list[Report]:
    """``Monitor.scan_many``: see there. One session per transcript on one policy snapshot;
    per batch one forward (stopped after the deepest layer the policy reads) and one encode."""
    check_dtype(dtype)
    policy = monitor.policy
    tokenizer = monitor.tokenizer
    parsed = [scan_token_ids(tokenizer, as_scan_item(item)) for item in items]
    lengths = [len(p) + len(r) for p, r in parsed]
    reports: list[Report | None] = [None] * len(parsed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for batch in length_buckets(lengths, batch_size, max_batch_tokens):
        started = time.perf_counter()
        sessions = {i: monitor.new_session(1, policy, scope_means=True) for i in batch}
        real = [i for i in batch if lengths[i] > 0]
        if real:
            encoder = sessions[real[0]].encoder
            ids, attention = pad_batch([parsed[i][0] + parsed[i][1] for i in real], pad)
            resid, extra = read_residuals(monitor, ids, attention, encoder.extra_layers, dtype)
            encoding = time.perf_counter()
            feats = encoder.encode(resid, extra)
            mask = monitor_mask(ids, attention.sum(1), monitor.special_ids, monitor.include_special_tokens)
            mask &= encoder.content_mask(resid).cpu()
            share = (time.perf_counter() - encoding) / len(real)
            for row, i in enumerate(real):
                stepping = time.perf_counter()
                split, end = len(parsed[i][0]), lengths[i]
                for scope, lo, hi in (("prompt", 0, split), ("response", split, end)):
                    if hi > lo:
                        sessions[i].observe_features(feats[row:row + 1, lo:hi], scope,  # type: ignore[arg-type]
                                                     mask[row:row + 1, lo:hi])
                sessions[i].report.monitor_seconds += share + time.perf_counter() - stepping
        for i in batch:
            try:
                reports[i] = monitor.deliver(sessions[i], started, raise_blocks=False)
            except MonitorUnavailable as exc:
                if refuse:
                    raise
                reports[i] = exc.report
        if progress is not None:
            progress(len(batch))
    return [r for r in reports if r is not None]
