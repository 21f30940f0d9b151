"""Generation at run time: the decoding loop over the graphs the compiler built (peftc.decoder), with HF generate's
semantics for the options it supports.

    generate(steps, layout, input_ids, attention_mask, config, ...)
        cache  = layout.allocate(B, P + new)                  this call's own tensors, dropped when it returns
        logits = steps.prefill(prompt, positions, padding, slots 0..P-1, cache)
        loop:  scores = processors(ids, logits[:, -1].float())          transformers' own logits processors
               next = argmax(scores) | multinomial(softmax(scores), generator)
               rows that ended (EOS) get pad; streamer.put(next); stop when every row ended or at max length
               logits = steps.decode(next, its position, padding, its slot, cache)

Positions are HF's (`attention_mask.cumsum(-1) - 1`, 1 on padding), so left-padded rows generate what they would
alone; token selection is HF's (`torch.multinomial` on the softmax of the processed float32 scores), so with the
same seed sampling draws what transformers' generate draws.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable

import torch

from .errors import GenerationError, InputError

# GenerationConfig fields peftc's loop honours (the rest must keep transformers' defaults)
SUPPORTED = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
             "top_p", "min_p", "typical_p", "repetition_penalty", "eos_token_id", "pad_token_id")
DEFAULT_NEW_TOKENS = 20     # transformers' generate, with no max_length or max_new_tokens set anywhere
# fields that do not change what greedy or sampled decoding computes
NEUTRAL = ("bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "use_cache",
           "cache_implementation", "cache_config", "compile_config", "disable_compile", "return_legacy_cache",
           "output_attentions", "output_hidden_states", "is_assistant", "num_assistant_tokens",
           "num_assistant_tokens_schedule", "assistant_confidence_threshold", "prefill_chunk_size", "trust_remote_code",
           "_commit_hash", "generation_kwargs")


@dataclasses.dataclass
class Steps:
    """The two graph calls of one generate call: prefill(ids, positions, padding, slots, cache) and the same for
    decode, each returning the last position's logits [B, 1, V]; routes already bound (this call's own data)."""

    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]

    @staticmethod
    def call(graph: Callable, route: list) -> Callable[..., torch.Tensor]:
        """`graph` (decoder.flat_graph's convention: the cache's tensors, then the route's, as positional inputs)
        called as a step: step(ids, positions, padding, slots, cache)."""
        def step(ids, positions, padding, slots, cache):
            return graph(ids, positions, padding, slots, *cache, *route)
        return step


def resolve_config(default: Any, generation_config: Any, kwargs: dict) -> Any:
    """The GenerationConfig of one call, as transformers' generate resolves it: `generation_config` (or an empty
    one), its unset (None) fields from the model's `default`, then from transformers' global defaults (top_k=50,
    ...), then `kwargs` over all; an option peftc's loop does not honour is a GenerationError naming it. A length
    left at transformers' default (no max_length anywhere) is max_length=None: 20 new tokens (new_token_count)."""
    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise GenerationError(f"generation_config must be a transformers GenerationConfig, got "
                              f"{type(generation_config).__name__}")
    unknown = sorted(k for k in kwargs if k not in SUPPORTED and k not in NEUTRAL)
    if unknown:
        raise GenerationError(f"generate got option(s) peftc does not support: {unknown}; supported: "
                              f"{list(SUPPORTED)} and adapter_names, attention_mask, generation_config, generator, "
                              "streamer (for others, generate with transformers from a merged export: "
                              "peftc.export_merged(pm, directory))")
    gc = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if default is not None:
        gc.update(**default.to_dict(), defaults_only=True, allow_custom_entries=True)
    default_length = kwargs.get("max_length") is None and gc.max_length is None
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    gc.update(**defaults, defaults_only=True)
    try:
        gc.update(**kwargs)                 # transformers validates the values here
    except ValueError as e:
        raise GenerationError(f"generate got an invalid option: {e}") from e
    if default_length:
        gc.max_length = None
    changed = sorted(k for k, v in gc.to_diff_dict().items()
                     if k not in SUPPORTED and k not in NEUTRAL and not (k in defaults and v == defaults[k]))
    if changed:
        raise GenerationError(f"the generation config sets {changed}, which peftc's generate does not support "
                              f"(supported: {list(SUPPORTED)}); set them to their defaults, or generate with "
                              "transformers from a merged export (peftc.export_merged)")
    _check_values(gc)
    return gc


def _check_values(gc) -> None:
    def bad(name, want):
        raise GenerationError(f"{name}={getattr(gc, name)!r}: expected {want}")

    if gc.max_new_tokens is not None and (not isinstance(gc.max_new_tokens, int) or gc.max_new_tokens < 1):
        bad("max_new_tokens", "an int >= 1")
    if gc.do_sample:
        if gc.temperature is not None and not gc.temperature > 0:
            bad("temperature", "a float > 0")
        if gc.top_p is not None and not 0 < gc.top_p <= 1:
            bad("top_p", "a float in (0, 1]")
        if gc.top_k is not None and (not isinstance(gc.top_k, int) or gc.top_k < 0):
            bad("top_k", "an int >= 0")
    if gc.repetition_penalty is not None and not gc.repetition_penalty > 0:
        bad("repetition_penalty", "a float > 0")


