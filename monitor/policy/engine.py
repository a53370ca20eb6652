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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
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
        n_rules = len(self.rules)
        st = state.scopes[scope]
        pos0 = st.tokens_seen
        st.tokens_seen += tokens
        prog = self._program(scope, feats.device)
        n_scope = prog.rule_cols.shape[0]
        if n_scope == 0 or tokens == 0:
            if require_finite and tokens and not bool(torch.isfinite(feats).all()):
                raise FloatingPointError("non-finite SAE activation")
            fired = torch.zeros(batch, tokens, n_rules, dtype=torch.bool, device=feats.device)
            block = torch.zeros(batch, dtype=torch.bool, device=feats.device)
            return StepResult(fired, [], block, {}, self._in_force(state, []))
        ev = evaluate(prog, st, feats.float(), mask)
        rule_fired = ev.rule_fired
        if n_scope == n_rules:
            fired = rule_fired  # every rule is in this scope: columns coincide
        else:
            fired = torch.zeros(batch, tokens, n_rules, dtype=torch.bool, device=feats.device)
            fired.index_copy_(2, prog.rule_cols, rule_fired)
        block = (rule_fired & prog.block_rules).flatten(1).any(1)
        if require_finite:  # one host-device sync for both questions
            any_fired, broken = torch.stack([rule_fired.any(), ~torch.isfinite(feats).all()]).tolist()
            if broken:
                raise FloatingPointError("non-finite SAE activation")
        else:
            any_fired = bool(rule_fired.any())  # the one host-device sync of a quiet step
        if not any_fired:
            return StepResult(fired, [], block, {}, self._in_force(state, []))
        hits, blocks, now = self._decisions(prog, ev, state, scope, pos0, tokens)
        return StepResult(fired, hits, block, blocks, self._in_force(state, now))

    # ------------------------------------------------------------------ helpers

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

    def _decisions(self, prog: Program, ev: Evaluation, state: EngineState, scope: StepScope,
                   pos0: int, tokens: int
                   ) -> tuple[list[Hit], dict[int, tuple[str, str]], list[SteerDirective]]:
        """Hits, block messages and this step's while_active steers (host side, after a fire)."""
        idx = ev.rule_fired.nonzero()  # [H, 3] (row, token, scope-rule), sorted
        b, t, r = idx[:, 0], idx[:, 1], idx[:, 2]
        driver, value = drivers(prog, ev, b, t, r)
        packed = torch.stack([b.double(), t.double(), prog.rule_cols[r].double(),
                              driver.double(), value.double()], 1).cpu().tolist()
        hits: list[Hit] = []
        blocks: dict[int, tuple[str, str]] = {}
        now: list[SteerDirective] = []
        for row_f, tok_f, rule_f, leaf_f, val in packed:
            row, tok, rule = int(row_f), int(tok_f), self.rules[int(rule_f)]
            token_index = pos0 + tok
            hits.append(Hit(rule.id, row, token_index, scope, rule.mode, rule.severity,
                            rule.actions, prog.leaf_labels[int(leaf_f)], float(val)))
            if not rule.enforced:
                continue
            if rule.block_message is not None and row not in blocks:  # hits are row/token sorted
                blocks[row] = (rule.id, rule.block_message)
            for k, spec in enumerate(rule.steers):
                d = SteerDirective(row, rule.id, spec.target.index if spec.target.kind == "latent"
                                   else None, spec.target.name if spec.target.kind == "probe"
                                   else None, spec.op, spec.value, spec.duration, token_index,
                                   scope)
                if spec.duration == "rest_of_response":
                    state.persisted[row].setdefault((rule.index, k), d)
                    state.steering = True
                elif tok == tokens - 1:
                    now.append(d)
        return hits, blocks, now

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



def __getattr__(name: str) -> Any:
    """``monitor.policy.engine.compile_policies`` moved to :mod:`monitor.policy.compile`."""
    if name == "compile_policies":
        warnings.warn("monitor.policy.engine.compile_policies moved: import it from "
                      "monitor.policy (or monitor.policy.compile)", DeprecationWarning,
                      stacklevel=2)
        from monitor.policy.compile import compile_policies

        return compile_policies
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
