"""The policy file format: typed, frozen, strict models with a description on every field.

A policy file is YAML written by people who are not necessarily programmers, so the shape is
plain English keys, one idea per key, and every mistake is an error (``extra="forbid"``): a
misspelled ``abvoe:`` must never be ignored silently. ``policies/schema.json`` is generated
from these models (:func:`write_json_schema`) for editor completion.

Example (the whole format)::

    version: "2025-01-15"              # your label for this file; shows up in audit logs
    rules:
      - id: shell_injection.block
        description: Refuse to write shell commands built from user input
        severity: high                 # info | low | medium | high | critical
        mode: enforce                  # enforce (default) | shadow: report only, never act
        scope: response                # prompt | response | both (default)
        when:                          # a condition, see below
          feature: unsafe_code.shell_injection
          above: 4.0
        actions:
          - log
          - metric
          - block: {message: "I can't help with that."}

Conditions. A *feature test* reads one column and compares it with a threshold::

    when: {feature: deception.lying, above: 2.5}          # a catalog name ...
    when: {latent: 4711, below: 0.1}                      # ... or a raw SAE latent
    when: {feature: deception.lying, above_relative: 0.5} # 50% of the catalog's max_activation

By default each token is tested on its own. ``aggregate`` looks at more tokens instead (only
monitored tokens count, i.e. not masked out; see :mod:`monitor.policy.aggregates`)::

    when:
      feature: toxicity.insult
      above: 1.0
      aggregate: {window_mean: {tokens: 8}}                # mean of the last 8 tokens > 1.0
      # aggregate: {count_in_window: {tokens: 20, at_least: 3}}  # 3 of the last 20 tokens > 1.0
      # aggregate: {consecutive: {tokens: 4}}                # 4 tokens in a row > 1.0
      # aggregate: {scope_mean: {min_tokens: 8}}             # mean over the whole scope > 1.0
      # aggregate: each_token                                # the default

Feature tests combine with ``any`` (at least one), ``all`` (every one) and ``not``::

    when:
      all:
        - {feature: unsafe_code.shell_injection, above: 4.0}
        - not: {feature: context.security_training, above: 1.0}
        - any:
            - {latent: 4711, above: 3.0}
            - {latent: 99, above: 3.0, aggregate: {consecutive: {tokens: 2}}}

Actions are a list; the simple ones are bare words, the others take options::

    actions:
      - log                                     # structured log event
      - metric                                  # Prometheus counter
      - alert                                   # alert channel
      - block: {message: "I can't help with that."}
      - steer:
          feature: unsafe_code.shell_injection  # or latent: 4711
          clamp: 0.0                            # set activation to 0 ...
          # clamp_relative: 0.1                 # ... or to 10% of max_activation
          # scale: 0.5                          # ... or multiply it by 0.5
          duration: while_active                # or rest_of_response

Steering a *probe* feature moves the residual along the probe direction rather than an SAE
decoder row; that must be asked for explicitly with ``along_direction: true``.

A condition that holds on every monitored token whatever the model does is almost always a
mistake: SAE latents are never negative, so ``{latent: 4711, above: -5}`` is always true, and an
``enforce`` rule would block or steer every request. Such a rule is refused with the reason (see
:mod:`monitor.policy.checks`; SAE latents only, a probe's score has no known range) unless the
rule says ``allow_always_true: true``. A condition that can never be true does no harm.
Numbers are numbers: ``latent: true`` is refused, not read as latent 1. To walk a condition
tree use :mod:`monitor.policy.tree`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      WithJsonSchema, model_validator)

from monitor.catalog import FEATURE_NAME_PATTERN
from monitor.policy.aggregates import (AGGREGATIONS, MAX_WINDOW, Aggregate,  # noqa: F401 (re-exported)
                                      Consecutive, CountInWindow, EachToken, ScopeMean, WindowMean)
from monitor.policy.strict import Strict, one_of, shorthand

Severity = Literal["info", "low", "medium", "high", "critical"]
Mode = Literal["enforce", "shadow"]
Scope = Literal["prompt", "response", "both"]
Duration = Literal["rest_of_response", "while_active"]
MAX_RELATIVE = 10.0
RULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
SIMPLE_ACTIONS = ("log", "metric", "alert")
COMBINATORS = ("any", "all", "not")


# -------------------------------------------------------------------------------- conditions

COMPARISONS = ("above", "below", "above_relative")


class Leaf(Strict):
    """A feature test: one column (catalog ``feature`` or raw ``latent``) against a threshold.

    ``{feature: deception.lying, above: 2.5}`` fires on tokens whose activation is > 2.5;
    ``below`` fires on < ; ``above_relative: 0.5`` means above 0.5 x the catalog's
    ``max_activation`` for that feature (catalog features only).
    """

    feature: str | None = Field(default=None, pattern=FEATURE_NAME_PATTERN,
                                                description="Catalog feature name to read.")
    latent: int | None = Field(default=None, ge=0,
                                               description="Raw SAE latent index to read.")
    above: float | None = Field(
        default=None, description="Fire when the value is strictly greater than this.")
    below: float | None = Field(
        default=None, description="Fire when the value is strictly less than this.")
    above_relative: float | None = Field(
        default=None, gt=0, le=MAX_RELATIVE, description=(
            "Fire when the value is greater than this fraction of the feature's catalog "
            f"max_activation (0 < x <= {MAX_RELATIVE:g})."))
    aggregate: Aggregate = Field(default_factory=lambda: Aggregate(each_token=EachToken()),
                                 description="How recent tokens are combined (default each_token).")

    @model_validator(mode="after")
    def _complete(self) -> Leaf:
        one_of(self, ("feature", "latent"), "a feature test reads one column")
        which = one_of(self, COMPARISONS, "a feature test needs one threshold")
        if which == "above_relative" and self.feature is None:
            raise ValueError("above_relative needs a catalog 'feature' (it scales the feature's "
                             "max_activation); with a raw latent use 'above'")
        return self

    @property
    def comparison(self) -> str:
        """``above`` | ``below`` | ``above_relative``."""
        return one_of(self, COMPARISONS, "threshold")

    @property
    def label(self) -> str:
        """The feature name, or ``latent:N``."""
        return self.feature if self.feature is not None else f"latent:{self.latent}"


class AnyOf(Strict):
    """Fires when at least one of the listed conditions fires."""

    any: tuple[Condition, ...] = Field(min_length=1, description="At least one must hold.")


class AllOf(Strict):
    """Fires when every listed condition fires on the same token."""

    all: tuple[Condition, ...] = Field(min_length=1, description="Every one must hold.")


class Not(Strict):
    """Fires on monitored tokens where the inner condition does not."""

    not_: Condition = Field(alias="not", description="The condition that must not hold.")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {Leaf: "leaf", AnyOf: "any", AllOf: "all", Not: "not"}.get(type(value))
    if not isinstance(value, dict):
        return None
    combos = [k for k in COMBINATORS if k in value]
    if not combos:
        return "leaf"
    if len(combos) > 1 or len(value) > 1:
        return None
    return combos[0]


Condition = Annotated[
    Union[Annotated[Leaf, Tag("leaf")], Annotated[AnyOf, Tag("any")],
          Annotated[AllOf, Tag("all")], Annotated[Not, Tag("not")]],
    Discriminator(_condition_kind, custom_error_type="condition_shape", custom_error_message=(
        "a condition is either a feature test ('feature' or 'latent' plus 'above', 'below' or "
        "'above_relative') or a mapping with exactly one key 'any', 'all' or 'not'; "
        "to combine them, nest them in a list under 'any' or 'all'"))]

for _m in (AnyOf, AllOf, Not):
    _m.model_rebuild()


# -------------------------------------------------------------------------------- actions


class NoOptions(Strict):
    """This action takes no options (yet); write it as a bare word."""


class Block(Strict):
    """Stop generating for this request and return ``message`` instead."""

    message: str = Field(min_length=1, description="Text returned to the user instead.")


STEER_OPS = ("clamp", "clamp_relative", "scale")


class Steer(Strict):
    """Change a feature's activation in the residual stream.

    The wrapper applies ``residual += (target - a) * direction``, where ``a`` is the current
    activation and ``direction`` the SAE decoder row (or the probe direction).
    """

    feature: str | None = Field(default=None, pattern=FEATURE_NAME_PATTERN,
                                                description="Catalog feature to steer.")
    latent: int | None = Field(default=None, ge=0,
                                               description="Raw SAE latent to steer.")
    clamp: float | None = Field(
        default=None, description="Set the activation to this value.")
    clamp_relative: float | None = Field(
        default=None, ge=-MAX_RELATIVE, le=MAX_RELATIVE, description=(
            "Set the activation to this multiple of the feature's catalog max_activation."))
    scale: float | None = Field(
        default=None, description="Multiply the activation by this factor (0 removes it).")
    duration: Duration = Field(default="while_active", description=(
        "while_active: only while the rule's condition holds (re-checked every token); "
        "rest_of_response: from the first firing until the request ends."))
    along_direction: bool = Field(default=False, description=(
        "Required (true) to steer a probe feature: the residual moves along the probe "
        "direction. For SAE latents the decoder row is always used."))

    @model_validator(mode="after")
    def _complete(self) -> Steer:
        one_of(self, ("feature", "latent"), "steer needs one target")
        op = one_of(self, STEER_OPS, "steer needs one operation")
        if op == "clamp_relative" and self.feature is None:
            raise ValueError("clamp_relative needs a catalog 'feature' (it scales the feature's "
                             "max_activation); with a raw latent use 'clamp'")
        return self

    @property
    def op(self) -> str:
        """``clamp`` | ``clamp_relative`` | ``scale`` as written."""
        return one_of(self, STEER_OPS, "steer")


ACTIONS = ("log", "metric", "alert", "block", "steer")


class Action(Strict):
    """One action: a bare word (``log``, ``metric``, ``alert``) or ``block:`` / ``steer:``."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    log: NoOptions | None = Field(
        default=None, description="Emit a structured log event.")
    metric: NoOptions | None = Field(
        default=None, description="Count the firing in Prometheus metrics.")
    alert: NoOptions | None = Field(
        default=None, description="Send to the alert channel.")
    block: Block | None = Field(
        default=None, description="Stop the response (enforce mode only).")
    steer: Steer | None = Field(
        default=None, description="Steer a feature (enforce mode only).")

    @model_validator(mode="before")
    @classmethod
    def _bare_word(cls, value: Any) -> Any:
        return shorthand(value, SIMPLE_ACTIONS)

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        one_of(self, ACTIONS, "an action")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        return {"anyOf": [{"type": "string", "enum": list(SIMPLE_ACTIONS)}, schema],
                "description": cls.__doc__ or ""}

    @property
    def kind(self) -> str:
        """``log`` | ``metric`` | ``alert`` | ``block`` | ``steer``."""
        return one_of(self, ACTIONS, "an action")


