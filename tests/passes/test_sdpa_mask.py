"""Attention-mask pass: a boolean SDPA mask becomes one shared float mask, with outputs bit for bit the same."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.sdpa_mask import SDPA, float_attention_masks
from peftc.trace import trace
from tests.models import inputs, main_output, make


class TwoLayers(nn.Module):
    def forward(self, x, keep):                                     # x: (B, H, T, D); keep: (B, T) bool
        mask = keep[:, None, None, :] & keep[:, None, :, None]      # (B, 1, T, T)
        h = F.scaled_dot_product_attention(x, x, x, attn_mask=mask)
        return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)


def test_one_float_mask_for_every_layer_same_outputs():
    model = TwoLayers()
    x = torch.randn(2, 2, 5, 4)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, :2] = False                                             # a padded row
    gm = trace(model, (x, keep)).gm
    assert float_attention_masks(gm) == 2
    gm.graph.lint()
    gm.recompile()
    masks = {n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
             for n in gm.graph.nodes if n.target is SDPA}
    (mask,) = masks
    assert mask.target == torch.ops.aten.masked_fill.Scalar          # shared by both layers
    x2, keep2 = torch.randn(3, 2, 5, 4), torch.rand(3, 5) > 0.3      # another batch than traced
    keep2[:, 0] = True
    assert torch.equal(gm(x2, keep2), model(x2, keep2))


def test_training_keeps_one_float_mask_for_backward():
    model = TwoLayers()
    x = torch.randn(2, 2, 5, 4)
    keep = torch.ones(2, 5, dtype=torch.bool)
    gm = trace(model, (x, keep)).gm
    float_attention_masks(gm)
    gm.recompile()
    masks = []
    xg = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: masks.append(t) or t, lambda t: t):
        gm(xg, keep).sum().backward()
    square = {t.untyped_storage().data_ptr() for t in masks if t.shape[-2:] == (5, 5) and t.is_floating_point()}
    assert len(square) <= 1


def test_float_masks_are_left_alone():
    class Additive(nn.Module):
        def forward(self, x, bias):
            return F.scaled_dot_product_attention(x, x, x, attn_mask=bias)
    gm = trace(Additive(), (torch.randn(2, 2, 5, 4), torch.zeros(2, 1, 5, 5))).gm
    assert float_attention_masks(gm) == 0


@pytest.mark.parametrize("arch", ["llama", "vit"])
def test_real_architectures_bit_for_bit(arch):
    model = make(arch)
    traced = trace(model)
    gm = traced.gm
    x = inputs(arch)
    with torch.no_grad():
        before = main_output(gm(**x, **traced.constants))
        assert float_attention_masks(gm) == model.config.num_hidden_layers
        gm.graph.lint()
        gm.recompile()
        assert torch.equal(main_output(gm(**x, **traced.constants)), before)
