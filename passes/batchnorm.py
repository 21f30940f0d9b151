"""Batch-norm pass: batch norms traced in train mode follow the PeftModule's mode and update only its own copies of
the running statistics (the user's model is never changed).

    Before:  add_(num_batches_tracked, 1)
             y = aten.batch_norm(x, w, b, running_mean, running_var, True, 0.1, 1e-5, False)
    After:   self.peftc_bn_count_0(num_batches_tracked)          (adds 1 in train mode only)
             y = self.peftc_bn_1(x, w, b, running_mean, running_var)   (batch statistics in train, running in eval)
             running_mean, running_var, num_batches_tracked: the graph's own clones
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .dropout import replace_with_module

aten = torch.ops.aten


class ModeAwareBatchNorm(nn.Module):
    def __init__(self, momentum: float | None, eps: float):
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var):
        return F.batch_norm(x, running_mean, running_var, weight, bias, self.training,
                            0.0 if self.momentum is None else self.momentum, self.eps)


class CountBatches(nn.Module):
    def forward(self, counter):
        if self.training:
            counter.add_(1)
        return counter


def _own_buffer(gm: GraphModule, node: Node) -> None:
    """Give the graph its own clone of a buffer it updates (instead of the tensor shared with the user's model)."""
    if isinstance(node, Node) and node.op == "get_attr":
        owner, _, leaf = node.target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if leaf in mod._buffers and not getattr(mod._buffers[leaf], "_peftc_owned", False):
            t = mod._buffers[leaf].detach().clone()
            t._peftc_owned = True
            mod._buffers[leaf] = t


def make_batchnorm_mode_aware(gm: GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.batch_norm.default and node.args[5] is True:
            x, w, b, rm, rv, _, momentum, eps = node.args[:8]
            for buf in (rm, rv):
                _own_buffer(gm, buf)
            replace_with_module(gm, node, f"peftc_bn_{count}", ModeAwareBatchNorm(momentum, eps),
                                (x, w, b, rm, rv), {})
            count += 1
        elif (node.target == aten.add_.Tensor and isinstance(node.args[0], Node) and node.args[0].op == "get_attr"
              and node.args[0].target.endswith("num_batches_tracked")):
            _own_buffer(gm, node.args[0])
            replace_with_module(gm, node, f"peftc_bn_count_{count}", CountBatches(), (node.args[0],), {})
            count += 1
    return count
