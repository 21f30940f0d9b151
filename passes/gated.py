"""Gated-activation pass: `act(a) * b` (the SwiGLU / GeGLU MLP of Llama, Qwen2, Mistral, Gemma, ...) as one op whose
backward keeps a and b only and computes act(a) again, instead of also keeping act(a).

    Before:  s = aten.silu(a);  y = aten.mul(s, b)     autograd keeps a (for silu), s and b (for mul)
    After:   y = self.peftc_gated_0(a, b)              keeps a and b (s is recomputed in backward)

Outputs and gradients are the same ops' as before, bit for bit: forward act(a) * b, backward
grad_a = act_backward(g * b, a) and grad_b = g * act(a). Without autograd (eval, no_grad, inference_mode) the module
runs the two ops it replaced. The module also tells later passes how to make its output again from its inputs
(`recipe`), so that a LoRA site reading it (down_proj) need not keep a copy of it either (passes.lora.ops).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .dropout import replace_with_module

aten = torch.ops.aten
ACTS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}


def _act(a: torch.Tensor, act: str, approximate: str) -> torch.Tensor:
    return aten.silu(a) if act == "silu" else aten.gelu(a, approximate=approximate)


def gated_product(a: torch.Tensor, b: torch.Tensor, act: str, approximate: str = "none") -> torch.Tensor:
    """act(a) * b with the ops the traced graph had."""
    return _act(a, act, approximate) * b


class _GatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, act, approximate):
        ctx.act, ctx.approximate = act, approximate
        ctx.save_for_backward(a, b)
        return gated_product(a, b, act, approximate)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        g_a = g_b = None
        if need_a:      # what MulBackward then SiluBackward / GeluBackward compute
            g_s = g * b
            g_a = (aten.silu_backward(g_s, a) if ctx.act == "silu"
                   else aten.gelu_backward(g_s, a, approximate=ctx.approximate))
        if need_b:
            g_b = g * _act(a, ctx.act, ctx.approximate)
        return g_a, g_b, None, None


class GatedAct(nn.Module):
    """act(a) * b; in training a backward that keeps a and b only."""

    def __init__(self, act: str, approximate: str = "none"):
        super().__init__()
        self.act, self.approximate = act, approximate

    def forward(self, a, b):
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _GatedFn.apply(a, b, self.act, self.approximate)
        return gated_product(a, b, self.act, self.approximate)

    def recipe(self):
        """A picklable function of this module's inputs that returns its output (for recomputing it)."""
        return functools.partial(gated_product, act=self.act, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"act={self.act}" + (f", approximate={self.approximate}" if self.approximate != "none" else "")


def _val(n) -> torch.Tensor | None:
    return n.meta.get("val") if isinstance(n, Node) else None


def fuse_gated_activations(gm: GraphModule) -> int:
    """Rewrite every `mul(act(a), b)` whose act(a) has no other use and whose operands agree in shape and dtype;
    returns the number of rewrites."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2:
            continue
        for i in (0, 1):
            s, b = node.args[i], node.args[1 - i]
            if not (isinstance(s, Node) and s.op == "call_function" and s.target in ACTS and len(s.users) == 1):
                continue
            a, out, vb, va = s.args[0], _val(node), _val(b), _val(s.args[0])
            if any(not isinstance(t, torch.Tensor) for t in (out, vb, va)):
                continue
            if not (va.shape == vb.shape == out.shape and va.dtype == vb.dtype == out.dtype):
                continue      # broadcasting or type promotion: leave it to the two ops
            approximate = s.kwargs.get("approximate", s.args[1] if len(s.args) > 1 else "none")
            replace_with_module(gm, node, f"peftc_gated_{count}", GatedAct(ACTS[s.target], approximate), (a, b), {})
            gm.graph.erase_node(s)
            count += 1
            break
    return count
