"""How a feature test combines tokens before firing (the ``aggregate:`` key of a policy file).

By default each token is tested on its own. The others look at more than one token; every one
counts only monitored tokens (not masked out), and the engine evaluates all of them vectorised
(:mod:`monitor.policy.kernels`)::

    aggregate: each_token                                 # the default
    aggregate: {window_mean: {tokens: 8}}                 # mean of the last 8 tokens
    aggregate: {count_in_window: {tokens: 20, at_least: 3}}  # 3 of the last 20 tokens pass
    aggregate: {consecutive: {tokens: 4}}                 # 4 tokens in a row pass
    aggregate: {scope_mean: {min_tokens: 8}}              # mean over the whole scope so far
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, model_validator

from monitor.policy.strict import Strict, one_of, shorthand

MAX_WINDOW = 4096
DEFAULT_MIN_TOKENS = 8


class EachToken(Strict):
    """Test every token on its own (the default)."""


class WindowMean(Strict):
    """Compare the mean activation over the last ``tokens`` monitored tokens with the threshold.

    Until ``tokens`` tokens have been seen the mean is over those seen so far, so short texts
    are still judged. Example: ``aggregate: {window_mean: {tokens: 8}}``.
    """

    tokens: int = Field(ge=1, le=MAX_WINDOW, description=(
        f"Window length in monitored tokens (1..{MAX_WINDOW})."))


class CountInWindow(Strict):
    """Fire when at least ``at_least`` of the last ``tokens`` monitored tokens pass the test.

    Example: ``aggregate: {count_in_window: {tokens: 20, at_least: 3}}``.
    """

    tokens: int = Field(ge=1, le=MAX_WINDOW, description=(
        f"Window length in monitored tokens (1..{MAX_WINDOW})."))
    at_least: int = Field(ge=1, description="How many tokens in the window must pass (<= tokens).")

    @model_validator(mode="after")
    def _fits(self) -> CountInWindow:
        if self.at_least > self.tokens:
            raise ValueError(f"at_least ({self.at_least}) cannot exceed tokens ({self.tokens}); "
                             "a window can never hold more passing tokens than its length")
        return self


class Consecutive(Strict):
    """Fire when the last ``tokens`` monitored tokens all pass the test.

    Example: ``aggregate: {consecutive: {tokens: 4}}``.
    """

    tokens: int = Field(ge=1, le=MAX_WINDOW, description=(
        f"Run length in monitored tokens (1..{MAX_WINDOW})."))


class ScopeMean(Strict):
    """Compare the mean activation over **every** monitored token of the scope so far (the whole
    prompt, or the whole response up to this token) with the threshold.

    The deployable form of a probe fitted on mean-pooled activations: the engine keeps a running
    sum and count per row, so the cost does not grow with the text. It cannot fire before
    ``min_tokens`` monitored tokens (a mean over one or two tokens is noise); a NaN activation
    makes the test fail for the rest of the scope. Example:
    ``aggregate: {scope_mean: {min_tokens: 8}}`` (or the bare word ``aggregate: scope_mean``).
    """

    min_tokens: int = Field(default=DEFAULT_MIN_TOKENS, ge=1, le=MAX_WINDOW, description=(
        f"Monitored tokens needed before the test may fire (1..{MAX_WINDOW}, default "
        f"{DEFAULT_MIN_TOKENS})."))


AGGREGATIONS = ("each_token", "window_mean", "count_in_window", "consecutive", "scope_mean")


class Aggregate(Strict):
    """How tokens are combined before firing: exactly one of the five keys.

    ``each_token`` and ``scope_mean`` may also be written as bare words
    (``aggregate: each_token``).
    """

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    each_token: EachToken | None = Field(
        default=None, description="Test every token on its own.")
    window_mean: WindowMean | None = Field(
        default=None, description="Mean over the last N monitored tokens.")
    count_in_window: CountInWindow | None = Field(
        default=None, description="At least k of the last N monitored tokens.")
    consecutive: Consecutive | None = Field(
        default=None, description="N monitored tokens in a row.")
    scope_mean: ScopeMean | None = Field(
        default=None, description="Mean over every monitored token of the scope so far.")

    @model_validator(mode="before")
    @classmethod
    def _bare_word(cls, value: Any) -> Any:
        return shorthand(value, ("each_token", "scope_mean"))

    @model_validator(mode="after")
    def _exactly_one(self) -> Aggregate:
        one_of(self, AGGREGATIONS, "aggregate")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        return {"anyOf": [{"type": "string", "enum": ["each_token", "scope_mean"]}, schema],
                "description": cls.__doc__.split("\n")[0] if cls.__doc__ else ""}

    @property
    def kind(self) -> str:
        """``each_token`` | ``window_mean`` | ``count_in_window`` | ``consecutive`` |
        ``scope_mean``."""
        return one_of(self, AGGREGATIONS, "aggregate")

    @property
    def tokens(self) -> int:
        """Window or run length (1 for each_token and scope_mean)."""
        inner = getattr(self, self.kind)
        return int(getattr(inner, "tokens", 1))

    @property
    def at_least(self) -> int:
        """For count_in_window, the required count; otherwise 1."""
        return self.count_in_window.at_least if self.count_in_window is not None else 1

    @property
    def min_tokens(self) -> int:
        """For scope_mean, the monitored tokens needed before it may fire; otherwise 1."""
        return self.scope_mean.min_tokens if self.scope_mean is not None else 1
