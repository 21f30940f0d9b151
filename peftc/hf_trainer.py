"""HF Trainer on a PeftModule as on a PEFT model: adapter-only checkpoints in PEFT's format, resume and best-model
loading through peftc's loader, PEFT's loss rules, and Trainer options peftc cannot honour (NEFTune) refused up front.

    peftc.Trainer(model=pm, args=args, ...)              transformers.Trainer with PeftcTrainerMixin
    peftc.trainer_class(SFTTrainer)(model=pm, ...)       the same for any Trainer subclass (TRL's, your own)

transformers' Trainer treats only `peft.PeftModel` as an adapter model: anything else is checkpointed as its whole
state dict (the frozen base weights included) into model.safetensors, and resumed by load_state_dict. The mixin
overrides the three places where that is decided, for PeftModules only (any other model takes Trainer's own path):

    _save(dir)                      -> pm.save_pretrained(dir): adapter_config.json + adapter_model.safetensors
                                       (other adapters in dir/<name>), written atomically; never the base weights
    _load_from_checkpoint(dir)      -> every adapter's tensors copied in place from dir (peftc's checks: keys,
    _load_best_model()                 shapes, config), so the optimizer's parameters stay the ones it holds
    label_smoother                  -> shifts labels on a causal LM, as Trainer does for a PeftModel's base model
    label_names (unset)             -> ["labels"], so evaluation reports eval_loss as for a PEFT model

transformers is imported only when a trainer class is made: `import peftc` imports neither Trainer nor accelerate.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, adapter_config, load_weights_, read_adapter_weights
from .errors import CheckpointError, InputError
from .methods import spec_from_config

TRAINING_ARGS_NAME = "training_args.bin"     # transformers.trainer.TRAINING_ARGS_NAME


def _peft_module(model: Any):
    """`model` if it is a PeftModule (unwrapped from DDP / torch.compile's OptimizedModule), else None."""
    from .module import PeftModule

    for _ in range(4):
        if isinstance(model, PeftModule):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


# Trainer options a PeftModule cannot honour: (option, is it set?, why, what to do). Each was run and failed or did
# silently nothing (tests/test_hf_trainer.py shows each refusal). Run and found to work, so not refused: fsdp
# (2 CPU processes: the adapter equals the DDP run's, checkpoints in PEFT's format), bf16 (CPU autocast, on
# bitsandbytes bases too), fp16 on CPU (Trainer runs fp32 there, for a PEFT model too), torch_compile, gradient
# checkpointing and its kwargs, label_smoothing_factor, gradient accumulation.
_REFUSED = (
    ("neftune_noise_alpha", lambda v, pm: v is not None,
     "NEFTune puts a forward hook on the model's input embedding module, but the traced graph calls the embedding as "
     "an op, so the hook would never run (no noise would be added)",
     "train without neftune_noise_alpha"),
)


def check_training_args(args: Any, model: Any) -> None:
    """Raise InputError naming each Trainer option in `args` a PeftModule cannot honour (before anything runs)."""
    pm = _peft_module(model)
    if pm is None or args is None:
        return
    bad = [(name, why, fix) for name, is_set, why, fix in _REFUSED if is_set(getattr(args, name, None), pm)]
    if bad:
        lines = "; ".join(f"{name}={getattr(args, name)!r}: {why}; {fix}" for name, why, fix in bad)
        raise InputError(f"TrainingArguments option(s) a PeftModule cannot honour: {lines}")


def _check_config(pm, name: str, directory: Path) -> None:
    """The adapter config saved in `directory` is the one of adapter `name` (same method, rank, scale, targets)."""
    path = directory / CONFIG_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e}); the checkpoint is incomplete") from None
    own = json.loads(json.dumps(adapter_config(pm.checkpoint_data, name)))     # as save_pretrained writes it
    source = str(path)
    if spec_from_config(saved, source=source) != spec_from_config(own, source=source):
        diff = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k) and k != "inference_mode")
        raise CheckpointError(f"{path} is the config of another adapter than {name!r} of this model (fields that "
                              f"differ: {diff}); resume from a checkpoint of this run, or compile the adapter that "
                              "made it")


def load_checkpoint_(pm, checkpoint) -> None:
    """Copy every adapter of `pm` from a checkpoint directory written by pm.save_pretrained (adapter "default" in
    `checkpoint`, others in `checkpoint/<name>`), in place: the Parameters stay the same objects (an optimizer
    holding them keeps working). Everything is read and checked before any tensor is written."""
    checkpoint = Path(checkpoint)
    loads = []
    for name in pm.adapters:
        directory = checkpoint if name == "default" else checkpoint / name
        if not (directory / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in checkpoint.iterdir()) if checkpoint.is_dir() else "no such directory"
            raise CheckpointError(f"{directory} has no {WEIGHTS_NAME} for adapter {name!r} (found: {found}); "
                                  "was this checkpoint written by peftc.Trainer / pm.save_pretrained?")
        _check_config(pm, name, directory)
        loads.append((name, directory, read_adapter_weights(directory)))
    for name, directory, tensors in loads:
        load_weights_(pm.checkpoint_data, name, tensors, source=str(directory))


class PeftcTrainerMixin:
    """Put in front of transformers.Trainer (or a subclass): see the module docstring. With a model that is no
    PeftModule every method is Trainer's own."""

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        check_training_args(targs, model)
        super().__init__(*args, **kwargs)
        pm = _peft_module(self.model)
        if pm is None:
            return
        check_training_args(self.args, pm)      # a subclass may have made its own args
        if self.args.label_names is None and pm.loss_type is not None:
            self.label_names = [p for p in inspect.signature(pm.forward).parameters if "label" in p]
        if self.label_smoother is not None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            if pm.model_class in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                self.label_smoother = functools.partial(_shifted, self.label_smoother)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        pm = _peft_module(self.model)
        if pm is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        pm.save_pretrained(output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pm = _peft_module(model if model is not None else self.model)
        if pm is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_(pm, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        pm = _peft_module(self.model)
        if pm is None:
            return super()._load_best_model()
        load_checkpoint_(pm, self.state.best_model_checkpoint)


def _shifted(smoother, model_output, labels, shift_labels: bool = False, **kwargs):
    """Trainer's label smoother with labels shifted (a causal LM's rule)."""
    return smoother(model_output, labels, shift_labels=True, **kwargs)


@functools.lru_cache(maxsize=None)
def trainer_class(base: type) -> type:
    """`base` (transformers.Trainer or any subclass of it, e.g. TRL's SFTTrainer) with PeftcTrainerMixin in front:
    checkpoints of a PeftModule are its adapters in PEFT's format, and resume loads them back. One class per base."""
    from transformers import Trainer as HFTrainer

    if not (isinstance(base, type) and issubclass(base, HFTrainer)):
        raise InputError(f"trainer_class takes transformers.Trainer or a subclass of it, got {base!r}")
    if issubclass(base, PeftcTrainerMixin):
        return base
    return type(f"Peftc{base.__name__}", (PeftcTrainerMixin, base),
                {"__module__": __name__, "__doc__": f"{base.__qualname__} for PeftModules (peftc.trainer_class)."})


def __getattr__(name: str):
    if name == "Trainer":       # made on first use: transformers' Trainer is imported only then
        return trainer_class(_hf_trainer())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hf_trainer() -> type:
    from transformers import Trainer as HFTrainer
    return HFTrainer
