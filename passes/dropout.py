"""Dropout pass: make the dropouts traced in train mode follow the PeftModule's train()/eval() mode.

torch.export bakes the mode in at trace time; peftc traces in train mode and turns each dropout into a module call,
so one graph serves both modes.

    Before:  y = aten.dropout(x, 0.1, True)          a = aten.scaled_dot_product_attention(q, k, v, m, 0.1)
    After:   y = self.peftc_dropout_0(x)             a = self.peftc_sdpa_1(q, k, v, m, 0.1)
             (the same op with train=self.training)   (dropout_p is 0.0 in eval)

Ops that take their mode as an argument (bitsandbytes' 8-bit matmul, whose CPU kernel differs between training and
inference) read it from the graph's mode flag:

    Before:  y = peftc.linear_8bit(x, CB, SCB, b, 6.0, True)
    After:   m = self.peftc_mode();  y = peftc.linear_8bit(x, CB, SCB, b, 6.0, m)     (m: self.training)

Every dropout kind keeps its own op (element-wise, channel-wise "feature", alpha); in-place variants become their
out-of-place op (the result is what the graph uses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

import peftc.quant  # noqa: F401  (registers torch.ops.peftc)

aten = torch.ops.aten
# traced op -> the out-of-place op called with train=self.training
DROPOUTS = {
    aten.dropout.default: aten.dropout.default,                        # nn.Dropout
    aten.dropout_.default: aten.dropout.default,                       # nn.Dropout(inplace=True)
    aten.feature_dropout.default: aten.feature_dropout.default,        # nn.Dropout1d/2d/3d
    aten.feature_dropout_.default: aten.feature_dropout.default,
    aten.alpha_dropout.default: aten.alpha_dropout.default,            # nn.AlphaDropout
    aten.alpha_dropout_.default: aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default: aten.feature_alpha_dropout.default,   # nn.FeatureAlphaDropout
    aten.feature_alpha_dropout_.default: aten.feature_alpha_dropout.default,
}
# op -> the index of its `training` argument
MODE_ARGS = {torch.ops.peftc.linear_8bit.default: 5}
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class ModeAwareDropout(nn.Dropout):
    """A traced dropout op that applies only in train mode. An nn.Dropout, so code that sets `p` on a model's
    dropouts (TRL's disable_dropout_in_model) reaches it."""

    def __init__(self, op, p: float):
        nn.Module.__init__(self)
        self.op, self.p, self.inplace = op, float(p), False

    def forward(self, x):
        return self.op(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{self.op.__name__}, p={self.p}"


class ModeAwareSDPA(nn.Module):
    """scaled_dot_product_attention whose dropout applies only in train mode."""

    def forward(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
        p = dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(query, key, value, attn_mask, p, is_causal, scale=scale,
                                              enable_gqa=enable_gqa)


class Mode(nn.Module):
    """The module's mode (self.training) as a value in the graph."""

    def forward(self) -> bool:
        return self.training


def replace_with_module(gm: GraphModule, node: Node, name: str, module: nn.Module, args, kwargs) -> Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, tuple(args), dict(kwargs))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def make_dropout_mode_aware(gm: GraphModule) -> int:
    """Rewrite every train-mode dropout and SDPA-with-dropout; returns the number of rewrites."""
    count = 0
    mode = None
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in MODE_ARGS:
            if mode is None:
                gm.add_submodule("peftc_mode", Mode())
                with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
                    mode = gm.graph.call_module("peftc_mode", ())
            node.update_arg(MODE_ARGS[node.target], mode)
            count += 1
        elif node.target in DROPOUTS:
            x, p, train = node.args[0], float(node.args[1]), node.args[2]
            if p == 0.0 or train is False:
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
            else:
                replace_with_module(gm, node, f"peftc_dropout_{count}", ModeAwareDropout(DROPOUTS[node.target], p),
                                    (x,), {})
            count += 1
        elif node.target == aten.scaled_dot_product_attention.default:
            bound = dict(zip(SDPA_ARGS, node.args), **node.kwargs)
            if float(bound.get("dropout_p", 0.0)) > 0.0:
                replace_with_module(gm, node, f"peftc_sdpa_{count}", ModeAwareSDPA(), (), bound)
                count += 1
    return count
