"""Reading and editing the residual stream of a Hugging Face decoder model.

This is the first stage of the pipeline (hook -> SAE encode -> policy engine -> actions). A hook
sits on one decoder block and hands the residual stream at that block to a callback:

* ``resid_post`` (the default): the block's output, i.e. ``hidden_states[layer + 1]``;
* ``resid_pre``: the block's input, i.e. ``hidden_states[layer]``.

The callback sees exactly the positions the model computes in that forward pass. Under
``model.generate`` with a KV cache that is the whole prompt at prefill and one new position per
decode step, so a monitor sees every token once. The callback may edit the tensor in place or
return a replacement; that is how steering is applied. Removing the hook restores the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from monitor.errors import UnsupportedModelError

Site = Literal["resid_post", "resid_pre"]
ResidualCallback = Callable[[torch.Tensor], "torch.Tensor | None"]

# Attribute paths to the list of decoder blocks, tried in order. Covers llama, mistral, qwen2,
# gemma, gemma2, phi3 (model.layers), gpt2 (transformer.h), gpt_neox (gpt_neox.layers), opt
# (model.decoder.layers) and multimodal wrappers (model.language_model.layers).
BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "transformer.layers",
    "layers",
)


@dataclass(frozen=True)
class HookPoint:
    """Where in the model an SAE reads: block ``layer`` (0-based), ``site`` of that block."""

    layer: int
    site: Site = "resid_post"

    @property
    def name(self) -> str:
        """The SAELens / TransformerLens spelling, e.g. ``blocks.15.hook_resid_post``."""
        return f"blocks.{self.layer}.hook_{self.site}"

    @classmethod
    def parse(cls, hook_name: str) -> HookPoint:
        """Parse ``blocks.L.hook_resid_post`` / ``blocks.L.hook_resid_pre`` (also ``model.layers.L``)."""
        parts = hook_name.split(".")
        try:
            layer = int(next(p for p in parts if p.isdigit()))
        except StopIteration:
            raise ValueError(f"hook name {hook_name!r} names no layer number") from None
        site: Site = "resid_pre" if hook_name.endswith("resid_pre") else "resid_post"
        return cls(layer, site)


def resolve_path(root: Any, path: str) -> Any:
    """``root.a.b.c`` for ``path`` "a.b.c", or None where an attribute is missing."""
    node = root
    for attr in path.split("."):
        node = getattr(node, attr, None)
        if node is None:
            return None
    return node


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the model's list of decoder blocks, or raise naming every path searched."""
    for path in BLOCK_PATHS:
        node = resolve_path(model, path)
        if isinstance(node, nn.ModuleList) and len(node) > 0:
            return node
    raise UnsupportedModelError(
        f"cannot find the decoder blocks of {type(model).__name__}: searched "
        + ", ".join(BLOCK_PATHS)
        + ". Add the attribute path of its nn.ModuleList of blocks to monitor.capture.BLOCK_PATHS."
    )


def num_layers(model: nn.Module) -> int:
    return len(find_blocks(model))


def _block(model: nn.Module, point: HookPoint) -> nn.Module:
    blocks = find_blocks(model)
    if not 0 <= point.layer < len(blocks):
        raise UnsupportedModelError(
            f"layer {point.layer} does not exist: {type(model).__name__} has {len(blocks)} blocks "
            f"(0..{len(blocks) - 1})."
        )
    return blocks[point.layer]


@contextmanager
def residual_hook(model: nn.Module, point: HookPoint, callback: ResidualCallback) -> Iterator[None]:
    """Call ``callback(resid)`` with the residual ``[batch, new_positions, d_model]`` at ``point``.

    If the callback returns a tensor, it replaces the residual; it may also edit it in place.
    The hook is removed on exit, even on error.
    """
    block = _block(model, point)
    if point.site == "resid_post":

        def post_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            replaced = callback(hidden)
            if replaced is None:
                return None
            if isinstance(output, tuple):
                return (replaced, *output[1:])
            return replaced

        handle = block.register_forward_hook(post_hook)
    else:

        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                replaced = callback(args[0])
                return None if replaced is None else ((replaced, *args[1:]), kwargs)
            replaced = callback(kwargs["hidden_states"])
            return None if replaced is None else (args, {**kwargs, "hidden_states": replaced})

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised inside a hook to stop the forward pass once the wanted layers have run."""


@torch.no_grad()
def forward_through(model: nn.Module, callbacks: Mapping[HookPoint, ResidualCallback],
                    **model_inputs: Any) -> None:
    """Run ``model(**model_inputs)`` with ``callbacks`` hooked at their points, and stop the
    forward pass right after the deepest one: layers above it cost nothing.

    Used by every whole-text reader (capture, extraction, discovery, self-test).
    """
    if not callbacks:
        raise ValueError("forward_through needs at least one hook point")
    deepest = max(callbacks, key=lambda p: (p.layer, p.site == "resid_post"))
    ran: set[HookPoint] = set()

    def wrap(point: HookPoint, callback: ResidualCallback) -> ResidualCallback:
        def hook(resid: torch.Tensor) -> torch.Tensor | None:
            replaced = callback(resid)
            ran.add(point)
            if point == deepest:
                raise _StopForward
            return replaced
        return hook

    with ExitStack() as stack:
        for point, callback in callbacks.items():
            stack.enter_context(residual_hook(model, point, wrap(point, callback)))
        try:
            model(**model_inputs, use_cache=False)
        except _StopForward:
            pass
    missing = set(callbacks) - ran
    if missing:
        raise UnsupportedModelError(
            "the hook at " + ", ".join(sorted(p.name for p in missing)) + " never ran during the forward pass")


def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    point: HookPoint,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual ``[batch, seq, d_model]`` at ``point`` for a plain forward over whole texts."""
    captured: list[torch.Tensor] = []
    forward_through(model, {point: lambda resid: captured.append(resid.detach().clone())},
                    input_ids=input_ids, attention_mask=attention_mask)
    return captured[0]
