"""``Monitor.generate``: the unwrapped model's contract, under policy.

Same arguments and return type as ``model.generate``: ``input_ids`` positionally, as
``input_ids=`` or as ``inputs=``; ``return_dict_in_generate`` from the call, from a
``generation_config`` or from the model's config; ``num_return_sequences`` (every returned
sequence is its own monitored row); a caller's ``streamer`` receives only released tokens.
Beam search is refused: beams are reordered at every step, so a row's monitoring state would
follow the wrong hypothesis.
"""

from __future__ import annotations

import copy
import inspect
import time
from typing import TYPE_CHECKING, Any

import torch

from monitor.errors import MonitorError
from monitor.runtime.hf_request import CURRENT, HFRequest
from monitor.runtime.outputs import align_step_outputs, cut_sequences
from monitor.runtime.stream import HoldingStreamer

if TYPE_CHECKING:
    from monitor.runtime.hf import Monitor


class StopRows:
    """A transformers ``StoppingCriteria`` that ends the rows the session stopped."""

    def __init__(self, request: HFRequest) -> None:
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.request.session.stopped.clone().to(input_ids.device)


def _setting(name: str, kwargs: dict[str, Any], model: Any) -> Any:
    """A generation setting as ``generate`` resolves it: call kwarg, the call's
    ``generation_config``, then the model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return None


def monitored_generate(monitor: Monitor, args: tuple, kwargs: dict[str, Any]) -> Any:
    started = time.perf_counter()
    model = monitor.model
    input_ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(input_ids, torch.Tensor):
        raise MonitorError("monitored generate needs token ids (positionally, as input_ids= or inputs=)")
    if (_setting("num_beams", kwargs, model) or 1) > 1:
        raise MonitorError("monitored generate does not support beam search (num_beams > 1): beams are "
                           "reordered every step, so per-row monitoring would follow the wrong hypothesis; "
                           "use greedy or sampling (num_return_sequences works with do_sample=True)")
    copies = int(_setting("num_return_sequences", kwargs, model) or 1)
    prompt_len = input_ids.shape[1]
    attention = kwargs.get("attention_mask")
    request = monitor._request(input_ids.shape[0] * copies,
                               attention.repeat_interleave(copies, dim=0) if attention is not None and copies > 1
                               else attention)
    limit = _setting("max_new_tokens", kwargs, model)
    max_width = prompt_len + int(limit) if limit is not None else int(_setting("max_length", kwargs, model) or 1 << 30)
    wants_dict = bool(_setting("return_dict_in_generate", kwargs, model))
    holder = HoldingStreamer(kwargs["streamer"], request) if kwargs.get("streamer") is not None else None
    if holder is not None:
        kwargs["streamer"] = holder
    try:
        out = run_generate(monitor, request, kwargs, args)
    except BaseException:
        if holder is not None:
            holder.inner.end()
        raise
    session = request.session
    encode = _encoder(monitor.tokenizer)
    if holder is not None:
        holder.close(session.report, encode, with_message=monitor.block_behavior == "replace")
    report = monitor.deliver(session, started)
    if report.blocks:
        pad = monitor.tokenizer.pad_token_id if monitor.tokenizer.pad_token_id is not None else 0
        out.sequences, written_from = cut_sequences(out.sequences, prompt_len, report.blocks, session.block_position,
                                                    encode, pad, max(max_width, prompt_len))
        align_step_outputs(out, out.sequences, prompt_len, written_from)
    return out if wants_dict else out.sequences


def _encoder(tokenizer: Any) -> Any:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _force_dict_output(kwargs: dict[str, Any]) -> None:
    """Ask ``generate`` for its dict output (the KV cache checks the last token), in the
    call's ``generation_config`` when there is one (mixing both is deprecated)."""
    if kwargs.get("generation_config") is not None:
        config = copy.deepcopy(kwargs["generation_config"])
        config.return_dict_in_generate = True
        kwargs["generation_config"] = config
        kwargs.pop("return_dict_in_generate", None)
    else:
        kwargs["return_dict_in_generate"] = True


def run_generate(monitor: Monitor, request: HFRequest, kwargs: dict[str, Any], args: tuple = ()) -> Any:
    """The model's own ``generate`` with the request current and its rows stoppable, then the
    last generated token evaluated."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList(list(kwargs.pop("stopping_criteria", None) or []))
    criteria.append(StopRows(request))
    _force_dict_output(kwargs)
    token = CURRENT.set(request)
    try:
        with torch.no_grad(), request.layer_hooks(monitor.model):  # probes at earlier layers
            out = monitor._model_generate(*args, stopping_criteria=criteria, **kwargs)
            evaluate_last_token(monitor, request, out)
    finally:
        CURRENT.reset(token)
    return out


def evaluate_last_token(monitor: Monitor, request: HFRequest, out: Any) -> None:
    """Feed the final generated token once more (one cached decode step) so that its
    activations are checked too; generate itself never feeds it back."""
    sequences = out.sequences
    length = sequences.shape[1]
    session = request.session
    if session.disabled or session.refused or length <= request.positions_done or bool(session.stopped.all()):
        return
    full_mask = request.extend_attention_mask(length)
    # transformers >= 5.3x names the output's KV cache `cache` (`past_key_values` warns)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    model = monitor.model
    if cache is not None and request.positions_done == length - 1:
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(input_ids=sequences[:, -1:], attention_mask=full_mask, **{name: cache},
              cache_position=torch.tensor([length - 1]), use_cache=True)
    else:  # no cache: a teacher-forced pass; recomputed positions replay their edits
        request.positions_done = length - 1
        model(input_ids=sequences, attention_mask=full_mask, use_cache=False)

