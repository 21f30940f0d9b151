"""The model's own loss, applied outside the graph (one traced graph serves calls with and without labels)."""
from __future__ import annotations

from typing import Any, Callable

import torch

# transformers' loss_type -> how its loss_function is called (transformers.loss.loss_utils.LOSS_MAPPING).
# kw: loss kwargs such as num_items_in_batch (HF Trainer's gradient-accumulation normalizer).
_CALLS: dict[str, Callable[..., torch.Tensor]] = {
    "ForCausalLM": lambda fn, logits, labels, cfg, kw: fn(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kw),
    "ForMaskedLM": lambda fn, logits, labels, cfg, kw: fn(logits=logits, labels=labels, vocab_size=cfg.vocab_size, **kw),
    "ForSequenceClassification": lambda fn, logits, labels, cfg, kw: fn(labels, logits, cfg, **kw),
    "ForImageClassification": lambda fn, logits, labels, cfg, kw: fn(labels, logits, cfg, **kw),
    "ForTokenClassification": lambda fn, logits, labels, cfg, kw: fn(logits, labels, cfg, **kw),
}


def loss_type_of(model: Any) -> str | None:
    """The transformers loss type of a model class (ForCausalLM, ForSequenceClassification, ...), if supported."""
    lt = getattr(model, "loss_type", None)
    if lt in _CALLS:
        return lt
    name = type(model).__name__
    found = next((k for k in _CALLS if name.endswith(k)), None)
    if found is None and callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None:
        found = "ForCausalLM"  # transformers' own fallback (GPT2LMHeadModel has no loss_type)
    return found


def compute_loss(loss_type: str, config: Any, logits: torch.Tensor, labels: torch.Tensor, **kw) -> torch.Tensor:
    from transformers.loss.loss_utils import LOSS_MAPPING

    return _CALLS[loss_type](LOSS_MAPPING[loss_type], logits, labels, config, kw)
