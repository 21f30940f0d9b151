"""Fuse pass: a quantized base op and the adapter module that follows it become one fused module with its own
backward, which dequantizes W again instead of keeping it and keeps as few activations as it can.

    Before:  q = peftc.linear_4bit(x, Wq4, absmax_q, ...);  k = peftc.linear_4bit(x, Wk4, absmax_k, ...)
             q', k' = self.peftc_single.g0(x, [q, k], [A_q, A_k], [B_q, B_k], [s_q, s_k], [p_q, p_k])   # LoraGroup
    After:   q', k' = self.peftc_single.g0(x, [[Wq4, absmax_q, ...], [Wk4, absmax_k, ...]],
                                           [A_q, A_k], [B_q, B_k], [s_q, s_k], [p_q, p_k])           # QuantLoraGroup

What fuses is a table (FUSIONS): one row per (base op kind, adapter module) -> fused module, so a new method or
quantization kind is a row. A fused module class says which arguments of the adapter call are the site outputs
(`bind`), what it refuses (`refusal`: DoRA, lora_bias) and how its own call reads (`args_of`); a quantized kind's
row names how the fused backward dequantizes W (BASES). A group call is fused when every site output it reads is a
call of an op with a row for that adapter module, reads the group's x and feeds only the group; anything else stays
as it is, with the reason logged. The pass runs on the plain form of a model with quantized sites
(peftc.pipeline.emit), unless turned off: peftc.compile(..., fuse_quant=False).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from peftc.quant import backward_weight_8bit, dequantize_4bit

from .lora.fused import QuantBase, QuantLoraGroup
from .lora.ops import LoraGroup
from .match import KINDS

log = logging.getLogger(__name__)


# --- how a fused backward gets W again, per quantized kind (the same formulas as peftc.quant's own backwards) ---------
def _weight_4bit(args, x_dtype: torch.dtype) -> torch.Tensor:
    packed, absmax, na, nc, no, _, out_f, in_f, bs, qt, cd = args
    return dequantize_4bit(packed, absmax, na, nc, no, out_f, in_f, bs, qt, cd)          # in the compute dtype


def _weight_8bit(args, x_dtype: torch.dtype) -> torch.Tensor:
    return backward_weight_8bit(args[0], args[1], x_dtype)                             # in x's dtype


def _base(kind: str, weight) -> QuantBase:
    k = KINDS[kind]
    return QuantBase(k.ops[0], weight, k.bias_arg - 1)     # args after x (input_arg 0)


BASES: dict[str, QuantBase] = {
    "linear4bit": _base("linear4bit", _weight_4bit),      # peftc::linear_4bit: nf4 / fp4, double quantization
    "linear8bit": _base("linear8bit", _weight_8bit),      # peftc::linear_8bit: LLM.int8()
}


@dataclass(frozen=True)
class Fusion:
    """One row: a base op kind (a BASES key) followed by an adapter module -> the fused module replacing both."""

    base: str
    adapter: type
    fused: type


FUSIONS: tuple[Fusion, ...] = (
    # linear_4bit(x, W4) -> LoraGroup(x, [y], A, B, s, p)  =>  QuantLoraGroup(x, [W4 args], A, B, s, p)
    Fusion("linear4bit", LoraGroup, QuantLoraGroup),
    # linear_8bit(x, CB, SCB) -> LoraGroup(x, [y], A, B, s, p)  =>  QuantLoraGroup(x, [CB args], A, B, s, p)
    Fusion("linear8bit", LoraGroup, QuantLoraGroup),
)


@functools.lru_cache(maxsize=None)
def _table(rows: tuple[Fusion, ...] = FUSIONS) -> dict[type, dict]:
    """adapter module type -> {base op -> Fusion}, built once; a row for an op and adapter already in it is
    refused."""
    out: dict[type, dict] = {}
    for row in rows:
        if row.base not in BASES:
            raise ValueError(f"fusion row {row} names base kind {row.base!r}; known: {', '.join(BASES)}")
        if row.fused.adapter is not row.adapter:
            raise ValueError(f"fusion row {row}: {row.fused.__name__} replaces {row.fused.adapter.__name__}, "
                             f"not {row.adapter.__name__}")
        for op in KINDS[row.base].ops:
            by_op = out.setdefault(row.adapter, {})
            if op in by_op:
                raise ValueError(f"fusion rows {by_op[op]} and {row} both fuse {op} with {row.adapter.__name__}")
            by_op[op] = row
    return out


def fuse_quantized(gm: GraphModule, rows: tuple[Fusion, ...] = FUSIONS) -> int:
    """Fuse every adapter call that follows quantized base calls with a row in `rows`; returns the number of site
    calls fused."""
    table = _table(rows)
    count = 0
    for call in list(gm.graph.nodes):
        if call.op != "call_module":
            continue
        adapter = gm.get_submodule(call.target)
        by_op = table.get(type(adapter))
        if by_op is None:
            continue
        fused_cls = next(iter(by_op.values())).fused
        bound = fused_cls.bind(call)
        ys = list(bound["ys"])
        found = [by_op.get(y.target) if isinstance(y, Node) and y.op == "call_function" else None for y in ys]
        if not any(found):
            continue                                   # no quantized site here: nothing to fuse
        why = _why_not(call, bound["x"], ys, found) or fused_cls.refusal(adapter, call)
        if why:
            log.info("fuse_quant: %s (%s) stays unfused: %s", call.target, ", ".join(adapter.paths), why)
            continue
        bases = [BASES[row.base] for row in found]
        owner, _, leaf = call.target.rpartition(".")
        gm.get_submodule(owner).add_module(leaf, fused_cls(adapter, bases))   # same target, the fused module
        call.args, call.kwargs = fused_cls.args_of(call, [list(y.args[1:]) for y in ys]), {}
        for y in ys:
            gm.graph.erase_node(y)
        count += len(ys)
    return count


def _why_not(call: Node, x, ys: list, found: list) -> str | None:
    """Why the group call cannot take its sites' base ops in, else None."""
    if not all(found):
        return "not every site of the group is a quantized call with a row in the table"
    if len({row.fused for row in found}) > 1:
        return "its sites' rows name different fused modules"
    for y in ys:
        if y.kwargs or y.args[KINDS[found[ys.index(y)].base].input_arg] is not x:
            return f"{y.name} does not read the group's input positionally"
        if set(y.users) != {call}:
            return f"{y.name} has other users ({', '.join(u.name for u in y.users if u is not call)})"
    return None
