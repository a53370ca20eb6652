"""The one walk over a condition tree (``any`` / ``all`` / ``not`` over feature tests).

Every module that needs the feature tests of a rule uses these functions, so the shape of the
tree is known in one place: the loader's checks (:mod:`monitor.policy.checks`), the compiler
(:mod:`monitor.policy.compile`) and the policy-test diagnostics. Code that needs thresholds as
bound to a catalog should read :attr:`monitor.policy.CompiledRule.leaves` instead of walking the
written rule.
"""

from __future__ import annotations

from collections.abc import Iterator

from monitor.policy.schema import AllOf, AnyOf, Leaf, Not
from monitor.yaml_source import Loc

Cond = Leaf | AnyOf | AllOf | Not
"""A validated condition node (what :data:`Condition` fields hold)."""


def children(cond: Cond) -> tuple[tuple[Loc, Cond], ...]:
    """The direct sub-conditions of ``cond``, each with the path step to it in the YAML data
    (``("any", 0)``, ``("all", 2)``, ``("not",)``); empty for a feature test."""
    if isinstance(cond, AnyOf):
        return tuple((("any", i), c) for i, c in enumerate(cond.any))
    if isinstance(cond, AllOf):
        return tuple((("all", i), c) for i, c in enumerate(cond.all))
    if isinstance(cond, Not):
        return ((("not",), cond.not_),)
    return ()


def walk_conditions(cond: Cond, loc: Loc = ()) -> Iterator[tuple[Loc, Leaf]]:
    """Every feature test inside ``cond``, depth first in file order, with its path.

    ``loc`` is the path of ``cond`` itself (e.g. ``("rules", 2, "when")``); each leaf's path
    extends it, so a located error can point at the leaf. This is the one walk over the tree:
    the loader's checks, the compiler and the test-case diagnostics all use it (and
    :func:`is_negated` on the path tells whether a leaf sits under an odd number of ``not``).
    """
    if isinstance(cond, Leaf):
        yield loc, cond
        return
    for step, child in children(cond):
        yield from walk_conditions(child, (*loc, *step))


def leaves(cond: Cond) -> list[Leaf]:
    """Every feature test inside ``cond``, depth first (:func:`walk_conditions` without paths)."""
    return [leaf for _, leaf in walk_conditions(cond)]


def is_negated(loc: Loc) -> bool:
    """True when the condition at path ``loc`` sits under an odd number of ``not``."""
    return sum(1 for step in loc if step == "not") % 2 == 1
