"""Adapter specs: frozen dataclasses, checked on construction, convertible to and from PEFT's adapter_config.json."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Sequence, Union

from .errors import SpecError

# None: the query and value projections found by the attention pattern; "all-linear": every linear layer but the
# output head; a str: a regex that must fully match a module path; a sequence: names matching a path or its tail.
Targets = Union[None, str, Sequence[str]]

# PEFT adds these to modules_to_save for task_type="SEQ_CLS" (whichever exists).
SEQ_CLS_HEADS = ("classifier", "score")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
LORA_INITS = (True, False, "gaussian")


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


@dataclass(frozen=True)
class LoRA(AdapterSpec):
    """Low-rank adapter: W x -> W x + (alpha / r) B A dropout(x)   (arXiv:2106.09685; rsLoRA: alpha / sqrt(r),
    arXiv:2312.03732). A starts Kaiming-uniform and B at zero, so a fresh adapter changes no output."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Targets = None
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init: Union[bool, str] = True
    task_type: Union[str, None] = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown PEFT config keys, kept verbatim

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise SpecError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise SpecError(f"LoRA alpha must be a finite number, got alpha={self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.init not in LORA_INITS or (self.init is not True and self.init is not False and self.init != "gaussian"):
            raise SpecError(f"LoRA init must be one of {LORA_INITS}, got init={self.init!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise SpecError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        object.__setattr__(self, "targets", _normalize_targets(self.targets))
        mts = self.modules_to_save
        if isinstance(mts, str) or not all(isinstance(m, str) and m for m in (mts or ())):
            raise SpecError(f"modules_to_save must be a list of module names, got {mts!r}")
        mts = tuple(dict.fromkeys(mts or ()))
        if self.task_type == "SEQ_CLS":  # as PEFT does: the classification head is trained and saved
            mts = mts + tuple(h for h in SEQ_CLS_HEADS if h not in mts)
        object.__setattr__(self, "modules_to_save", mts)

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# adapter_config.json <-> LoRA. Keys PEFT writes that peftc honours; others must hold their neutral value.
_LORA_KEYS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "use_rslora": "use_rslora", "modules_to_save": "modules_to_save", "init_lora_weights": "init",
              "task_type": "task_type"}
_NEUTRAL = {"bias": "none", "use_dora": False, "fan_in_fan_out": None, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None, "layer_replication": None,
            "lora_bias": False, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
            "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "eva_config": None,
            "corda_config": None, "loftq_config": {}}
_NEUTRAL_ALT = {"fan_in_fan_out": (False, True), "loftq_config": (None,), "layers_pattern": ([],),
                "exclude_modules": ([],)}


def spec_from_config(cfg: Any, *, source: str = "adapter_config.json") -> LoRA:
    """Read a spec from a dict in adapter_config.json form (as PEFT writes it)."""
    if isinstance(cfg, AdapterSpec):
        return cfg
    if not isinstance(cfg, dict):
        raise SpecError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    ptype = cfg.get("peft_type")
    if ptype is None:
        raise SpecError(f"{source}: missing 'peft_type'; expected \"LORA\" (the only method peftc supports so far)")
    if str(getattr(ptype, "value", ptype)).upper() != "LORA":  # PEFT's to_dict() gives a PeftType enum
        raise SpecError(f"{source}: peft_type={ptype!r} is not supported yet; supported: ['LORA']")
    for key, neutral in _NEUTRAL.items():
        if key in cfg and cfg[key] != neutral and cfg[key] not in _NEUTRAL_ALT.get(key, ()):
            raise SpecError(
                f"{source}: {key}={cfg[key]!r} is not supported by peftc yet (supported: {neutral!r}); "
                "remove the key or use a plain LoRA config"
            )
    if "r" not in cfg:
        raise SpecError(f"{source}: missing required key 'r' (the LoRA rank)")
    kwargs: dict[str, Any] = {}
    for key, name in _LORA_KEYS.items():
        if key in cfg and cfg[key] is not None:
            kwargs[name] = cfg[key]
    kwargs.setdefault("alpha", 8)
    if isinstance(kwargs.get("targets"), list):
        kwargs["targets"] = tuple(kwargs["targets"])
    if "modules_to_save" in kwargs:
        if not isinstance(kwargs["modules_to_save"], (list, tuple)):
            raise SpecError(f"{source}: modules_to_save must be a list, got {kwargs['modules_to_save']!r}")
        kwargs["modules_to_save"] = tuple(kwargs["modules_to_save"])
    known = set(_LORA_KEYS) | set(_NEUTRAL) | {"peft_type"}
    kwargs["extra"] = {k: v for k, v in cfg.items() if k not in known}
    try:
        return LoRA(**kwargs)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    except TypeError as e:
        raise SpecError(f"{source}: {e}") from None


def spec_to_config(spec: LoRA, *, target_modules: Any, base_model_name_or_path: str | None,
                   task_type: str | None, modules_to_save: Sequence[str] | None) -> dict:
    """adapter_config.json for `spec` as PEFT writes it; `target_modules` is the resolved, PEFT-matchable form."""
    cfg = dict(spec.extra)
    cfg.update(_NEUTRAL)
    cfg.update({
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": target_modules, "use_rslora": spec.use_rslora, "init_lora_weights": spec.init,
        "modules_to_save": list(modules_to_save) if modules_to_save else None, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "fan_in_fan_out": False,
        "revision": None, "auto_mapping": None,
    })
    return dict(sorted(cfg.items()))


SPEC_FIELDS = tuple(f.name for f in fields(LoRA))
