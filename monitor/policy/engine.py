"""The policy engine: compiled rules + per-request state + one step of activations -> decisions.

Third stage of the pipeline (hook -> SAE encode -> **policy engine** -> actions). Pure: no I/O,
no model, no logging; the same code serves live generation, ``scan``, ``eval`` and policy tests.
A :class:`CompiledPolicy` comes from :func:`~monitor.policy.compile.compile_policies` (binding:
names, relative thresholds and latent ranges resolved, so nothing fails by name at the first
token).

:meth:`CompiledPolicy.step` evaluates one chunk of tokens of every row at once with the kernels
of :mod:`monitor.policy.kernels`. There is exactly one host-device sync per step,
``fired.any()``; only when something fired are the firing positions copied to the host to build
:class:`Hit` objects.

Windows, runs and token counters are kept per row and per scope, so a prompt evaluated in one
call and a response evaluated one token per call give the same decisions as evaluating the
concatenated streams in any chunking.

:meth:`CompiledPolicy.step_many` steps many one-row states (the requests a serving engine runs
concurrently) in one evaluation and one host sync, with the decisions each would get alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from monitor.errors import EngineError
from monitor.policy.compiled import (SCOPES, CompiledRule, FeatureRef, Hit, Program, ResolvedLeaf,
                                     SteerDirective, SteerSpec, StepResult, StepScope)
from monitor.policy.kernels import Evaluation, ScopeState, drivers, evaluate

__all__ = ["SCOPES", "CompiledPolicy", "CompiledRule", "EngineState", "FeatureRef", "Hit",
           "ResolvedLeaf", "SteerDirective", "SteerSpec", "StepResult", "StepScope"]


# ============================================================================ state


@dataclass
class EngineState:
    """Per-request state: windows, runs and token counters per scope, persisted steering.

    Create one per request (batch) with :meth:`CompiledPolicy.new_state` and pass it to every
    ``step`` of that request; ``step`` updates it in place. A state belongs to the compiled
    policy that made it (keep using that policy for the whole request, even after a reload).
    Not thread-safe: one request, one thread.
    """

    batch_size: int
    device: torch.device
    owner: object
    scopes: dict[str, ScopeState]
    persisted: list[dict[tuple[int, int], SteerDirective]] = field(default_factory=list)
    steering: bool = False  # any rest_of_response directive persisted (skips a per-row loop)

    def tokens_seen(self, scope: StepScope) -> int:
        """Tokens (masked included) stepped so far in ``scope``; the next token's index."""
        return self.scopes[scope].tokens_seen

    def active_steers(self, row: int) -> tuple[SteerDirective, ...]:
        """The ``rest_of_response`` directives triggered so far for ``row``, in rule order."""
        return tuple(self.persisted[row][k] for k in sorted(self.persisted[row]))


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy set bound to a catalog and an SAE width, ready to evaluate.

    ``features`` are the columns ``step`` expects in ``feats[..., F]``: every latent or probe a
    condition reads or a steer action targets (so the caller has ``a`` for steering), SAE
    latents first in ascending index order (``latent_indices``), then probes by name.
    ``programs`` holds each scope's rules in flat tensor form (internal layout, see
    :class:`~monitor.policy.compiled.Program`). Each rule's feature tests with their resolved
    thresholds are ``rules[i].leaves`` (also :meth:`resolved_leaves`).
    """

    features: tuple[FeatureRef, ...]
    latent_indices: torch.Tensor
    rules: tuple[CompiledRule, ...]
    version_id: str
    d_sae: int
    programs: dict[str, Program]
    _device_cache: dict[tuple[str, torch.device], Program] = field(default_factory=dict)
    _token: object = field(default_factory=object)

    @property
    def probe_names(self) -> tuple[str, ...]:
        """Probe columns, in column order (after the latents)."""
        return tuple(f.name or "" for f in self.features if f.kind == "probe")

    def rule(self, rule_id: str) -> CompiledRule:
        """The compiled rule with id ``rule_id`` (KeyError if absent)."""
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def resolved_leaves(self, rule_id: str) -> tuple[ResolvedLeaf, ...]:
        """The feature tests of rule ``rule_id`` with absolute thresholds (KeyError if absent).

        ``above_relative`` is already multiplied by the catalog's ``max_activation``, so callers
        never resolve it again.
        """
        return self.rule(rule_id).leaves

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> EngineState:
        """Fresh state for a request of ``batch_size`` rows, tensors on ``device`` (CPU default)."""
        dev = torch.empty(0, device=device).device  # normalised: "cuda" -> "cuda:0"
        scopes: dict[str, ScopeState] = {}
        for scope in SCOPES:
            scopes[scope] = ScopeState.fresh(self.programs[scope], batch_size, dev)
        return EngineState(batch_size, dev, self._token, scopes,
                           [{} for _ in range(batch_size)])

    def _program(self, scope: str, device: torch.device) -> Program:
        key = (scope, device)
        prog = self._device_cache.get(key)
        if prog is None:
            prog = self.programs[scope].to(device)
            self._device_cache[key] = prog
        return prog

    def step(self, state: EngineState, feats: torch.Tensor, mask: torch.Tensor,
             scope: StepScope, *, require_finite: bool = False) -> StepResult:
        """Evaluate ``feats[B, T, F]`` (columns as in ``features``) for ``scope``.

        ``mask[B, T]`` is False for tokens that must not be monitored (special tokens,
        padding, finished rows): they enter no window, never fire, but still count in
        ``token_index``. Only rules whose scope covers ``scope`` are evaluated. ``state`` is
        updated in place. ``require_finite``: raise :class:`FloatingPointError` when any value
        of ``feats`` is NaN or infinite, checked in the same host sync as the firing test (a
        runtime that must fail on broken activations pays no second sync per step).
        """
        self._check(state, feats, mask, scope)
        batch, tokens = mask.shape
        st = state.scopes[scope]
        pos0 = st.tokens_seen
        st.tokens_seen += tokens
        prog = self._program(scope, feats.device)
        if prog.rule_cols.shape[0] == 0 or tokens == 0:
            if require_finite and tokens and not bool(torch.isfinite(feats).all()):
                raise FloatingPointError("non-finite SAE activation")
            return self._quiet(state, feats, tokens)
        ev = evaluate(prog, st, feats.float(), mask)
        fired, block, any_fired = self._fired(prog, ev, feats, require_finite)
        if not any_fired:
            return StepResult(fired, [], block, {}, self._in_force(state, []))
        hits, blocks, now = _decisions(self.rules, prog, ev, [(state, row, pos0) for row in range(batch)],
                                            scope, tokens)
        return StepResult(fired, [h for _, h in hits], block, blocks, self._in_force(state, [d for _, d in now]))

    def step_many(self, states: Sequence[EngineState], feats: torch.Tensor, mask: torch.Tensor,
                  scope: StepScope, *, require_finite: bool = False) -> list[StepResult]:
        """Step several one-row states at once: row ``i`` of ``feats[N, T, F]`` / ``mask[N, T]``
        is the next ``T`` tokens of the request of ``states[i]``.

        Why: a serving engine runs many requests concurrently, each with its own state (they
        start and end at different times, at different positions). Stepping them one by one
        costs a kernel sequence and a host sync per request per decode step; this costs one of
        each for all of them. The results are exactly those of ``step(states[i], feats[i:i+1],
        mask[i:i+1], scope)`` for every ``i`` (one :class:`StepResult` per state, rows 0).
        """
        if not states:
            return []
        for state in states:
            if state.batch_size != 1:
                raise EngineError(f"step_many takes one-row states (one per request), got a state of "
                                  f"batch size {state.batch_size}; use step() for a batched request")
            if state.owner is not self._token or state.device != states[0].device:
                raise EngineError("every state passed to step_many must come from this CompiledPolicy's "
                                  "new_state(), all on one device")
        merged = EngineState(len(states), states[0].device, states[0].owner,
                             {scope: _merge([s.scopes[scope] for s in states])})
        self._check(merged, feats, mask, scope)
        tokens = mask.shape[1]
        pos0 = [s.scopes[scope].tokens_seen for s in states]
        for state in states:
            state.scopes[scope].tokens_seen += tokens
        prog = self._program(scope, feats.device)
        if prog.rule_cols.shape[0] == 0 or tokens == 0:
            if require_finite and tokens and not bool(torch.isfinite(feats).all()):
                raise FloatingPointError("non-finite SAE activation")
            return [self._quiet(s, feats, tokens) for s in states]
        ev = evaluate(prog, merged.scopes[scope], feats.float(), mask)
        _split(merged.scopes[scope], [s.scopes[scope] for s in states])
        fired, block, any_fired = self._fired(prog, ev, feats, require_finite)
        if not any_fired:
            return [StepResult(fired[i:i + 1], [], block[i:i + 1], {}, self._in_force(s, []))
                    for i, s in enumerate(states)]
        targets = [(s, 0, p) for s, p in zip(states, pos0)]
        hits, blocks, now = _decisions(self.rules, prog, ev, targets, scope, tokens)
        return [StepResult(fired[i:i + 1], [h for b, h in hits if b == i], block[i:i + 1],
                           {0: blocks[i]} if i in blocks else {},
                           self._in_force(s, [d for b, d in now if b == i]))
                for i, s in enumerate(states)]

    # ------------------------------------------------------------------ helpers

    def _quiet(self, state: EngineState, feats: torch.Tensor, tokens: int) -> StepResult:
        """The result of a step where no rule of the scope can fire."""
        fired = torch.zeros(state.batch_size, tokens, len(self.rules), dtype=torch.bool, device=feats.device)
        block = torch.zeros(state.batch_size, dtype=torch.bool, device=feats.device)
        return StepResult(fired, [], block, {}, self._in_force(state, []))

    def _fired(self, prog: Program, ev: Evaluation, feats: torch.Tensor, require_finite: bool
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Global-column firings, per-row block flags, and whether anything fired (the sync)."""
        rule_fired = ev.rule_fired
        if prog.rule_cols.shape[0] == len(self.rules):
            fired = rule_fired  # every rule is in this scope: columns coincide
        else:
            batch, tokens = rule_fired.shape[:2]
            fired = torch.zeros(batch, tokens, len(self.rules), dtype=torch.bool, device=feats.device)
            fired.index_copy_(2, prog.rule_cols, rule_fired)
        block = (rule_fired & prog.block_rules).flatten(1).any(1)
        if require_finite:  # one host-device sync for both questions
            any_fired, broken = torch.stack([rule_fired.any(), ~torch.isfinite(feats).all()]).tolist()
            if broken:
                raise FloatingPointError("non-finite SAE activation")
        else:
            any_fired = bool(rule_fired.any())  # the one host-device sync of a quiet step
        return fired, block, bool(any_fired)


    def _check(self, state: EngineState, feats: torch.Tensor, mask: torch.Tensor,
               scope: str) -> None:
        if state.owner is not self._token:
            raise EngineError("this EngineState was created by a different CompiledPolicy; "
                              "create one per request with policy.new_state() and keep using "
                              "that policy for the whole request")
        if scope not in SCOPES:
            raise EngineError(f"scope must be 'prompt' or 'response', got {scope!r}")
        if feats.dim() != 3 or feats.shape[-1] != len(self.features):
            raise EngineError(f"feats must have shape [batch, tokens, {len(self.features)}] "
                              f"(one column per CompiledPolicy.features), got {tuple(feats.shape)}")
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(feats.shape[:2]):
            raise EngineError(f"mask must be a bool tensor of shape {tuple(feats.shape[:2])}, "
                              f"got {mask.dtype} {tuple(mask.shape)}")
        if feats.shape[0] != state.batch_size:
            raise EngineError(f"state was made for batch size {state.batch_size}, "
                              f"feats has {feats.shape[0]} rows")
        if feats.device != state.device or mask.device != state.device:
            raise EngineError(f"state lives on {state.device} but feats/mask are on "
                              f"{feats.device}/{mask.device}; pass device= to new_state()")

    @staticmethod
    def _in_force(state: EngineState, now: list[SteerDirective]) -> list[SteerDirective]:
        if not now and not state.steering:
            return []
        out: list[SteerDirective] = []
        for row, persisted in enumerate(state.persisted):
            if persisted:
                out += [persisted[k] for k in sorted(persisted)]
            out += [d for d in now if d.row == row]
        return out



