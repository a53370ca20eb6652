"""Checks of validated rules that need the catalog, the SAE width or the range of a feature.

Shared by the loader (which has YAML positions and reports ``file:line:column``) and the
compiler (which reports the rule's source). Pure and torch-free, so ``policy check`` can run them
in a pre-commit hook without loading the engine: :func:`binding_problems` is everything
:func:`~monitor.policy.compile.compile_policies` would refuse.

Checks: unknown feature names (with did-you-mean), latents out of range, relative thresholds and
clamps on features without ``max_activation``, probe steering without ``along_direction: true``,
and enforce rules whose condition cannot be false on the features' ranges (see
:func:`always_true_reasons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from monitor.policy.schema import AllOf, AnyOf, Leaf, Not, Rule, Steer
from monitor.policy.tree import Cond, children, walk_conditions
from monitor.yaml_source import Loc

if TYPE_CHECKING:
    from monitor.catalog import Catalog
    from monitor.policy.loader import PolicySet

Verdict = Literal["always", "never", "depends"]


def rule_problems(rule: Rule, catalog: Catalog | None, d_sae: int | None,
                  loc: Loc = ()) -> list[tuple[Loc, str]]:
    """Problems that need the catalog, the SAE width or feature ranges, as ``(path, text)``.

    Feature names are only checked when ``catalog`` is given, latent ranges only with ``d_sae``;
    a catalog feature's range is known only with the catalog (raw latents always).
    """
    out: list[tuple[Loc, str]] = []
    for where, leaf in walk_conditions(rule.when, (*loc, "when")):
        out += _target_problems(leaf.feature, leaf.latent, catalog, d_sae, where)
        if leaf.above_relative is not None and catalog is not None:
            entry = catalog.find(leaf.feature or "")
            if entry is not None and entry.max_activation is None:
                out.append(((*where, "above_relative"), f"feature '{entry.name}' has no "
                            "max_activation in the catalog; use an absolute 'above' or add "
                            "max_activation to the catalog"))
    for i, action in enumerate(rule.actions):
        if action.steer is not None:
            out += _steer_problems(action.steer, catalog, d_sae, (*loc, "actions", i, "steer"))
    if rule.mode == "enforce" and not rule.allow_always_true and not out:
        reasons = always_true_reasons(rule.when, catalog)
        if reasons:
            out.append(((*loc, "when"), (
                f"this condition holds on every monitored token whatever the model does "
                f"({'; '.join(reasons)}), so this enforce rule would act on every request. Fix "
                "the threshold, or add 'allow_always_true: true' to the rule if that is intended")))
    return out


def binding_problems(policy_set: PolicySet, catalog: Catalog | None, d_sae: int | None
                     ) -> list[str]:
    """Every problem binding ``policy_set`` to ``catalog`` and an SAE of ``d_sae`` latents would
    raise, as ``source: rule 'id': path: problem`` lines (empty when it binds).

    Without a catalog, feature names cannot be resolved and are reported; without ``d_sae``,
    latent ranges are not checked.
    """
    errors = []
    for rule, source in zip(policy_set.rules, policy_set.sources):
        problems = rule_problems(rule, catalog, d_sae)
        if catalog is None:
            names = names_used(rule)
            if names:
                problems.append((("when",), f"uses feature names ({', '.join(names)}) but no "
                                            "catalog was given to resolve them"))
        errors += [f"{source}: rule '{rule.id}': {render_loc(loc)}: {text}"
                   for loc, text in problems]
    return errors


def names_used(rule: Rule) -> list[str]:
    """Catalog feature names a rule reads or steers, sorted, without repeats."""
    names = [leaf.feature for _, leaf in walk_conditions(rule.when) if leaf.feature is not None]
    names += [a.steer.feature for a in rule.actions if a.steer is not None and a.steer.feature]
    return sorted(set(names))


def render_loc(loc: Loc) -> str:
    """``when.any[0].above`` for ``("when", "any", 0, "above")``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


# -------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class _Judged:
    verdict: Verdict
    reasons: tuple[str, ...]


