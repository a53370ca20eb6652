"""What a compiled policy is made of: columns, rules with resolved thresholds, decisions.

Plain frozen values shared by the compiler (:mod:`monitor.policy.compile`), the engine
(:mod:`monitor.policy.engine`) and every consumer of decisions (runtime, audit, metrics,
evaluation). :class:`Program` and :class:`Level` are the flat tensor form of one scope's rules
that the kernels (:mod:`monitor.policy.kernels`) evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from monitor.yaml_source import SourceRef

StepScope = Literal["prompt", "response"]
SCOPES: tuple[StepScope, ...] = ("prompt", "response")


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
class ResolvedLeaf:
    """One feature test of a compiled rule, its threshold bound to the catalog.

    ``threshold`` is absolute: ``above_relative: 0.5`` on a feature with ``max_activation: 8``
    reads ``comparison="above", threshold=4.0`` (``written``/``written_value`` keep what the file
    said). ``column`` indexes :attr:`CompiledPolicy.features` (and ``feats[..., F]``).
    ``negated`` is True under an odd number of ``not``; ``path`` is where the test sits in the
    rule (``("when", "any", 1)``). Leaves are in :func:`~monitor.policy.tree.walk_conditions`
    order. ``tokens`` is the window or run length (1 otherwise), ``at_least`` the count of
    ``count_in_window`` and ``min_tokens`` the monitored tokens a ``scope_mean`` needs before it
    may fire (1 otherwise).
    """

    column: int
    feature: FeatureRef
    name: str | None
    comparison: Literal["above", "below"]
    threshold: float
    written: Literal["above", "below", "above_relative"]
    written_value: float
    aggregate: Literal["each_token", "window_mean", "count_in_window", "consecutive",
                       "scope_mean"]
    tokens: int
    at_least: int
    negated: bool
    path: tuple[str | int, ...]
    min_tokens: int = 1

    @property
    def label(self) -> str:
        """The catalog name as the rule wrote it, or ``latent:N``."""
        return self.name if self.name is not None else f"latent:{self.feature.index}"


@dataclass(frozen=True)
class CompiledRule:
    """A rule after binding. ``index`` is its column in ``StepResult.fired``; ``leaves`` are its
    feature tests with resolved thresholds (:class:`ResolvedLeaf`)."""

    index: int
    id: str
    severity: str
    mode: Literal["enforce", "shadow"]
    scope: Literal["prompt", "response", "both"]
    actions: tuple[str, ...]
    block_message: str | None
    steers: tuple[SteerSpec, ...]
    source: SourceRef | None
    leaves: tuple[ResolvedLeaf, ...] = ()

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
    ``window_mean``, the running scope mean for ``scope_mean``, the token's activation
    otherwise).
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


# ============================================================ compiled program (internal layout)


@dataclass(frozen=True)
class Level:
    """One level of the flattened condition tree: ``n`` nodes of up to ``max_children`` kids."""

    child_idx: torch.Tensor  # [n, max_children] column ids in the value table
    child_neg: torch.Tensor  # [n, max_children]
    out_neg: torch.Tensor  # [n]


@dataclass(frozen=True)
class Program:
    """The rules of one scope as flat tensors (on CPU; moved per device on first use).

    Built by :func:`~monitor.policy.compile.compile_policies`, read by the kernels in
    :mod:`monitor.policy.kernels`. The layout is internal to the policy package: leaves are
    ordered each_token | windows (window_mean, count_in_window) | consecutive | scope_mean, and
    the value table the levels index is ``[leaves..., true, level nodes...]``.
    """

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
    n_mean: int
    mean_min_tokens: torch.Tensor  # [Lm] long
    levels: tuple[Level, ...]
    rule_root: torch.Tensor  # [Rs] column in the value table
    rule_leaves: torch.Tensor  # [Rs, L] bool: leaf belongs to the rule's condition
    block_rules: torch.Tensor  # [Rs] bool: enforced with a block action
    leaf_labels: tuple[str, ...]

    @property
    def n_leaves(self) -> int:
        """Feature tests in this scope's program."""
        return self.n_each + self.n_window + self.n_consec + self.n_mean

    def to(self, device: torch.device) -> Program:
        """A copy with every tensor on ``device``."""
        moved: dict[str, Any] = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        levels = tuple(Level(lv.child_idx.to(device), lv.child_neg.to(device),
                             lv.out_neg.to(device)) for lv in self.levels)
        return replace(self, **moved, levels=levels)
