"""Per-call state of the transformers adapter: positions, masks, KV-cache replay, release.

A forward hook on the SAE's block hands the residual ``[B, T, d]`` of the new positions to the
call's :class:`HFRequest` (found through a context variable, so concurrent calls from several
threads never mix). The request works out which positions are new (prefill, then one per
decode step; without a KV cache old positions are recomputed and get their recorded steering
edits replayed), builds the mask of positions to monitor and feeds the :class:`Session`.

Release: streams may hand a token to a caller only once its own forward pass has been
evaluated and no block precedes it. After each step's decisions are final the request
publishes one immutable :class:`Release` (evaluated response tokens, block position, failed
open), so a reader in another thread never sees a count that includes a firing token before
the block that cuts it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from monitor.errors import MonitorError
from monitor.runtime.threads import one_host_thread

if TYPE_CHECKING:
    from monitor.policy import SteerDirective
    from monitor.runtime.encoder import FeatureEncoder
    from monitor.runtime.session import Session


@dataclass(frozen=True)
class Release:
    """What a stream of row 0 may release: ``limit`` response tokens (None: everything, the
    request failed open), ``blocked`` when a block ends the row at ``limit``."""

    limit: int | None
    blocked: bool = False


CURRENT: contextvars.ContextVar[HFRequest | None] = contextvars.ContextVar("sae_monitor_request", default=None)


class HFRequest:
    """See the module docstring. ``owner`` identifies the monitor whose hooks serve this
    request (compared by identity, never called)."""

    def __init__(self, session: Session, encoder: FeatureEncoder, *, owner: object,
                 special_ids: torch.Tensor, include_special_tokens: bool,
                 attention_mask: torch.Tensor | None, scan_prompt_len: int | None = None) -> None:
        deeper = [layer for layer in encoder.extra_layers if layer > encoder.sae_layer]
        if deeper:
            raise MonitorError(f"this policy reads probes at layer(s) {deeper}, after the SAE's layer "
                               f"{encoder.sae_layer}; live generation decides (and steers) at the SAE's layer, "
                               "so it can read earlier layers only. Use scan / scan_many / sae-monitor eval "
                               "for such probes, or refit them at or before the SAE's layer")
        self.extra_resid: dict[int, torch.Tensor] = {}
        self.session = session
        self.encoder = encoder
        self.owner = owner
        self.special_ids = special_ids
        self.include_special_tokens = include_special_tokens
        self.attention_mask = attention_mask
        self.scan_prompt_len = scan_prompt_len
        self.rows = session.rows
        self.positions_done = 0
        self.prefill_done = False
        self.current_ids: torch.Tensor | None = None
        self.position_edits: dict[int, Sequence[SteerDirective]] = {}
        self.release = Release(0)
        first = attention_mask.long().argmax(dim=1) if attention_mask is not None else None
        self.first_real = first if first is not None else torch.zeros(self.rows, dtype=torch.long)
        self.last_first_real = int(self.first_real.max()) if self.rows else 0

    # ------------------------------------------------------------------ the hooks
    def layer_hooks(self, model: torch.nn.Module) -> contextlib.ExitStack:
        """Hooks on the earlier layers this policy's probes read (none for most policies), for
        the duration of a ``with``: each keeps that layer's residual of this request's current
        forward (a forward of another thread or request is left alone)."""
        from monitor.capture import HookPoint, residual_hook

        stack = contextlib.ExitStack()
        for layer in self.encoder.extra_layers:
            def keep(resid: torch.Tensor, layer: int = layer) -> None:
                if CURRENT.get() is self:
                    self.extra_resid[layer] = resid
            stack.enter_context(residual_hook(model, HookPoint(layer), keep))
        return stack

    def on_residual(self, resid: torch.Tensor) -> None:
        session = self.session
        if session.disabled or session.refused:
            self._publish()
            return
        started = time.perf_counter()
        with one_host_thread(resid.device):
            self._on_new_rows(resid)
        session.report.monitor_seconds += time.perf_counter() - started

    def _on_new_rows(self, resid: torch.Tensor) -> None:
        session = self.session
        T = resid.shape[1]
        start, new = (0, T) if not self.prefill_done else (self.positions_done + 1 - T, 1)
        old = T - new
        try:
            if old > 0:  # no KV cache: positions recomputed, replay their recorded edits
                self._replay(resid, start, old)
            new_resid = resid[:, old:]
            new_extra = {layer: r[:, old:] for layer, r in self.extra_resid.items()}
            ids = self.current_ids[:, -new:] if self.current_ids is not None else None
            if not self.prefill_done and self.scan_prompt_len is not None:
                self._observe(new_resid, ids, start, "prompt", upto=self.scan_prompt_len, new_extra=new_extra)
                self._observe(new_resid, ids, start, "response", frm=self.scan_prompt_len, new_extra=new_extra)
            else:
                self._observe(new_resid, ids, start + old, "prompt" if not self.prefill_done else "response",
                              new_extra=new_extra)
        except Exception as exc:  # noqa: BLE001 - faults outside the session: same on_error
            session.fail(exc)
        finally:
            self.prefill_done = True
            self.positions_done = start + T
            self._publish()

    def _observe(self, resid: torch.Tensor, ids: torch.Tensor | None, start: int, scope: str,
                 upto: int | None = None, frm: int = 0,
                 new_extra: dict[int, torch.Tensor] | None = None) -> None:
        hi = upto if upto is not None else resid.shape[1]
        if hi <= frm:
            return
        part = resid[:, frm:hi]
        mask = self.mask(ids[:, frm:hi] if ids is not None else None, start + frm, hi - frm)
        if self.encoder.extra_layers:  # earlier layers' residuals of the same positions
            extra = {layer: r[:, frm:hi] for layer, r in (new_extra or {}).items()}
            feats = self.encoder.encode(part, extra)
            content = self.encoder.content_mask(part)
            decisions = self.session.observe_features(feats, scope,  # type: ignore[arg-type]
                                                      mask.to(content.device) & content)
        else:
            decisions = self.session.observe(part, scope, mask)  # type: ignore[arg-type]
        if decisions.steers:
            last = start + hi - 1
            self.position_edits[last] = decisions.steers
            self.encoder.apply_steers(resid[:, hi - 1:hi], decisions.steers)

    def _replay(self, resid: torch.Tensor, start: int, old: int) -> None:
        for pos in range(start, start + old):
            edits = self.position_edits.get(pos)
            if edits:
                self.encoder.apply_steers(resid[:, pos - start:pos - start + 1], edits)

    def _publish(self) -> None:
        session = self.session
        if 0 in session.block_position:
            self.release = Release(max(0, session.block_position[0]), blocked=True)
        elif session.disabled:
            self.release = Release(None)
        else:
            self.release = Release(session.tokens_seen("response"))

    # ------------------------------------------------------------------ masks
    def mask(self, ids: torch.Tensor | None, start: int, length: int) -> torch.Tensor:
        """Positions ``start .. start+length`` of every row that may be monitored: not
        padding, not a special token and not the row's first real position (an attention
        sink), unless ``include_special_tokens``. Built on the ids' device, and only from the
        parts that can apply to this span (a decode step is usually one ``isin``)."""
        device = ids.device if ids is not None else torch.device("cpu")
        mask = torch.ones(self.rows, length, dtype=torch.bool, device=device)
        if not self.include_special_tokens:
            if ids is not None and ids.shape[1] == length and self.special_ids.numel():
                if self.special_ids.device != device:
                    self.special_ids = self.special_ids.to(device)
                mask &= ~torch.isin(ids, self.special_ids)
            if start <= self.last_first_real:  # the span covers some row's first real position
                cols = torch.arange(start, start + length, device=device)
                mask &= cols[None, :] != self.first_real.to(device)[:, None]
        am = self.attention_mask
        if am is not None and start < am.shape[1]:
            end = min(start + length, am.shape[1])
            mask[:, : end - start] &= am[:, start:end].bool().to(device)
        return mask

    def extend_attention_mask(self, length: int) -> torch.Tensor | None:
        """The attention mask grown to ``length`` positions with ones (generated tokens)."""
        am = self.attention_mask
        if am is None or am.shape[1] >= length:
            return am
        extra = torch.ones(am.shape[0], length - am.shape[1], dtype=am.dtype, device=am.device)
        self.attention_mask = torch.cat([am, extra], dim=1)
        return self.attention_mask
