"""What every method's spec shares: the AdapterSpec base, the target syntax, PEFT's task types and the checks that
normalise common fields (targets, module names, patterns, layer indices). Each method's own spec lives with its pass
(LoRA: peftc.passes.lora.spec; IA3: peftc.passes.ia3)."""
from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence, Union

from .errors import SpecError

# None: the query and value projections found by the attention pattern; "all-linear": every linear layer but the
# output head; a str: a regex that must fully match a module path; a sequence: names matching a path or its tail.
Targets = Union[None, str, Sequence[str]]

# PEFT adds these to modules_to_save for task_type="SEQ_CLS" (whichever exists).
SEQ_CLS_HEADS = ("classifier", "score")
BIAS_MODES = ("none", "all", "lora_only")   # LoRA's `bias`: which of the model's biases an adapter trains
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class AdapterSpec:
    """Base of every method's spec; `peft_type` is the name PEFT writes in adapter_config.json."""

    peft_type: ClassVar[str] = ""


def _normalize_targets(targets: Any) -> Targets:
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, (list, tuple, set, frozenset)) and all(isinstance(t, str) and t for t in targets):
        if not targets:
            raise SpecError("targets is an empty list; give module names, a regex string, 'all-linear' or None")
        return tuple(sorted(set(targets))) if isinstance(targets, (set, frozenset)) else tuple(targets)
    raise SpecError(
        f"targets must be None, 'all-linear', a regex string or a list of module names; got {targets!r}"
    )


def _parameter_names(value: Any) -> Union[None, tuple[str, ...]]:
    """target_parameters as a tuple of names (None for None or []); a string is refused, as PEFT refuses it."""
    if value is None or (isinstance(value, (list, tuple, set, frozenset)) and not value):
        return None
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(dict.fromkeys(value))
    raise SpecError(f"target_parameters must be a list of parameter names (e.g. ['mlp.experts.gate_up_proj']), got "
                    f"{value!r}")


def _pairs(name: str, value: Any, kind: type) -> tuple:
    """A pattern dict (regex key -> value) as ordered pairs: PEFT takes the first key that matches."""
    if value is None:
        return ()
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        value = dict(value)
    if not isinstance(value, dict):
        raise SpecError(f"{name} must be a dict of module-name pattern -> value, got {value!r}")
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise SpecError(f"{name} keys must be non-empty module-name patterns, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, kind) or (kind is int and v <= 0):
            raise SpecError(f"{name}[{k!r}] must be a {'positive integer' if kind is int else 'number'}, got {v!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise SpecError(f"{name} key {k!r} is not a valid regular expression ({e})") from None
    return tuple(value.items())


def _names(name: str, value: Any, *, regex: bool) -> Union[None, str, tuple[str, ...]]:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        if not regex:
            return (value,)
        try:
            re.compile(value)
        except re.error as e:
            raise SpecError(f"{name}={value!r} is not a valid regular expression ({e})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise SpecError(f"{name} must be a module name, a list of names{' or a regex string' if regex else ''}, "
                    f"got {value!r}")


def _layers(value: Any) -> Union[None, int, tuple[int, ...]]:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value):
        return tuple(value)
    raise SpecError(f"layers_to_transform must be a layer index or a list of them, got {value!r}")


def _token_indices(value: Any) -> Union[None, tuple[int, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    """PEFT's trainable_token_indices: row indices of the input embedding (a list), or module name -> row indices
    (a dict); kept as a tuple, or as ordered (name, indices) pairs. Empty means none."""
    def rows(where: str, v: Any) -> tuple[int, ...]:
        if not isinstance(v, (list, tuple)) or not v or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            raise SpecError(f"trainable_token_indices{where} must be a non-empty list of token indices (integers "
                            f">= 0), got {v!r}")
        dup = [i for i in v if list(v).count(i) > 1]
        if dup:
            raise SpecError(f"trainable_token_indices{where} lists token {dup[0]} twice; list each token once")
        return tuple(v)

    if value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if isinstance(value, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                        for p in value):
        value = dict(value)
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or not k:
                raise SpecError(f"trainable_token_indices keys must be module names, got {k!r}")
        return tuple((k, rows(f"[{k!r}]", v)) for k, v in value.items())
    return rows("", value)


def modules_to_save_of(value: Any, task_type: Any) -> tuple[str, ...]:
    """A spec's modules_to_save as a tuple of names (duplicates dropped); with task_type SEQ_CLS the classification
    heads are added, as PEFT trains and saves them."""
    if isinstance(value, str) or not all(isinstance(m, str) and m for m in (value or ())):
        raise SpecError(f"modules_to_save must be a list of module names, got {value!r}")
    mts = tuple(dict.fromkeys(value or ()))
    if task_type == "SEQ_CLS":
        mts = mts + tuple(h for h in SEQ_CLS_HEADS if h not in mts)
    return mts


def pattern_matches(key: str, path: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key matches module path `path`, as PEFT matches it: a regex over the
    end of the path, at a component boundary."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


_MOVED = ("LoRA", "lora_from_config", "lora_to_config", "SPEC_FIELDS")


def __getattr__(name: str):
    """LoRA's spec and config mapping live with the method (peftc.passes.lora.spec); read here they still resolve."""
    if name in _MOVED:
        from peftc.passes.lora import spec as lora_spec
        return getattr(lora_spec, name)
    raise AttributeError(f"module 'peftc.spec' has no attribute {name!r}")
