"""TRL on a PeftModule: TRL's trainers (SFTTrainer, DPOTrainer, ...) train a PeftModule as they train a PEFT model.

What TRL asks of a model, and how peftc answers:

    add_fused_lm_head(model)      TRL replaces `model.forward` with its fused LM head, which runs `model.base_model`
                                  as a transformers backbone and projects its hidden states through
                                  `get_output_embeddings().weight` in tiles. A PeftModule runs one graph, LM head
                                  included (and trained token rows of a tied head), so it takes that assignment as a
                                  request (GraphModel.__setattr__ -> `fused_forward`): `fused_lm_head=True` calls run
                                  the graph and compute TRL's per-token fields (log_probs, entropy, is_top1, ...) from
                                  its logits, with TRL's temperature, logit scale and softcapping read from that
                                  patch. Same numbers; the full logits are materialized (no memory saving).
    padding-free batches          (SFTConfig packing_strategy="bfd", padding_free=True) carry position_ids and no
                                  attention_mask, plus flash-attention keys (cu_seq_lens_q, ...). Compile with
                                  `example_inputs=packed_example_inputs(model)`: the graph then takes position_ids
                                  and builds transformers' block-diagonal mask from them; the varlen keys, which
                                  only flash kernels read, are dropped.
    ref_model (DPO, KTO, ...)     TRL, given ref_model=None, computes reference log-probs with the model itself:
                                  a PEFT model it made from a peft_config under disable_adapter() (the base), a
                                  PeftModel it was given under adapter "ref", a frozen copy of "default" it adds.
                                  A PeftModule is no peft.PeftModel, so pass ref_model=reference_model(pm) (the
                                  base: every row routed to "__base__", per-call data) or
                                  reference_model(pm, frozen_copy_(pm)) (the adapter as it is now). Either shares
                                  every base weight (no copy). peftc.trl.DPOTrainer (trainer_class) does the second
                                  for you, as TRL does for a PeftModel. (Plain trl.DPOTrainer(model=pm) without a
                                  ref_model takes TRL's path for plain models: it loads a second model by the
                                  config's name_or_path, which fails offline for a model built in code.)
    disable_dropout_in_model      TRL sets p = 0 on the model's nn.Dropout modules; a PeftModule's traced dropouts
                                  and each LoRA site's rate are nn.Dropout modules (DropoutRate), so it reaches them.

Nothing here imports trl or transformers at import time (`import peftc` never imports trl).
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .store import BASE

# keys of TRL's padding-free batches that only flash / varlen kernels read (transformers' FlashAttentionKwargs and
# the short convolutions of linear-attention layers); sdpa and eager attention take the packing from position_ids
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# what TRL's fused forward (trl.trainer.utils.add_fused_lm_head) closes over and peftc reads
_FUSED_VARS = ("original_forward", "temperature", "cast_lm_head_to_fp32", "outputs", "final_logit_softcapping",
               "logit_scale")
_FUSED_QUALNAME = "add_fused_lm_head.<locals>._fused_forward"


# --- TRL's fused LM head ---------------------------------------------------------------------------------------
def is_trl_fused_forward(value: Any) -> bool:
    """Whether `value` is the forward TRL's add_fused_lm_head installs (functools.wraps renames it after the model's
    forward, so it is known by its code object)."""
    code = getattr(getattr(value, "__func__", value), "__code__", None)
    return code is not None and getattr(code, "co_qualname", code.co_name) == _FUSED_QUALNAME \
        and "trl" in code.co_filename


def _closure(fn) -> dict[str, Any]:
    fn = getattr(fn, "__func__", fn)
    return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ())
            if _has_contents(c)}


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def fused_forward(module: nn.Module, trl_forward) -> types.MethodType:
    """peftc's answer to TRL's add_fused_lm_head on `module` (a GraphModel, or a reference_model): a forward that
    passes plain calls to the module's own forward and answers `fused_lm_head=True` calls as TRL's fused head does,
    from the graph's logits:

        z = (logits * logit_scale [-> softcap * tanh(z / softcap)]) * (1 / temperature)      (float32)
        log_probs = z[label] - logsumexp(z)        entropy = logsumexp(z) - sum softmax(z) z
        log_sum_sq_probs = log sum softmax(z)^2    mean_logits = mean z    is_top1 = argmax z == label
        loss = -sum log_probs / (num_items_in_batch or the count of labels != -100)

    Every per-token field is zero where the label is -100, as TRL's. Returns TRL's own FusedCausalLMOutput."""
    found = _closure(trl_forward)
    missing = [n for n in _FUSED_VARS if n not in found]
    if missing:
        raise InputError(f"TRL's add_fused_lm_head in this trl version closes over no {missing}; peftc knows the "
                         "fused LM head of trl 1.16 (it reads its temperature, logit scale, softcapping and outputs); "
                         "install a trl version peftc supports (pip install peftc[trl])")
    output_cls = getattr(trl_forward, "__func__", trl_forward).__globals__["FusedCausalLMOutput"]
    original = found["original_forward"]
    temperature, outputs = found["temperature"], tuple(found["outputs"])
    softcap, scale, fp32_head = found["final_logit_softcapping"], found["logit_scale"], found["cast_lm_head_to_fp32"]
    traced = _input_names(module)

    @functools.wraps(original)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(*args, **kwargs, **extra)
        if labels is None and shift_labels is None:
            raise InputError("fused_lm_head=True needs labels (or shift_labels): the log-probabilities are those of "
                             "the labels")
        kwargs = _graph_kwargs(kwargs, traced)
        logits = original(*args, **kwargs).logits                                    # (B, T, V)
        if fp32_head and logits.dtype != torch.float32:
            raise InputError(f"TRL asked for the LM head in float32 (cast_lm_head_to_fp32=True), but this module's "
                             f"graph computes it in {logits.dtype}; train the model in float32, or turn "
                             "cast_lm_head_to_fp32 off")
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]                          # (B, T-1, V), (B, T-1)
        else:
            labels = shift_labels
        labels = labels.to(logits.device)
        mask = labels != -100
        target = labels.clamp(min=0)
        z = logits.float() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        z = z * (1 / temperature)
        log_z = torch.logsumexp(z, dim=-1)                                           # (B, T-1)
        zero = ~mask
        log_probs = (z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - log_z).masked_fill(zero, 0)
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = (log_z - (torch.softmax(z, dim=-1) * z).sum(-1)).masked_fill(zero, 0)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.logsumexp(2 * (z - log_z.unsqueeze(-1)), dim=-1).masked_fill(zero, 0)
            if "mean_logits" in outputs:
                mean_logits = z.mean(-1).masked_fill(zero, 0)
            if "is_top1" in outputs:
                is_top1 = (z.argmax(-1) == target) & mask     # argmax: the first maximum, as TRL's tie rule
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        return output_cls(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                          mean_logits=mean_logits, is_top1=is_top1, label_mask=mask, aux_loss=None)

    forward.peftc_fused_lm_head = True
    return types.MethodType(forward, module)


def _input_names(module: nn.Module) -> list[str]:
    target = module.peft_module if isinstance(module, Reference) else module
    return list(getattr(target, "input_names", ()))


def _graph_kwargs(kwargs: dict, traced: list[str]) -> dict:
    """A fused call's keyword inputs as the graph takes them: use_cache off (TRL's fused head sets it), router
    logits refused, and a padding-free batch's varlen keys dropped where the graph reads position_ids."""
    kwargs = {**kwargs, "use_cache": False}
    if kwargs.pop("output_router_logits", False):
        raise InputError("TRL asked for router logits (output_router_logits=True, for the MoE load-balancing loss); "
                         "a PeftModule's graph returns the logits only; set router_aux_loss_coef=0 in the trainer's "
                         "config (and output_router_logits=False in the model's config)")
    if "position_ids" in kwargs and "position_ids" not in traced:
        raise InputError(f"TRL passed position_ids (a padding-free batch: SFTConfig packing_strategy='bfd', the "
                         f"default with packing=True, or padding_free=True), but this PeftModule was traced with "
                         f"inputs {traced}; compile it with example_inputs=peftc.trl.packed_example_inputs(model) so "
                         "its graph takes position_ids, or set SFTConfig(packing_strategy='wrapped') / "
                         "padding_free=False")
    if "position_ids" in kwargs and kwargs.get("attention_mask") is None:
        for k in VARLEN_KEYS:
            if k not in traced:
                kwargs.pop(k, None)       # flash-attention's view of the packing; the graph's mask has it already
    return kwargs


