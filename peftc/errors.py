"""peftc's exceptions: each one says what was expected, what was found, and what to do next."""
from __future__ import annotations


class PeftcError(Exception):
    """Base class of every error peftc raises on purpose."""


class SpecError(PeftcError, ValueError):
    """An adapter spec (or an adapter_config.json) is malformed or does not fit the model."""


class TargetNotFound(SpecError):
    """A target name or pattern matched no linear layer."""


class TraceError(PeftcError):
    """torch.export could not trace the model."""


class PassError(PeftcError):
    """A compiler pass failed; the message names the pass and the passes that ran before it."""


class CheckpointError(PeftcError):
    """An adapter directory is missing, malformed, truncated, or made for another base model."""


class InputError(PeftcError, TypeError):
    """A PeftModule was called with inputs it was not traced for."""


class UnknownAdapter(InputError, KeyError):
    """An adapter name that the module does not hold: the same error wherever a name is taken (set_adapter, save,
    merge, export, per-row adapter_names, ...). A KeyError too, as a dict lookup's."""

    def __init__(self, names, known, where: str = ""):
        names = [names] if isinstance(names, str) or names is None else sorted(names, key=str)
        what = f"adapter {names[0]!r}" if len(names) == 1 else f"adapters {names}"
        super().__init__(f"unknown {what}{f' in {where}' if where else ''}; adapters: {list(known)}; give one of "
                         "those, or add it first (add_adapter / load_adapter)")
        self.names, self.known = names, list(known)

    def __str__(self) -> str:            # KeyError's own would quote the message
        return str(self.args[0])


class MergeError(PeftcError):
    """An adapter cannot be folded into the weights (a method that is no weight update, or non-finite weights)."""


class ExportError(PeftcError):
    """An export target path or dtype is unusable; nothing existing was changed."""


class MissingDependency(PeftcError, ImportError):
    """An optional package a feature needs (bitsandbytes for quantization) is not installed; the message names it."""


class GenerationError(PeftcError, ValueError):
    """generate cannot run as asked: the model is no causal LM, an option is not supported, or the prompt and the
    new tokens do not fit the model's positions."""
