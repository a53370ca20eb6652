"""The policy engine: compiled rules + per-request state + one step of activations -> decisions.

Third stage of the pipeline (hook -> SAE encode -> **policy engine** -> actions). Pure: no I/O,
no model, no logging; the same code serves live generation, ``scan``, ``eval`` and policy tests.

Binding (:func:`compile_policies`) resolves every feature name against the catalog, every
relative threshold against ``max_activation`` and checks latents against ``d_sae``, so nothing
can fail by name at the first token. It yields the *columns* the caller must supply
(:attr:`CompiledPolicy.features`: SAE latents in ascending order, then probes by name) and a
flat program per scope.

Evaluation (:meth:`CompiledPolicy.step`) is vectorised over ``[batch, tokens, leaves]``:

* all feature tests compare at once (one ``index_select`` and one comparison);
* ``window_mean`` / ``count_in_window`` use prefix sums over ``[history, chunk]`` where the
  history holds each row's last ``W`` monitored values, and ``searchsorted`` finds where each
  window starts in the monitored-token stream, so masked tokens never enter a window;
* ``consecutive`` keeps a run length per row and leaf and updates it with a ``cummax`` of the
  positions of failing tokens;
* the ``any``/``all``/``not`` tree is flattened into levels; each level is one gather and one
  ``all`` (``any(x) = not all(not x)``).

There is exactly one host-device sync per step, ``fired.any()``; only when something fired are
the firing positions copied to the host to build :class:`Hit` objects.

Windows, runs and token counters are kept per row and per scope, so a prompt evaluated in one
call and a response evaluated one token per call give the same decisions as evaluating the
concatenated streams in any chunking. A NaN activation fails every feature test (so a ``not``
around it passes); a NaN inside a ``window_mean`` window fails that test while it is in the
window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from monitor.catalog import Catalog
from monitor.errors import EngineError, PolicyError
from monitor.policy.loader import PolicySet, SourceRef, rule_problems
from monitor.policy.schema import AllOf, AnyOf, Leaf, Not, Rule, children

StepScope = Literal["prompt", "response"]
SCOPES: tuple[StepScope, ...] = ("prompt", "response")
_NEVER = -(1 << 40)


# ============================================================================ public results


@dataclass(frozen=True)
class FeatureRef:
    """One input column: an SAE latent (``index``) or a probe (``name``).

    For latents ``name`` is the catalog name a policy used for it, or None for raw latents.
    """

    kind: Literal["latent", "probe"]
    index: int | None
    name: str | None

    @property
    def label(self) -> str:
        """Name if known, else ``latent:N``."""
        return self.name if self.name is not None else f"latent:{self.index}"


@dataclass(frozen=True)
class SteerSpec:
    """A steer action resolved against the catalog: absolute values only."""

    target: FeatureRef
    op: Literal["clamp", "scale"]
    value: float
    duration: Literal["rest_of_response", "while_active"]


@dataclass(frozen=True)
class CompiledRule:
    """A rule after binding. ``index`` is its column in ``StepResult.fired``."""

    index: int
    id: str
    severity: str
    mode: Literal["enforce", "shadow"]
    scope: Literal["prompt", "response", "both"]
    actions: tuple[str, ...]
    block_message: str | None
    steers: tuple[SteerSpec, ...]
    source: SourceRef | None

    @property
    def enforced(self) -> bool:
        """True when block and steer actions take effect (mode enforce)."""
        return self.mode == "enforce"


@dataclass(frozen=True)
class Hit:
    """A rule fired at one token of one row.

    ``token_index`` counts every token of the row's stream in that scope (masked ones too),
    so it maps back to positions. ``feature``/``activation`` name the feature test that drove
    the firing (for combinations: among the tests that passed, the one furthest past its
    threshold relative to the threshold) and its compared value (the window mean for
    ``window_mean``, the token's activation otherwise).
    """

    rule_id: str
    row: int
    token_index: int
    scope: StepScope
    mode: str
    severity: str
    actions: tuple[str, ...]
    feature: str
    activation: float


@dataclass(frozen=True)
class SteerDirective:
    """Steer ``latent`` (or probe ``probe``) of ``row``: ``op`` is clamp (set to ``value``) or
    scale (multiply by ``value``). ``token_index`` is the token (in ``scope``) that triggered it.

    The caller applies ``residual += (target - a) * direction`` with ``target = value`` (clamp)
    or ``a * value`` (scale); ``direction`` is the decoder row or the probe direction.
    """

    row: int
    rule_id: str
    latent: int | None
    probe: str | None
    op: Literal["clamp", "scale"]
    value: float
    duration: Literal["rest_of_response", "while_active"]
    token_index: int
    scope: StepScope


@dataclass(frozen=True)
class StepResult:
    """Decisions of one :meth:`CompiledPolicy.step`.

    * ``fired`` — ``Bool[B, T, R]``, column ``r`` is ``CompiledPolicy.rules[r]`` (rules outside
      the step's scope are all False); shadow rules included.
    * ``hits`` — one :class:`Hit` per True in ``fired``, ordered by row, token, rule.
    * ``block`` — ``Bool[B]``: an enforced rule with a ``block`` action fired in this step
      (a device tensor, no sync needed to read it lazily).
    * ``block_messages`` — ``{row: (rule_id, message)}`` of the first such firing per row.
    * ``steer`` — the steering **in force for each row's next token**: every
      ``rest_of_response`` directive triggered so far in the request (also in
      ``EngineState.active_steers``) plus the ``while_active`` directives of enforced rules
      that fired at the last position of this call. Apply exactly these; a ``while_active``
      directive drops out as soon as its condition stops holding.
    """

    fired: torch.Tensor
    hits: list[Hit]
    block: torch.Tensor
    block_messages: dict[int, tuple[str, str]]
    steer: list[SteerDirective]


# ============================================================================ state


@dataclass
class _ScopeState:
    tokens_seen: int
    history: torch.Tensor  # [B, W, Lw] last W monitored raw values of window leaves
    history_valid: torch.Tensor  # [B, W] right-aligned
    runs: torch.Tensor  # [B, Lc] current run length of consecutive leaves


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
    scopes: dict[str, _ScopeState]
    persisted: list[dict[tuple[int, int], SteerDirective]] = field(default_factory=list)
    steering: bool = False  # any rest_of_response directive persisted (skips a per-row loop)

    def tokens_seen(self, scope: StepScope) -> int:
        """Tokens (masked included) stepped so far in ``scope``; the next token's index."""
        return self.scopes[scope].tokens_seen

    def active_steers(self, row: int) -> tuple[SteerDirective, ...]:
        """The ``rest_of_response`` directives triggered so far for ``row``, in rule order."""
        return tuple(self.persisted[row][k] for k in sorted(self.persisted[row]))


# ============================================================================ compiled program


@dataclass(frozen=True)
class _Level:
    child_idx: torch.Tensor  # [n, max_children] column ids in the value table
    child_neg: torch.Tensor  # [n, max_children]
    out_neg: torch.Tensor  # [n]


@dataclass(frozen=True)
class _Program:
    """The rules of one scope as flat tensors (on CPU; moved per device on first use)."""

    rule_cols: torch.Tensor  # [Rs] global rule index
    leaf_col: torch.Tensor  # [L] input column
    leaf_thr: torch.Tensor  # [L] float32
    leaf_above: torch.Tensor  # [L] bool
    n_each: int
    n_window: int
    n_consec: int
    win_mean: torch.Tensor  # [Lw] bool (else count_in_window)
    win_tokens: torch.Tensor  # [Lw] long
    win_at_least: torch.Tensor  # [Lw] long
    max_window: int
    cons_tokens: torch.Tensor  # [Lc] long
    max_run: int
    levels: tuple[_Level, ...]
    rule_root: torch.Tensor  # [Rs] column in the value table
    rule_leaves: torch.Tensor  # [Rs, L] bool: leaf belongs to the rule's condition
    block_rules: torch.Tensor  # [Rs] bool: enforced with a block action
    leaf_labels: tuple[str, ...]

    @property
    def n_leaves(self) -> int:
        return self.n_each + self.n_window + self.n_consec

    def to(self, device: torch.device) -> _Program:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items() if k != "levels"}
        levels = tuple(_Level(lv.child_idx.to(device), lv.child_neg.to(device),
                              lv.out_neg.to(device)) for lv in self.levels)
        return _Program(**moved, levels=levels)


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy set bound to a catalog and an SAE width, ready to evaluate.

    ``features`` are the columns ``step`` expects in ``feats[..., F]``: every latent or probe a
    condition reads or a steer action targets (so the caller has ``a`` for steering), SAE
    latents first in ascending index order (``latent_indices``), then probes by name.
    """

    features: tuple[FeatureRef, ...]
    latent_indices: torch.Tensor
    rules: tuple[CompiledRule, ...]
    version_id: str
    d_sae: int
    _programs: dict[str, _Program]
    _device_cache: dict[tuple[str, torch.device], _Program] = field(default_factory=dict)
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

    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> EngineState:
        """Fresh state for a request of ``batch_size`` rows, tensors on ``device`` (CPU default)."""
        dev = torch.empty(0, device=device).device  # normalised: "cuda" -> "cuda:0"
        scopes = {}
        for scope in SCOPES:
            prog = self._programs[scope]
            w = prog.max_window
            scopes[scope] = _ScopeState(
                tokens_seen=0,
                history=torch.zeros(batch_size, w, prog.n_window, device=dev),
                history_valid=torch.zeros(batch_size, w, dtype=torch.bool, device=dev),
                runs=torch.zeros(batch_size, prog.n_consec, dtype=torch.long, device=dev))
        return EngineState(batch_size, dev, self._token, scopes,
                           [{} for _ in range(batch_size)])

    def _program(self, scope: str, device: torch.device) -> _Program:
        key = (scope, device)
        prog = self._device_cache.get(key)
        if prog is None:
            prog = self._programs[scope].to(device)
            self._device_cache[key] = prog
        return prog

    def step(self, state: EngineState, feats: torch.Tensor, mask: torch.Tensor,
             scope: StepScope) -> StepResult:
        """Evaluate ``feats[B, T, F]`` (columns as in ``features``) for ``scope``.

        ``mask[B, T]`` is False for tokens that must not be monitored (special tokens,
        padding, finished rows): they enter no window, never fire, but still count in
        ``token_index``. Only rules whose scope covers ``scope`` are evaluated. ``state`` is
        updated in place.
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
            fired = torch.zeros(batch, tokens, n_rules, dtype=torch.bool, device=feats.device)
            block = torch.zeros(batch, dtype=torch.bool, device=feats.device)
            return StepResult(fired, [], block, {}, self._in_force(state, []))
        ev = _evaluate(prog, st, feats.float(), mask)
        rule_fired = ev.rule_fired
        if n_scope == n_rules:
            fired = rule_fired  # every rule is in this scope: columns coincide
        else:
            fired = torch.zeros(batch, tokens, n_rules, dtype=torch.bool, device=feats.device)
            fired.index_copy_(2, prog.rule_cols, rule_fired)
        block = (rule_fired & prog.block_rules).flatten(1).any(1)
        if not bool(rule_fired.any()):  # the one host-device sync of a quiet step
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

    def _decisions(self, prog: _Program, ev: _Evaluation, state: EngineState, scope: StepScope,
                   pos0: int, tokens: int
                   ) -> tuple[list[Hit], dict[int, tuple[str, str]], list[SteerDirective]]:
        """Hits, block messages and this step's while_active steers (host side, after a fire)."""
        idx = ev.rule_fired.nonzero()  # [H, 3] (row, token, scope-rule), sorted
        b, t, r = idx[:, 0], idx[:, 1], idx[:, 2]
        driver, value = _drivers(prog, ev, b, t, r)
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


# ============================================================================ evaluation


@dataclass
class _Evaluation:
    leaf_fired: torch.Tensor  # [B, T, L]
    leaf_value: torch.Tensor  # [B, T, L] compared value (window mean for window_mean)
    rule_fired: torch.Tensor  # [B, T, Rs]


def _compare(x: torch.Tensor, thr: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    return torch.where(above, x > thr, x < thr)


def _evaluate(prog: _Program, st: _ScopeState, feats: torch.Tensor,
              mask: torch.Tensor) -> _Evaluation:
    """Leaf tests, windows, runs and the condition tree for one chunk; updates ``st``."""
    x = feats.index_select(2, prog.leaf_col)  # [B, T, L]
    passed = _compare(x, prog.leaf_thr, prog.leaf_above) & mask.unsqueeze(-1)
    e, w = prog.n_each, prog.n_each + prog.n_window
    parts_fired = [passed[..., :e]]
    parts_value = [x[..., :e]]
    if prog.n_window:
        f, v = _windows(prog, st, x[..., e:w], mask)
        parts_fired.append(f)
        parts_value.append(v)
    if prog.n_consec:
        parts_fired.append(_consecutive(prog, st, passed[..., w:], mask))
        parts_value.append(x[..., w:])
    leaf_fired = torch.cat(parts_fired, -1)
    values = torch.cat([leaf_fired, torch.ones_like(leaf_fired[..., :1])], -1)
    for lv in prog.levels:
        n, width = lv.child_idx.shape
        kids = values.index_select(2, lv.child_idx.reshape(-1))
        kids = kids.view(*values.shape[:2], n, width) ^ lv.child_neg
        values = torch.cat([values, kids.all(-1) ^ lv.out_neg], -1)
    rule_fired = values.index_select(2, prog.rule_root) & mask.unsqueeze(-1)
    return _Evaluation(leaf_fired, torch.cat(parts_value, -1), rule_fired)


def _sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _windows(prog: _Program, st: _ScopeState, x: torch.Tensor,
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window leaves over the monitored-token stream: (fired, window mean or raw value)."""
    batch, tokens, n = x.shape
    hist_len = st.history.shape[1]
    xs = torch.cat([st.history, x], 1)  # [B, S, Lw]
    valid = torch.cat([st.history_valid, mask], 1)  # [B, S]
    passed = _compare(xs, prog.leaf_thr[prog.n_each:prog.n_each + n],
                      prog.leaf_above[prog.n_each:prog.n_each + n])
    dt = _sum_dtype(x.device)
    contrib = torch.where(prog.win_mean, xs.to(dt), passed.to(dt))
    contrib = torch.where(valid.unsqueeze(-1), contrib, torch.zeros((), dtype=dt, device=x.device))
    zero_row = torch.zeros(batch, 1, n, dtype=dt, device=x.device)
    prefix = torch.cat([zero_row, contrib.cumsum(1)], 1)  # [B, 1+S, Lw]
    counts = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=x.device),
                        valid.long().cumsum(1)], 1)  # [B, 1+S]
    now = counts[:, 1 + hist_len:]  # [B, T] monitored tokens up to and including t
    start = (now.unsqueeze(-1) - prog.win_tokens).clamp(min=0)  # [B, T, Lw]
    cut = torch.searchsorted(counts, start.reshape(batch, -1), right=True) - 1
    before = prefix.gather(1, cut.view(batch, tokens, n))
    total = prefix[:, 1 + hist_len:] - before
    count = (now.unsqueeze(-1) - start).to(dt)
    thr = prog.leaf_thr[prog.n_each:prog.n_each + n].to(dt)
    above = prog.leaf_above[prog.n_each:prog.n_each + n]
    mean_ok = torch.where(above, total > thr * count, total < thr * count)
    count_ok = total >= prog.win_at_least.to(dt)
    fired = torch.where(prog.win_mean, mean_ok, count_ok) & mask.unsqueeze(-1)
    mean = (total / count.clamp(min=1)).to(x.dtype)
    value = torch.where(prog.win_mean, mean, x)
    # Keep the last `hist_len` monitored values per row (right-aligned) for the next call.
    if hist_len:
        last = counts[:, -1:]  # [B, 1]
        want = last - hist_len + 1 + torch.arange(hist_len, device=x.device)  # [B, W]
        keep = want >= 1
        where = torch.searchsorted(counts, want.clamp(min=1), right=False) - 1
        where = where.clamp(0, xs.shape[1] - 1)  # empty slots read anything, then zeroed
        kept = xs.gather(1, where.unsqueeze(-1).expand(batch, hist_len, n))
        st.history = torch.where(keep.unsqueeze(-1), kept, torch.zeros((), device=x.device))
        st.history_valid = keep
    return fired, value


def _consecutive(prog: _Program, st: _ScopeState, passed: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """Run-length leaves: fired where the last N monitored tokens all passed."""
    counts = mask.long().cumsum(1).unsqueeze(-1)  # [B, T, 1]
    breaks = mask.unsqueeze(-1) & ~passed
    marks = torch.where(breaks, counts, torch.full((), _NEVER, device=passed.device))
    last_break = torch.maximum(marks.cummax(1).values, -st.runs.unsqueeze(1))
    run = counts - last_break  # monitored tokens since the last failing one
    st.runs = run[:, -1].clamp(max=prog.max_run)
    return passed & (run >= prog.cons_tokens)


def _drivers(prog: _Program, ev: _Evaluation, b: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each hit, the leaf furthest past its threshold (relative) and its compared value."""
    value = ev.leaf_value[b, t]  # [H, L]
    thr = prog.leaf_thr
    margin = torch.where(prog.leaf_above, value - thr, thr - value) / thr.abs().clamp(min=1e-6)
    member = prog.rule_leaves[r]  # [H, L]
    passed = member & ev.leaf_fired[b, t]
    use = torch.where(passed.any(-1, keepdim=True), passed, member)
    score = torch.where(use, margin.nan_to_num(nan=-math.inf), torch.full((), -math.inf,
                                                                        device=value.device))
    driver = score.argmax(-1)
    return driver, value.gather(1, driver.unsqueeze(1)).squeeze(1)


# ============================================================================ compilation


@dataclass
class _LeafSpec:
    column: FeatureRef
    threshold: float
    above: bool
    kind: str
    tokens: int
    at_least: int
    label: str

    def key(self) -> tuple:
        return (self.column.kind, self.column.index, self.column.name if self.column.kind ==
                "probe" else None, self.threshold, self.above, self.kind, self.tokens,
                self.at_least)


class _Binder:
    """Resolves names and thresholds; collects every problem instead of stopping at the first."""

    def __init__(self, catalog: Catalog | None, d_sae: int) -> None:
        self.catalog = catalog
        self.d_sae = d_sae
        self.latents: dict[int, str | None] = {}
        self.probes: set[str] = set()

    def column(self, feature: str | None, latent: int | None) -> FeatureRef:
        if feature is None:
            assert latent is not None
            self.latents.setdefault(latent, None)
            return FeatureRef("latent", latent, None)
        assert self.catalog is not None  # checked before binding
        entry = self.catalog.get(feature)
        if entry.latent is not None:
            if self.latents.get(entry.latent) is None:
                self.latents[entry.latent] = feature
            return FeatureRef("latent", entry.latent, feature)
        self.probes.add(feature)
        return FeatureRef("probe", None, feature)

    def leaf(self, leaf: Leaf) -> _LeafSpec:
        col = self.column(leaf.feature, leaf.latent)
        if leaf.above is not None:
            thr, above = leaf.above, True
        elif leaf.below is not None:
            thr, above = leaf.below, False
        else:
            assert self.catalog is not None and leaf.feature is not None
            max_act = self.catalog.get(leaf.feature).max_activation
            assert max_act is not None and leaf.above_relative is not None
            thr, above = leaf.above_relative * max_act, True
        agg = leaf.aggregate
        return _LeafSpec(col, float(thr), above, agg.kind, agg.tokens, agg.at_least, leaf.label)

    def steer(self, rule: Rule) -> tuple[SteerSpec, ...]:
        out = []
        for action in rule.actions:
            s = action.steer
            if s is None:
                continue
            target = self.column(s.feature, s.latent)
            if s.clamp is not None:
                op, value = "clamp", s.clamp
            elif s.scale is not None:
                op, value = "scale", s.scale
            else:
                assert self.catalog is not None and s.feature is not None
                max_act = self.catalog.get(s.feature).max_activation
                assert max_act is not None and s.clamp_relative is not None
                op, value = "clamp", s.clamp_relative * max_act
            out.append(SteerSpec(target, op, float(value), s.duration))  # type: ignore[arg-type]
        return tuple(out)


_KIND_ORDER = {"each_token": 0, "window_mean": 1, "count_in_window": 1, "consecutive": 2}


def compile_policies(policy_set: PolicySet, catalog: Catalog | None, *,
                     d_sae: int) -> CompiledPolicy:
    """Bind ``policy_set`` to ``catalog`` and an SAE with ``d_sae`` latents.

    Raises :class:`PolicyError` listing every unresolvable feature name, missing
    ``max_activation``, probe steering without ``along_direction`` and latent ``>= d_sae``,
    each naming the rule and where it was defined.
    """
    errors = []
    for rule, source in zip(policy_set.rules, policy_set.sources):
        problems = rule_problems(rule, catalog, d_sae)
        if catalog is None:
            names = _names_used(rule)
            if names:
                problems.append((("when",), f"uses feature names ({', '.join(names)}) but no "
                                            "catalog was given to resolve them"))
        errors += [f"{source}: rule '{rule.id}': {_path(loc)}: {text}" for loc, text in problems]
    if errors:
        raise PolicyError(f"{len(errors)} problem(s) binding policies to the catalog and SAE:\n  "
                          + "\n  ".join(errors), errors)
    binder = _Binder(catalog, d_sae)
    per_rule: list[tuple[Rule, list[_LeafSpec], Leaf | AnyOf | AllOf | Not]] = []
    compiled_rules = []
    for i, (rule, source) in enumerate(zip(policy_set.rules, policy_set.sources)):
        specs = [binder.leaf(leaf) for leaf in _leaves(rule.when)]
        per_rule.append((rule, specs, rule.when))
        block = next((a.block.message for a in rule.actions if a.block is not None), None)
        compiled_rules.append(CompiledRule(
            index=i, id=rule.id, severity=rule.severity, mode=rule.mode, scope=rule.scope,
            actions=tuple(a.kind for a in rule.actions), block_message=block,
            steers=binder.steer(rule), source=source))
    latents = sorted(binder.latents)
    features = tuple([FeatureRef("latent", i, binder.latents[i]) for i in latents]
                     + [FeatureRef("probe", None, n) for n in sorted(binder.probes)])
    column_of = {(f.kind, f.index if f.kind == "latent" else f.name): c
                 for c, f in enumerate(features)}
    programs = {scope: _build_program(scope, per_rule, compiled_rules, column_of)
                for scope in SCOPES}
    return CompiledPolicy(features=features,
                          latent_indices=torch.tensor(latents, dtype=torch.long),
                          rules=tuple(compiled_rules), version_id=policy_set.version_id,
                          d_sae=d_sae, _programs=programs)


def _path(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _leaves(cond: Leaf | AnyOf | AllOf | Not) -> list[Leaf]:
    if isinstance(cond, Leaf):
        return [cond]
    return [leaf for c in children(cond) for leaf in _leaves(c)]


def _names_used(rule: Rule) -> list[str]:
    names = [leaf.feature for leaf in _leaves(rule.when) if leaf.feature is not None]
    names += [a.steer.feature for a in rule.actions if a.steer is not None and a.steer.feature]
    return sorted(set(names))


def _build_program(scope: str, per_rule: Sequence[tuple[Rule, list[_LeafSpec], object]],
                   compiled: Sequence[CompiledRule], column_of: dict) -> _Program:
    """Flatten the rules covering ``scope`` into leaf arrays and tree levels."""
    chosen = [(rule, specs, cond, compiled[i]) for i, (rule, specs, cond) in enumerate(per_rule)
              if rule.scope in (scope, "both")]
    # Unique leaves, ordered each_token | windows | consecutive.
    uniq: dict[tuple, _LeafSpec] = {}
    for _, specs, _, _ in chosen:
        for s in specs:
            uniq.setdefault(s.key(), s)
    ordered = sorted(uniq.values(), key=lambda s: _KIND_ORDER[s.kind])
    leaf_id = {s.key(): i for i, s in enumerate(ordered)}
    n_leaves = len(ordered)
    true_col = n_leaves

    # Internal nodes, deduplicated; single-child any/all collapse to the child.
    nodes: dict[tuple, tuple[int, str, tuple]] = {}  # key -> (depth, kind, child keys)

    def visit(cond: object, specs_iter: list[_LeafSpec]) -> tuple:
        if isinstance(cond, Leaf):
            return ("leaf", leaf_id[specs_iter.pop(0).key()])
        kind = "any" if isinstance(cond, AnyOf) else "all" if isinstance(cond, AllOf) else "not"
        kids = tuple(visit(c, specs_iter) for c in children(cond))  # type: ignore[arg-type]
        if kind != "not" and len(kids) == 1:
            return kids[0]
        key = (kind, kids)
        depth = 1 + max(nodes[k][0] if k[0] != "leaf" else 0 for k in kids)
        nodes.setdefault(key, (depth, kind, kids))
        return key

    roots = [visit(cond, list(specs)) for _, specs, cond, _ in chosen]
    by_depth = sorted(nodes.items(), key=lambda kv: kv[1][0])
    node_id = {key: true_col + 1 + j for j, (key, _) in enumerate(by_depth)}

    def col(key: tuple) -> int:
        return key[1] if key[0] == "leaf" else node_id[key]

    levels = []
    for depth in sorted({d for d, _, _ in nodes.values()}):
        group = [(kind, kids) for _, (d, kind, kids) in by_depth if d == depth]
        width = max(len(k) for _, k in group)
        idx = [[col(k) for k in kids] + [true_col] * (width - len(kids)) for _, kids in group]
        neg_child = [[kind != "all"] * len(kids) + [False] * (width - len(kids))
                     for kind, kids in group]
        neg_out = [kind == "any" for kind, _ in group]
        levels.append(_Level(torch.tensor(idx, dtype=torch.long),
                             torch.tensor(neg_child, dtype=torch.bool),
                             torch.tensor(neg_out, dtype=torch.bool)))

    def col_of(ref: FeatureRef) -> int:
        return column_of[(ref.kind, ref.index if ref.kind == "latent" else ref.name)]

    windows = [s for s in ordered if _KIND_ORDER[s.kind] == 1]
    consec = [s for s in ordered if s.kind == "consecutive"]
    membership = torch.zeros(len(chosen), n_leaves, dtype=torch.bool)
    for r, (_, specs, _, _) in enumerate(chosen):
        for s in specs:
            membership[r, leaf_id[s.key()]] = True
    return _Program(
        rule_cols=torch.tensor([c.index for *_, c in chosen], dtype=torch.long),
        leaf_col=torch.tensor([col_of(s.column) for s in ordered], dtype=torch.long),
        leaf_thr=torch.tensor([s.threshold for s in ordered], dtype=torch.float32),
        leaf_above=torch.tensor([s.above for s in ordered], dtype=torch.bool),
        n_each=sum(1 for s in ordered if s.kind == "each_token"),
        n_window=len(windows), n_consec=len(consec),
        win_mean=torch.tensor([s.kind == "window_mean" for s in windows], dtype=torch.bool),
        win_tokens=torch.tensor([s.tokens for s in windows], dtype=torch.long),
        win_at_least=torch.tensor([s.at_least for s in windows], dtype=torch.long),
        max_window=max((s.tokens for s in windows), default=0),
        cons_tokens=torch.tensor([s.tokens for s in consec], dtype=torch.long),
        max_run=max((s.tokens for s in consec), default=0),
        levels=tuple(levels),
        rule_root=torch.tensor([col(k) for k in roots], dtype=torch.long),
        rule_leaves=membership,
        block_rules=torch.tensor([c.enforced and c.block_message is not None
                                  for *_, c in chosen], dtype=torch.bool),
        leaf_labels=tuple(s.label for s in ordered))