def packed_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict:
    """example_inputs for peftc.compile that trace a transformers causal LM for TRL's padding-free batches
    (input_ids and position_ids, no attention_mask, use_cache=False): the graph builds transformers' block-diagonal
    causal mask from position_ids that restart at 0 at each packed sequence."""
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    return {"input_ids": torch.randint(0, vocab, (batch, seq), device=device),
            "position_ids": torch.arange(seq, device=device).repeat(batch, 1), "use_cache": False}


# --- the reference model ----------------------------------------------------------------------------------------
class Reference(nn.Module):
    """TRL's reference model made of a PeftModule: every call runs the PeftModule with each row routed to
    `adapter_name` ("__base__": the base model; or a frozen adapter such as the copy `frozen_copy_` makes), given as
    adapter_names (per-call data: nothing is switched anywhere, so the policy's own calls and concurrent calls are
    unaffected). It holds no weights: the PeftModule is not a submodule (TRL's eval(), requires_grad_(False) and
    dropout changes on the reference never reach the policy) and the base weights are the PeftModule's own (which
    are the user's model's)."""

    def __init__(self, pm: nn.Module, adapter_name: str = BASE):
        from .module import PeftModule

        if not isinstance(pm, PeftModule):
            raise InputError(f"reference_model takes a peftc.PeftModule, got {type(pm).__name__}; compile the model "
                             "first (peftc.compile(model, spec))")
        if adapter_name != BASE:
            pm._check_name(adapter_name)
            trainable = [n for n, p in pm.store[adapter_name].named_parameters() if p.requires_grad]
            if trainable:
                raise InputError(f"the reference adapter {adapter_name!r} has trainable weights ({trainable[0]}, ...); "
                                 "a reference must stay fixed: use frozen_copy_(pm, name) for a frozen copy")
        super().__init__()
        object.__setattr__(self, "peft_module", pm)
        self.adapter_name = adapter_name
        self.config = pm.config
        self.generation_config = pm.generation_config
        self.main_input_name = pm.main_input_name

    def forward(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None or kwargs.get("adapter_index") is not None:
            raise InputError(f"the reference model runs adapter {self.adapter_name!r} on every row; it takes no "
                             "adapter_names / adapter_index")
        kwargs.pop("adapter_names", None), kwargs.pop("adapter_index", None)
        pm = self.peft_module
        rows = pm._batch_size(args, kwargs)
        return pm(*args, adapter_names=[self.adapter_name] * rows, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_trl_fused_forward(value):
            value = fused_forward(self, value)
        super().__setattr__(name, value)

    def get_input_embeddings(self):
        return self.peft_module.base_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.peft_module.base_model.get_output_embeddings()

    def extra_repr(self) -> str:
        return f"{self.peft_module.model_class} with adapter {self.adapter_name!r} on every row (weights shared)"


def reference_model(pm: nn.Module, adapter_name: str = BASE) -> Reference:
    """TRL's reference model for a PeftModule `pm`: `pm` with every row routed to `adapter_name`, sharing all its
    weights. The default "__base__" is the base model: what TRL uses for a PEFT model it made itself from a
    peft_config (reference log-probs under disable_adapter()), right for a freshly initialized adapter. For an
    adapter with trained weights (SFT, then DPO) pass a frozen copy of it: frozen_copy_(pm) (TRL's "ref" adapter)."""
    return Reference(pm, adapter_name)


def frozen_copy_(pm: nn.Module, name: str = "ref", source: str | None = None) -> str:
    """Add to `pm` (in place, hence the underscore) a frozen copy of adapter `source` (default: the active one)
    named `name`, and return `name`: what TRL does for a PeftModel it is given with ref_model=None (it adds adapter
    "ref", a copy of "default", and computes reference log-probs under it). Only the adapter's weights are copied,
    never the base's. Adds an adapter: make it before the trainer makes its optimizer."""
    import tempfile

    source = source or pm.active_adapter
    pm._check_name(source)
    with tempfile.TemporaryDirectory() as d:
        pm.save_adapter(d, source)
        path = d if source == "default" else f"{d}/{source}"
        pm.load_adapter(path, name, is_trainable=False)
    return name


# --- dropout -------------------------------------------------------------------------------------------------------
def disable_dropout_(pm: nn.Module) -> int:
    """TRL's disable_dropout_in_model (DPOConfig.disable_dropout, on by default) on a PeftModule, in place: p = 0 on
    every nn.Dropout in it, which includes the base model's traced dropouts (passes.dropout.ModeAwareDropout) and
    each LoRA site's rate (passes.lora.weights.DropoutRate, PEFT's lora_dropout), so TRL's own loop does the same.
    The adapters' configs keep their lora_dropout, as PEFT's do. Returns how many non-zero rates it zeroed."""
    count = 0
    for m in pm.modules():
        if isinstance(m, nn.Dropout):
            count += m.p > 0
            m.p = 0.0
    return count


# --- trainers ------------------------------------------------------------------------------------------------------
class PeftcTrainerMixin:
    """Put before a TRL trainer class (trainer_class does). For a PeftModule `model`:
      - where the trainer takes `ref_model` and none is given, the reference TRL gives a PeftModel: adapter "ref" if
        the module has one, else a frozen copy of its active adapter added as "ref" (frozen_copy_), run through
        reference_model;
      - a `peft_config` (TRL would wrap the model with PEFT) is refused with the peftc way to do it.
    It overrides nothing else, so other mixins (a checkpointing one, say) compose with it in either order."""

    def __init__(self, *args, **kwargs):
        from .module import PeftModule

        bound = inspect.signature(super().__init__).bind_partial(*args, **kwargs)
        model = bound.arguments.get("model")
        if isinstance(model, PeftModule):
            if bound.arguments.get("peft_config") is not None:
                raise InputError("peft_config was given with a peftc.PeftModule; the module holds its adapter "
                                 "already: compile the model with the adapter you want (peftc.compile(model, "
                                 "peftc.LoRA(...))) and pass no peft_config")
            params = inspect.signature(super().__init__).parameters
            if "ref_model" in params and bound.arguments.get("ref_model") is None:
                # TRL's rule for a PeftModel it is given: adapter "ref" if there is one, else a frozen copy of the
                # active adapter made "ref"
                name = "ref" if "ref" in model.adapters else frozen_copy_(model, "ref")
                bound.arguments["ref_model"] = reference_model(model, name)
        super().__init__(*bound.args, **bound.kwargs)


@functools.lru_cache(maxsize=None)
def trainer_class(base: type) -> type:
    """`base` (a TRL trainer class, or any subclass of one) with PeftcTrainerMixin in front: `Peftc<base name>`."""
    return type(f"Peftc{base.__name__}", (PeftcTrainerMixin, base), {"__module__": __name__})


def __getattr__(name: str):
    """peftc.trl.SFTTrainer, peftc.trl.DPOTrainer, ...: trainer_class(trl.<name>), made on first use."""
    if name.endswith("Trainer") and not name.startswith("_"):
        try:
            import trl
        except ImportError as e:
            from .errors import MissingDependency
            raise MissingDependency("peftc.trl needs trl: pip install peftc[trl]") from e
        base = getattr(trl, name, None)
        if isinstance(base, type):
            return trainer_class(base)
    raise AttributeError(f"module 'peftc.trl' has no attribute {name!r}")