def _eos_ids(gc, device) -> torch.Tensor | None:
    eos = gc.eos_token_id
    if eos is None:
        return None
    eos = [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(eos, device=device, dtype=torch.long) if eos else None


def processors(gc, prompt_len: int, attention_mask: torch.Tensor, eos: torch.Tensor | None):
    """transformers' logits processors for `gc`, in the order its generate applies them."""
    from transformers.generation import logits_process as lp

    out = lp.LogitsProcessorList()
    dev = attention_mask.device
    if gc.repetition_penalty is not None and gc.repetition_penalty != 1.0:
        kw = {}
        if "prompt_ignore_length" in inspect.signature(lp.RepetitionPenaltyLogitsProcessor).parameters:
            kw["prompt_ignore_length"] = (attention_mask != 0).int().argmax(dim=1)
        out.append(lp.RepetitionPenaltyLogitsProcessor(gc.repetition_penalty, **kw))
    if eos is not None and gc.min_length is not None and gc.min_length > 0:
        out.append(lp.MinLengthLogitsProcessor(gc.min_length, eos, device=dev))
    if eos is not None and gc.min_new_tokens is not None and gc.min_new_tokens > 0:
        out.append(lp.MinNewTokensLengthLogitsProcessor(prompt_len, gc.min_new_tokens, eos, device=dev))
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            out.append(lp.TemperatureLogitsWarper(gc.temperature))
        if gc.top_k is not None and gc.top_k != 0:
            out.append(lp.TopKLogitsWarper(top_k=gc.top_k, min_tokens_to_keep=1))
        if gc.top_p is not None and gc.top_p < 1.0:
            out.append(lp.TopPLogitsWarper(top_p=gc.top_p, min_tokens_to_keep=1))
        if gc.min_p is not None:
            out.append(lp.MinPLogitsWarper(min_p=gc.min_p, min_tokens_to_keep=1))
        if gc.typical_p is not None and gc.typical_p < 1.0:
            out.append(lp.TypicalLogitsWarper(mass=gc.typical_p, min_tokens_to_keep=1))
    return out


def new_token_count(gc, prompt_len: int, limit: int | None) -> int:
    """How many tokens at most this call adds (max_new_tokens, else max_length minus the prompt), checked against
    the model's position limit."""
    if gc.max_new_tokens is not None:
        new = gc.max_new_tokens
    elif gc.max_length is None:     # transformers' default length: 20 new tokens, within the model's positions
        new = DEFAULT_NEW_TOKENS if limit is None else min(DEFAULT_NEW_TOKENS, limit - prompt_len)
        if new < 1:
            raise GenerationError(f"the prompt has {prompt_len} tokens, as many as the model's limit of {limit} "
                                  "positions (max_position_embeddings) allows; shorten the prompt")
    else:
        new = gc.max_length - prompt_len
        if new < 1:
            raise GenerationError(f"the prompt has {prompt_len} tokens, as many as max_length={gc.max_length} "
                                  "allows; pass max_new_tokens=...")
    if limit is not None and prompt_len + new > limit:
        raise GenerationError(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({new}) is {prompt_len + new} "
                              f"positions, past the model's limit of {limit} (max_position_embeddings); shorten the "
                              f"prompt or ask for at most {max(limit - prompt_len, 0)} new tokens")
    return new


def check_prompt(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise InputError("input_ids must be an integer tensor [batch, prompt length]"
                         + (f", got shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else
                            f", got {type(input_ids).__name__}"))
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty: generate needs a prompt of at least one token")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask!r}")
    if (attention_mask.sum(-1) == 0).any():
        raise InputError("attention_mask has a row with no token; every prompt needs at least one")
    return input_ids, attention_mask.to(input_ids.device)


def hf_positions(padding: torch.Tensor) -> torch.Tensor:
    """Each slot's position as transformers' generate counts it: from the row's first token, 1 on padding."""
    return (padding.cumsum(-1) - 1).masked_fill_(padding == 0, 1)


def decode_loop(steps: Steps, layout, input_ids: torch.Tensor, attention_mask: torch.Tensor, gc, *,
                streamer: Any = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The prompt followed by the new tokens ([B, P + n], n <= the new-token count; rows that ended padded), as
    transformers' generate returns them."""
    B, P = input_ids.shape
    dev = input_ids.device
    new = new_token_count(gc, P, layout.limit)
    eos = _eos_ids(gc, dev)
    pad = gc.pad_token_id
    if pad is None and eos is not None:
        pad = int(eos[0])
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    procs = processors(gc, P, attention_mask, eos)
    length = P + new
    padding = torch.ones(B, length, dtype=torch.long, device=dev)
    padding[:, :P] = attention_mask
    positions = hf_positions(padding)
    slots = torch.arange(length, device=dev)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = [input_ids]
    ids = input_ids
    with torch.inference_mode():
        cache = layout.allocate(B, length)
        logits = steps.prefill(input_ids, positions[:, :P], padding, slots[:P], cache)
        for t in range(new):
            scores = logits[:, -1].to(dtype=torch.float32, copy=True)
            if procs:
                scores = procs(ids, scores)
            if gc.do_sample:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                token = torch.argmax(scores, dim=-1)
            if eos is not None:
                token = torch.where(unfinished, token, torch.as_tensor(pad, device=dev))
            out.append(token[:, None])
            if procs:
                ids = torch.cat(out, dim=1)
            if eos is not None:
                unfinished &= ~torch.isin(token, eos)
            if streamer is not None:
                streamer.put(token.cpu())
            c = P + t
            if t + 1 == new or (eos is not None and not bool(unfinished.any())):
                break
            logits = steps.decode(token[:, None], positions[:, c:c + 1], padding, slots[c:c + 1], cache)
    if streamer is not None:
        streamer.end()
    return torch.cat(out, dim=1)