def _decisions(rules: tuple[CompiledRule, ...], prog: Program, ev: Evaluation, targets: Sequence[tuple[EngineState, int, int]],
               scope: StepScope, tokens: int
               ) -> tuple[list[tuple[int, Hit]], dict[int, tuple[str, str]], list[tuple[int, SteerDirective]]]:
    """Hits, block messages and this step's while_active steers (host side, after a fire),
    each keyed by its row of ``ev``. ``targets[b]`` says whose row ``b`` is: (the state it
    updates, the row within that state, the state's token count before this step)."""
    idx = ev.rule_fired.nonzero()  # [H, 3] (row, token, scope-rule), sorted
    b, t, r = idx[:, 0], idx[:, 1], idx[:, 2]
    driver, value = drivers(prog, ev, b, t, r)
    packed = torch.stack([b.double(), t.double(), prog.rule_cols[r].double(),
                          driver.double(), value.double()], 1).cpu().tolist()
    hits: list[tuple[int, Hit]] = []
    blocks: dict[int, tuple[str, str]] = {}
    now: list[tuple[int, SteerDirective]] = []
    for row_f, tok_f, rule_f, leaf_f, val in packed:
        slot, tok, rule = int(row_f), int(tok_f), rules[int(rule_f)]
        state, row, pos0 = targets[slot]
        token_index = pos0 + tok
        hits.append((slot, Hit(rule.id, row, token_index, scope, rule.mode, rule.severity,
                            rule.actions, prog.leaf_labels[int(leaf_f)], float(val))))
        if not rule.enforced:
            continue
        if rule.block_message is not None and slot not in blocks:  # hits are row/token sorted
            blocks[slot] = (rule.id, rule.block_message)
        for k, spec in enumerate(rule.steers):
            d = SteerDirective(row, rule.id, spec.target.index if spec.target.kind == "latent"
                               else None, spec.target.name if spec.target.kind == "probe"
                               else None, spec.op, spec.value, spec.duration, token_index,
                               scope)
            if spec.duration == "rest_of_response":
                state.persisted[row].setdefault((rule.index, k), d)
                state.steering = True
            elif tok == tokens - 1:
                now.append((slot, d))
    return hits, blocks, now


def _merge(parts: list[ScopeState]) -> ScopeState:
    """One state whose rows are ``parts`` in order (every tensor field is batch-first)."""
    values = {f.name: getattr(parts[0], f.name) for f in fields(ScopeState)}
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            values[name] = torch.cat([getattr(p, name) for p in parts])
    return ScopeState(**values)


def _split(merged: ScopeState, parts: list[ScopeState]) -> None:
    """Write row ``i`` of ``merged``'s tensor fields back into ``parts[i]``."""
    for f in fields(ScopeState):
        value = getattr(merged, f.name)
        if isinstance(value, torch.Tensor):
            for part, row in zip(parts, value.split(1)):
                setattr(part, f.name, row)


def __getattr__(name: str) -> Any:
    """``monitor.policy.engine.compile_policies`` moved to :mod:`monitor.policy.compile`."""
    if name == "compile_policies":
        warnings.warn("monitor.policy.engine.compile_policies moved: import it from "
                      "monitor.policy (or monitor.policy.compile)", DeprecationWarning,
                      stacklevel=2)
        from monitor.policy.compile import compile_policies

        return compile_policies
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
