"""LoRA's spec (a frozen dataclass, checked on construction) and its adapter_config.json mapping, PEFT's LoraConfig."""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Sequence, Union

from peftc.errors import MissingDependency, SpecError
from peftc.spec import (BIAS_MODES, TASK_TYPES, modules_to_save_of, AdapterSpec, Targets, _layers, _names,
                        _normalize_targets, _pairs, _parameter_names, _token_indices, pattern_matches)

from .inits import LOFTQ_BITS, parse_init

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRA(AdapterSpec):
    """Low-rank adapter: W x -> W x + (alpha / r) B A dropout(x)   (arXiv:2106.09685; rsLoRA: alpha / sqrt(r),
    arXiv:2312.03732). A starts Kaiming-uniform and B at zero, so a fresh adapter changes no output.

    As in PEFT: `rank_pattern` / `alpha_pattern` give some layers their own r / alpha (regex keys matched against
    the end of the module path, the first matching key wins); `layers_to_transform` (with `layers_pattern`, the
    name before the layer index, e.g. "layers" or "h") keeps targets named in a list to those layers only;
    `exclude_modules` (names, or a regex over the whole path) leaves modules out.

    `use_dora`: DoRA (arXiv:2402.09353) adds a trained magnitude m per output channel, W' = m (W + s B A) /
    ||W + s B A||_row (norm taken per output channel and detached from the gradient, as PEFT does); it starts at
    the weight's own norms, so a fresh DoRA adapter changes no output either. `lora_bias`: B gets a bias b_B too
    (y + s (B A x + b_B)), zero at first; merging adds s b_B to the layer's bias.

    `bias` (PEFT's): which of the model's own biases the adapter trains, "none", "all" (every parameter named
    `bias`) or "lora_only" (the adapted layers' biases). The adapter holds trainable copies of them (the model's
    stay frozen and unchanged), read by its own calls only, saved under PEFT's keys and written by merging.

    `init` takes PEFT's data-free init_lora_weights: True (Kaiming-uniform A, zero B), False (both random),
    "gaussian", "orthogonal" (B A = 0 from orthogonal halves), "pissa" / "pissa_niter_N" (A, B from the top-r
    singular part of W) and "olora" (from W's QR). PiSSA and OLoRA start from W = residual + s B A: the compiled
    module reads the residual at those layers, its own copy, when this adapter runs; the user's model is not
    changed (PEFT overwrites its weights). "loftq" (arXiv:2310.08659; PEFT's loftq_config: `loftq_bits` 4 for nf4 or
    8 for int8, `loftq_iter` alternations, defaults 4 and 1) quantizes W with bitsandbytes (pip install bitsandbytes)
    and takes A, B from the SVD of W - Q: the adapter runs on its own copy of Q, the quantized-dequantized weight, on
    linear layers only. As in PEFT, B A approximates W - Q without the scale, so W is approximated only with
    alpha == r; and loading a LoftQ adapter quantizes the base weight again (its A, B come from the file).

    `target_parameters` (PEFT's): parameter names (matched as the whole name or its dotted tail) adapted as weights
    in their own right, notably the stacked expert weights of transformers 5 MoE layers (`["mlp.experts.gate_up_proj",
    "mlp.experts.down_proj"]`) and the router's `gate.weight`. An expert weight W [E, out, in] gets per-expert A_e
    [r, in] and B_e [out, r] (saved as PEFT's A [r E, in] and B [out, r E]), W_e -> W_e + s B_e A_e; as PEFT does,
    peftc refuses dropout, DoRA and lora_bias there. With targets=[] only the parameters are adapted. On a model
    whose MoE layers transformers 5 fused (Mixtral, Qwen3-MoE, ...) targets="all-linear" also adapts the router and
    the experts, as PEFT does: the adapter's spec then records target_parameters=[down_proj, gate.weight,
    gate_up_proj] and rank r * 2 / alpha * 2 for gate_up_proj (what were two layers, gate and up).

    `trainable_token_indices` (PEFT's): rows of the input embedding (a list), or of named embeddings (a dict of
    module name -> rows), that the adapter trains in full, e.g. the tokens a chat template adds; with tied word
    embeddings the output head sees the same rows, as in PEFT. The model's matrix stays unchanged
    (passes/trainable_tokens.py)."""

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Targets = None
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init: Union[bool, str] = True
    task_type: Union[str, None] = None
    rank_pattern: tuple = ()
    alpha_pattern: tuple = ()
    layers_to_transform: Union[None, int, tuple[int, ...]] = None
    layers_pattern: Union[None, tuple[str, ...]] = None
    exclude_modules: Union[None, str, tuple[str, ...]] = None
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    target_parameters: Union[None, tuple[str, ...]] = None
    trainable_token_indices: Union[None, tuple[int, ...], tuple[tuple[str, tuple[int, ...]], ...]] = None
    loftq_bits: Union[int, None] = None      # init="loftq" only (None: 4)
    loftq_iter: Union[int, None] = None      # init="loftq" only (None: 1)
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # PEFT config keys kept verbatim

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise SpecError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise SpecError(f"LoRA alpha must be a finite number, got alpha={self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        object.__setattr__(self, "init", parse_init(self.init))
        self._check_loftq()
        for flag in ("use_dora", "lora_bias", "use_rslora"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag} must be True or False, got {flag}={getattr(self, flag)!r}")
        if self.lora_bias and self.init not in (True, False):
            raise SpecError(f"lora_bias=True is only supported with init=True or init=False (as in PEFT, which "
                            f"would not load such an adapter), got init={self.init!r}; pass init=True or False, "
                            "or lora_bias=False")
        if self.use_dora and self.lora_bias:
            raise SpecError("lora_bias=True is not supported with DoRA (as in PEFT); pass use_dora=False or "
                            "lora_bias=False")
        if self.bias not in BIAS_MODES:
            raise SpecError(f"bias must be one of {BIAS_MODES} (PEFT's values), got bias={self.bias!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise SpecError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        object.__setattr__(self, "target_parameters", _parameter_names(self.target_parameters))
        if self.target_parameters and isinstance(self.targets, (list, tuple)) and not self.targets:
            object.__setattr__(self, "targets", ())      # parameters only (PEFT: target_modules=[])
        else:
            object.__setattr__(self, "targets", _normalize_targets(self.targets))
        object.__setattr__(self, "rank_pattern", _pairs("rank_pattern", self.rank_pattern, int))
        object.__setattr__(self, "alpha_pattern", _pairs("alpha_pattern", self.alpha_pattern, (int, float)))
        object.__setattr__(self, "layers_to_transform", _layers(self.layers_to_transform))
        object.__setattr__(self, "layers_pattern", _names("layers_pattern", self.layers_pattern, regex=False))
        object.__setattr__(self, "exclude_modules", _names("exclude_modules", self.exclude_modules, regex=True))
        object.__setattr__(self, "trainable_token_indices", _token_indices(self.trainable_token_indices))
        if isinstance(self.targets, str) and self.layers_to_transform is not None:
            raise SpecError(f"layers_to_transform cannot be used with targets given as a string ({self.targets!r}), "
                            "as in PEFT; list the target names instead")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise SpecError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices "
                            "to adapt); give both or neither")
        object.__setattr__(self, "modules_to_save", modules_to_save_of(self.modules_to_save, self.task_type))

    def _check_loftq(self) -> None:
        if self.init != "loftq":
            given = [f"{k}={getattr(self, k)!r}" for k in ("loftq_bits", "loftq_iter") if getattr(self, k) is not None]
            if given:
                raise SpecError(f"{', '.join(given)} only applies with init='loftq', got init={self.init!r}; pass "
                                "init='loftq' or drop the LoftQ options")
            return
        object.__setattr__(self, "loftq_bits", 4 if self.loftq_bits is None else self.loftq_bits)
        object.__setattr__(self, "loftq_iter", 1 if self.loftq_iter is None else self.loftq_iter)
        bits, iters = self.loftq_bits, self.loftq_iter
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LOFTQ_BITS:
            raise SpecError(f"loftq_bits must be 4 (nf4) or 8 (int8), the quantizations LoftQ supports (as in PEFT), "
                            f"got loftq_bits={bits!r}; pass loftq_bits=4 or loftq_bits=8")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise SpecError(f"loftq_iter (LoftQ's alternating quantize / SVD steps) must be an integer >= 1, got "
                            f"loftq_iter={iters!r}; pass loftq_iter=1 (PEFT's default) or more")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependency("init='loftq' quantizes the base weights with bitsandbytes, which is not "
                                    "installed; pip install bitsandbytes  (or: pip install 'peftc[quant]'), or "
                                    "choose another init")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @staticmethod
    def _pattern_value(pairs: tuple, path: str, default):
        """PEFT's get_pattern_key: the value of the first key that matches `path` (pattern_matches)."""
        return next((value for key, value in pairs if pattern_matches(key, path)), default)

    def rank_at(self, path: str) -> int:
        return self._pattern_value(self.rank_pattern, path, self.r)

    def alpha_at(self, path: str) -> float:
        return self._pattern_value(self.alpha_pattern, path, self.alpha)

    def scale_at(self, path: str) -> float:
        r, alpha = self.rank_at(path), self.alpha_at(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_rank(self) -> int:
        return max([self.r, *(v for _, v in self.rank_pattern)])


# adapter_config.json <-> LoRA. Keys PEFT writes that peftc honours; others must hold their neutral value.
_LORA_KEYS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "use_rslora": "use_rslora", "modules_to_save": "modules_to_save", "init_lora_weights": "init",
              "task_type": "task_type", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
              "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern",
              "exclude_modules": "exclude_modules", "use_dora": "use_dora",
              "lora_bias": "lora_bias", "bias": "bias", "target_parameters": "target_parameters",
              "trainable_token_indices": "trainable_token_indices", "loftq_config": None}   # None: _loftq_from_config
# PEFT's LoftQConfig fields (in loftq_config) -> LoRA fields
_LOFTQ_KEYS = {"loftq_bits": "loftq_bits", "loftq_iter": "loftq_iter"}
# LoRA options and variants peftc does not implement, at the value that switches them off
_NEUTRAL = {"fan_in_fan_out": None, "layer_replication": None,
            "use_qalora": False,
            "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "eva_config": None,
            "corda_config": None, "lora_ga_config": None, "velora_config": None,
            "monteclora_config": None, "arrow_config": None, "kasa_config": None,
            "ensure_weight_tying": False}
_NEUTRAL_ALT = {"fan_in_fan_out": (False, True)}
# Keys that describe the checkpoint, not the adapter's function (or only matter with a refused option switched on).
_METADATA = {"peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
             "megatron_core", "qalora_group_size"}


def lora_from_config(cfg: dict, source: str = "adapter_config.json") -> LoRA:
    """LoRA from a dict in adapter_config.json form. A key peftc does not honour is refused, naming it, unless it
    holds its neutral value (an unknown key: a false-like value such as None, False, {} or []), so a variant peftc
    does not implement never loads as plain LoRA."""
    for key, neutral in _NEUTRAL.items():
        if key in cfg and cfg[key] != neutral and cfg[key] not in _NEUTRAL_ALT.get(key, ()):
            raise SpecError(
                f"{source}: {key}={cfg[key]!r} is not supported by peftc yet (supported: {neutral!r}); "
                "remove the key or use a plain LoRA config"
            )
    known = set(_LORA_KEYS) | set(_NEUTRAL)
    for key, value in cfg.items():
        if key not in known | _METADATA and value not in (None, False, {}, [], ""):
            raise SpecError(f"{source}: {key}={value!r} is a LoRA option peftc does not know; it would change what "
                            "the adapter computes, so the adapter is refused rather than loaded as plain LoRA. "
                            "Remove the key if it is neutral for this adapter")
    if "r" not in cfg:
        raise SpecError(f"{source}: missing required key 'r' (the LoRA rank)")
    kwargs: dict[str, Any] = {}
    for key, name in _LORA_KEYS.items():
        if name is not None and key in cfg and cfg[key] is not None:
            kwargs[name] = cfg[key]
    kwargs.update(_loftq_from_config(cfg, source))
    kwargs.setdefault("alpha", 8)
    if isinstance(kwargs.get("targets"), list):
        kwargs["targets"] = tuple(kwargs["targets"])
    if "modules_to_save" in kwargs:
        if not isinstance(kwargs["modules_to_save"], (list, tuple)):
            raise SpecError(f"{source}: modules_to_save must be a list, got {kwargs['modules_to_save']!r}")
        kwargs["modules_to_save"] = tuple(kwargs["modules_to_save"])
    kwargs["extra"] = {k: v for k, v in cfg.items() if k not in known | {"peft_type"}}
    try:
        return LoRA(**kwargs)
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    except TypeError as e:
        raise SpecError(f"{source}: {e}") from None


def lora_to_config(spec: LoRA, *, target_modules: Any, base_model_name_or_path: str | None,
                   task_type: str | None, modules_to_save: Sequence[str] | None) -> dict:
    """adapter_config.json for `spec` as PEFT writes it; `target_modules` is the resolved, PEFT-matchable form."""
    cfg = dict(spec.extra)
    cfg.update(_NEUTRAL)
    layers = spec.layers_to_transform
    cfg.update({
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": target_modules, "use_rslora": spec.use_rslora, "use_dora": spec.use_dora,
        "lora_bias": spec.lora_bias, "bias": spec.bias, "init_lora_weights": spec.init,
        "modules_to_save": list(modules_to_save) if modules_to_save else None, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, "fan_in_fan_out": False,
        "revision": None, "auto_mapping": None, "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "layers_to_transform": list(layers) if isinstance(layers, tuple) else layers,
        "layers_pattern": list(spec.layers_pattern) if spec.layers_pattern else None,
        "exclude_modules": list(spec.exclude_modules) if isinstance(spec.exclude_modules, tuple)
        else spec.exclude_modules,
        "target_parameters": list(spec.target_parameters) if spec.target_parameters else None,
        "trainable_token_indices": token_indices_config(spec.trainable_token_indices),
        "loftq_config": {k: getattr(spec, name) for k, name in _LOFTQ_KEYS.items()} if spec.init == "loftq" else {},
    })
    return dict(sorted(cfg.items()))


def _loftq_from_config(cfg: dict, source: str) -> dict:
    """LoRA's loftq_bits / loftq_iter from PEFT's loftq_config. As in PEFT, init_lora_weights="loftq" needs it (PEFT
    raises without it); with another init PEFT drops it with a warning, and so does peftc."""
    loftq = cfg.get("loftq_config")
    if cfg.get("init_lora_weights") != "loftq":
        if loftq:
            log.warning("%s: loftq_config=%r is ignored: init_lora_weights is %r, not 'loftq' (as in PEFT)", source,
                        loftq, cfg.get("init_lora_weights"))
        return {}
    if not isinstance(loftq, dict) or not loftq:
        raise SpecError(f"{source}: init_lora_weights='loftq' needs loftq_config (a dict with loftq_bits and "
                        f"loftq_iter, as PEFT's LoftQConfig writes it), got loftq_config={loftq!r}")
    if set(loftq) != set(_LOFTQ_KEYS):
        raise SpecError(f"{source}: loftq_config must hold exactly {sorted(_LOFTQ_KEYS)} (PEFT's LoftQConfig; PEFT "
                        f"reads both), got keys {sorted(loftq)}")
    return {name: loftq[k] for k, name in _LOFTQ_KEYS.items()}


def token_indices_config(value) -> Union[None, list, dict]:
    """trainable_token_indices as adapter_config.json holds it: a list, or a dict of module name -> list."""
    if value is None:
        return None
    return list(value) if isinstance(value[0], int) else {k: list(v) for k, v in value}


SPEC_FIELDS = tuple(f.name for f in fields(LoRA))