# -------------------------------------------------------------------------------- rules


def _number_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Rule(Strict):
    """One rule: when ``when`` fires in ``scope``, take ``actions``."""

    id: str = Field(pattern=RULE_ID_PATTERN, description=(
        "Unique id across all loaded policy files, e.g. 'shell_injection.block'."))
    description: str = Field(min_length=1, description="What the rule is for, for people.")
    severity: Severity = Field(description="info | low | medium | high | critical.")
    mode: Mode = Field(default="enforce", description=(
        "enforce: take every action; shadow: evaluate and report, but never block or steer."))
    scope: Scope = Field(default="both", description=(
        "Which tokens are checked: the prompt, the generated response, or both."))
    when: Condition = Field(description="The condition that makes the rule fire.")
    actions: tuple[Action, ...] = Field(min_length=1, description="What to do when it fires.")
    allow_always_true: bool = Field(default=False, description=(
        "Accept a condition that holds on every monitored token whatever the activations "
        "(e.g. 'above: -5' on an SAE latent, which is never negative). Without it such an "
        "enforce rule is refused, because it would block or steer every request."))


class PolicyFile(Strict):
    """A policy file: a version label and a list of rules."""

    model_config = ConfigDict(title="sae-monitor policy file")

    version: Annotated[str, BeforeValidator(_number_to_str),
                       WithJsonSchema({"type": ["string", "number"]})] = Field(
        min_length=1, description=(
            "Your label for this version of the file (e.g. '2025-01-15' or '1.2'); recorded "
            "with every decision for audit."))
    rules: tuple[Rule, ...] = Field(default=(), description="The rules of this file.")