def always_true_reasons(cond: Cond, catalog: Catalog | None) -> list[str]:
    """Why ``cond`` holds on every monitored token whatever the activations; empty if it can fail.

    SAE latents are never negative (every architecture sae-monitor reads ends in a ReLU, a
    JumpReLU or a top-k of ReLUs), so ``above: t`` with ``t < 0`` always holds and ``below: t``
    with ``t <= 0`` never does. A probe's score has no known range and proves nothing; a catalog
    feature counts only when ``catalog`` says it is a latent. An always-passing test keeps
    ``window_mean``, ``count_in_window`` with ``at_least: 1``, ``consecutive`` with
    ``tokens: 1`` and ``scope_mean`` with ``min_tokens: 1`` true from the first token (longer
    runs and larger ``min_tokens`` can still be false on short texts).
    ``any``/``all``/``not`` combine the verdicts (``not`` of a never-true test always holds).
    """
    judged = _judge(cond, catalog)
    return list(judged.reasons) if judged.verdict == "always" else []


def _judge(cond: Cond, catalog: Catalog | None) -> _Judged:
    if isinstance(cond, Leaf):
        return _judge_leaf(cond, catalog)
    kids = [_judge(child, catalog) for _, child in children(cond)]
    if isinstance(cond, Not):
        (kid,) = kids
        flipped: Verdict = {"always": "never", "never": "always"}.get(  # type: ignore[assignment]
            kid.verdict, "depends")
        return _Judged(flipped, kid.reasons)
    want: Verdict = "always" if isinstance(cond, AnyOf) else "never"
    decisive = [k for k in kids if k.verdict == want]
    if decisive:  # any: one always-true child; all: one never-true child
        return _Judged(want, decisive[0].reasons)
    other: Verdict = "never" if want == "always" else "always"
    if all(k.verdict == other for k in kids):
        return _Judged(other, tuple(r for k in kids for r in k.reasons))
    assert isinstance(cond, (AnyOf, AllOf))
    return _Judged("depends", ())


def _judge_leaf(leaf: Leaf, catalog: Catalog | None) -> _Judged:
    if leaf.latent is not None:
        what = f"latent {leaf.latent}"
    else:
        entry = catalog.find(leaf.feature or "") if catalog is not None else None
        if entry is None or entry.latent is None:
            return _Judged("depends", ())  # a probe, or not known yet
        what = f"feature '{entry.name}' (SAE latent {entry.latent})"
    agg = leaf.aggregate
    if leaf.below is not None and leaf.below <= 0:
        return _Judged("never", (f"{what} is never negative, so 'below: {leaf.below:g}' never "
                                 "holds",))
    if leaf.above is not None and leaf.above < 0:
        at_once = (agg.kind in ("each_token", "window_mean")
                   or (agg.kind == "count_in_window" and agg.at_least == 1)
                   or (agg.kind == "consecutive" and agg.tokens == 1)
                   or (agg.kind == "scope_mean" and agg.min_tokens == 1))
        if at_once:
            return _Judged("always", (f"{what} is never negative, so 'above: {leaf.above:g}' "
                                      "always holds",))
    return _Judged("depends", ())


def _target_problems(feature: str | None, latent: int | None, catalog: Catalog | None,
                     d_sae: int | None, where: Loc) -> list[tuple[Loc, str]]:
    out: list[tuple[Loc, str]] = []
    if feature is not None and catalog is not None:
        entry = catalog.find(feature)
        if entry is None:
            close = catalog.suggest(feature)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            out.append(((*where, "feature"), f"unknown feature '{feature}' (not in catalog for "
                                             f"SAE '{catalog.sae}'){hint}"))
        elif entry.latent is not None and d_sae is not None and entry.latent >= d_sae:
            out.append(((*where, "feature"), f"feature '{feature}' is latent {entry.latent} in "
                        f"the catalog, out of range for an SAE with {d_sae} latents"))
    if latent is not None and d_sae is not None and latent >= d_sae:
        out.append(((*where, "latent"), f"latent {latent} is out of range for an SAE with "
                                        f"{d_sae} latents (valid: 0..{d_sae - 1})"))
    return out


def _steer_problems(steer: Steer, catalog: Catalog | None, d_sae: int | None,
                    where: Loc) -> list[tuple[Loc, str]]:
    out = _target_problems(steer.feature, steer.latent, catalog, d_sae, where)
    entry = catalog.find(steer.feature) if catalog is not None and steer.feature else None
    if entry is None:
        return out
    if entry.probe is not None and not steer.along_direction:
        out.append(((*where, "feature"), f"feature '{entry.name}' is a linear probe, not an SAE "
                    "latent; steering it moves the residual along the probe direction. Add "
                    "'along_direction: true' to confirm"))
    if steer.clamp_relative is not None and entry.max_activation is None:
        out.append(((*where, "clamp_relative"), f"feature '{entry.name}' has no max_activation "
                    "in the catalog; use an absolute 'clamp' or add max_activation"))
    return out
