"""Generation test helpers: an adapted tiny causal LM beside its PEFT twin (the same adapters, saved by peftc and
loaded by PeftModel.from_pretrained), a streamer that records what it is given, and counters of tracing work."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

import peftc
from tests.models import make
from tests.parity import randomize_ours_

BASE = "__base__"
# LoRA on attention, per architecture (GPT-2's fused q/k/v projection is c_attn)
ATTN = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "k_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj", "o_proj"], "gpt2": ["c_attn"]}
# the llama twin's further adapters: LoRA ones (one PEFT model holds them all, for mixed batches), and others
# (each with a PEFT model of its own: PEFT keeps one tuner type per model)
LLAMA_LORA = {"b": dict(r=2, alpha=4.0, targets=["k_proj", "o_proj"], init="gaussian"),
              "c": dict(r=6, alpha=12.0, targets="all-linear", init="gaussian"),
              "dora": dict(r=4, targets=["q_proj", "v_proj", "down_proj"], use_dora=True)}
LLAMA_OTHER = {"ia3": peftc.IA3(init_ia3_weights=False)}       # l drawn from N(0, 1): the adapter matters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread from the module's first fixture on (conftest's per-test fixture comes after module fixtures): the
    models are tiny, and two OpenMP threads on a busy 2-core machine run far slower. A test module takes it by
    importing it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclasses.dataclass
class Twin:
    """A PeftModule, PEFT's model with the same LoRA adapters (`ref`), PEFT models of other methods' adapters
    (`others`), and the plain model (`base`: transformers' own generate)."""

    arch: str
    pm: Any
    ref: PeftModel
    others: dict[str, PeftModel]
    base: torch.nn.Module
    directory: Path

    def peft(self, x: dict, adapter: Any = "default", **kw) -> torch.Tensor:
        """PEFT's (or transformers') generate on `x` with one adapter for every row (`adapter` a name), or one per
        row (a list: PEFT's adapter_names)."""
        if isinstance(adapter, list):
            return self.ref.generate(**x, adapter_names=adapter, **kw)
        if adapter == BASE:
            return self.base.generate(**x, **kw)
        if adapter in self.others:
            return self.others[adapter].generate(**x, **kw)
        self.ref.set_adapter(adapter)
        try:
            return self.ref.generate(**x, **kw)
        finally:
            self.ref.set_adapter("default")

    def ours(self, x: dict, adapter: Any = "default", **kw) -> torch.Tensor:
        names = adapter if isinstance(adapter, list) else [adapter] * x["input_ids"].shape[0]
        return self.pm.generate(**x, adapter_names=names, **kw)


def build_twin(arch: str, directory: Path, *, extra: bool = False) -> Twin:
    """`arch`'s model with a random LoRA adapter "default" on attention (nonzero B) and, with `extra` (llama), the
    adapters of LLAMA_LORA and LLAMA_OTHER; saved with pm.save_adapter and loaded into PEFT. The PeftModule has
    generated once (its decoder graphs are traced)."""
    pm = peftc.compile(make(arch), peftc.LoRA(r=4, alpha=8.0, targets=ATTN[arch], init="gaussian"))
    randomize_ours_(pm, seed=11)
    lora = LLAMA_LORA if extra else {}
    others = LLAMA_OTHER if extra else {}
    for i, (name, kw) in enumerate(lora.items()):
        pm.add_adapter(name, peftc.LoRA(**kw))
        randomize_ours_(pm, seed=20 + i, name=name)
    for name, spec in others.items():
        pm.add_adapter(name, spec)
    pm.eval()
    pm.save_adapter(directory)
    ref = PeftModel.from_pretrained(make(arch), directory).eval()
    for name in lora:
        ref.load_adapter(directory / name, adapter_name=name)
    ref.set_adapter("default")
    peft_others = {n: PeftModel.from_pretrained(make(arch), directory / n).eval() for n in others}
    twin = Twin(arch, pm, ref, peft_others, make(arch), directory)
    pm.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)       # traces the decoder graphs
    return twin


def new_tokens(out: torch.Tensor, x: dict) -> torch.Tensor:
    return out[:, x["input_ids"].shape[1]:]


class Recorder:
    """A streamer (transformers' put/end protocol) that keeps a copy of everything it is given."""

    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ended == 0, "put after end"
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)
