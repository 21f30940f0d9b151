"""peftc: parameter-efficient fine-tuning as a compiler (trace -> match -> rewrite -> emit)."""
from __future__ import annotations

import logging
import os

from .blocks import Block
from .compiler import compile, load_adapter
from .errors import (CheckpointError, ExportError, GenerationError, InputError, MergeError, MissingDependency,
                     PassError, PeftcError, SpecError, TargetNotFound, TraceError, UnknownAdapter)
from .compiled import CompiledPeftModule
from .export import export_merged
from .hf_trainer import trainer_class
from .loftq import replace_lora_weights_loftq
from .module import MergedModule, PeftModule
from .peft_surface import LayerStatus, ModelStatus
from .methods import METHODS, Method, register_method
from .passes.ia3 import IA3
from .passes.lora import LoRA
from .spec import AdapterSpec
from .store import Capacity

__all__ = ["compile", "load_adapter", "PeftModule", "LoRA", "IA3", "PeftcError", "SpecError", "TargetNotFound",
           "TraceError", "PassError", "CheckpointError", "InputError", "MergeError", "ExportError", "MissingDependency",
           "GenerationError", "MergedModule", "export_merged", "CompiledPeftModule", "Capacity", "AdapterSpec",
           "Method", "METHODS", "register_method", "Block", "replace_lora_weights_loftq",
           "LayerStatus", "ModelStatus", "trainer_class", "Trainer", "UnknownAdapter"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The spec class of any registered built-in method by its name (peftc.IA3, ...): each is defined in its own
    pass file, which registers it; and peftc.Trainer, transformers.Trainer for PeftModules (peftc.hf_trainer),
    which imports transformers' Trainer on first use."""
    if name == "Trainer":
        from . import hf_trainer
        return hf_trainer.Trainer
    for m in METHODS.values():
        if m.name == name:
            return m.spec
    raise AttributeError(f"module 'peftc' has no attribute {name!r}")

if os.environ.get("PEFTC_LOG"):
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("peftc").setLevel(os.environ["PEFTC_LOG"].upper())
    
