"""Matching pass: linear / GPT-2 Conv1D sites, their attention roles (q, k, v, o) and the output heads."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftc.passes.match import find_sites, module_path, output_heads
from peftc.trace import trace
from tests.models import make

aten = torch.ops.aten
D, H = 16, 2


class Attn(nn.Module):
    """q/k/v/o projections around SDPA, then an MLP and a head: the smallest graph with every role."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(D, 3 * D)
        else:
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.up = nn.Linear(D, 2 * D)
        self.head = nn.Linear(2 * D, 4)

    def forward(self, x):                                           # (B, T, D)
        B, T, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        h = x + self.o(a)
        return self.head(F.gelu(self.up(h)))                       # (B, T, 4)


X = torch.randn(2, 5, D)


@functools.lru_cache(maxsize=None)
def hf_sites(arch: str):
    model = make(arch)
    gm = trace(model).gm
    sites = find_sites(gm)
    return gm, sites, output_heads(gm, sites)


def _sites(model, x=X):
    gm = trace(model.eval(), (x,)).gm
    sites = find_sites(gm)
    gm.graph.lint()
    return gm, sites


def test_plain_linears_become_sites_in_graph_order_with_roles():
    gm, sites = _sites(Attn())
    assert list(sites) == ["q", "k", "v", "o", "up", "head"]
    roles = {f: s.roles for f, s in sites.items()}
    assert roles == {"q": {"q"}, "k": {"k"}, "v": {"v"}, "o": {"o"}, "up": set(), "head": set()}
    for f, s in sites.items():
        assert s.kind == "linear" and s.module_type == "Linear" and s.name == f
        assert s.weight == f"{f}.weight"
        assert [n.target for n in s.nodes] == [aten.linear.default]
        assert module_path(s.nodes[0]) == (f, "Linear")
    assert (sites["up"].in_features, sites["up"].out_features) == (D, 2 * D)
    assert (sites["head"].in_features, sites["head"].out_features) == (2 * D, 4)


def test_fused_qkv_projection_has_all_three_roles():
    _, sites = _sites(Attn(fused=True))
    assert sites["qkv"].roles == {"q", "k", "v"}
    assert sites["o"].roles == {"o"}
    assert (sites["qkv"].in_features, sites["qkv"].out_features) == (D, 3 * D)


def test_module_called_twice_is_one_site_with_two_nodes():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    _, sites = _sites(Twice())
    assert list(sites) == ["lin"]
    assert len(sites["lin"].nodes) == 2
    assert sites["lin"].roles == set()


def test_computed_weight_and_plain_addmm_are_not_sites():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D, D))
            self.b = nn.Parameter(torch.randn(D))
            self.lin = nn.Linear(D, D)

        def forward(self, x):                                   # (B, D)
            y = F.linear(x, self.w * 2)                         # weight computed in the graph
            y = torch.addmm(self.b, y, self.w)                  # addmm outside a Conv1D
            return self.lin(y)

    gm, sites = _sites(Odd(), torch.randn(2, D))
    assert list(sites) == ["lin"]
    assert any(n.target == aten.addmm.default for n in gm.graph.nodes)


def test_no_sdpa_means_no_roles():
    mlp = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 3))
    _, sites = _sites(mlp)
    assert list(sites) == ["0", "2"]
    assert all(not s.roles for s in sites.values())


def test_output_heads_are_the_last_sites_before_the_output():
    gm, sites = _sites(Attn())
    assert output_heads(gm, sites) == {"head"}

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(D, D), nn.Linear(D, 2), nn.Linear(D, 3)

        def forward(self, x):
            h = self.body(x)
            return self.a(h), self.b(h) * 2                      # elementwise ops do not hide a head

    gm, sites = _sites(TwoHeads())
    assert output_heads(gm, sites) == {"a", "b"}

    class Residual(nn.Module):                                  # a residual path skips no site: both reach output
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            h = self.a(x)
            return h + self.b(h)

    gm, sites = _sites(Residual())
    assert output_heads(gm, sites) == {"a", "b"}


# arch -> (module path prefix of layer 0, {role: site name}, site kind, output head)
HF_ROLES = {
    "llama": ("model.layers.0.self_attn.", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}, "linear",
              "lm_head"),
    "gpt2": ("transformer.h.0.attn.", {"q": "c_attn", "k": "c_attn", "v": "c_attn", "o": "c_proj"}, "conv1d",
             "lm_head"),
    "bert": ("bert.encoder.layer.0.attention.", {"q": "self.query", "k": "self.key", "v": "self.value",
                                                 "o": "output.dense"}, "linear", "classifier"),
    "vit": ("vit.layers.0.attention.", {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}, "linear",
            "classifier"),
}


@pytest.mark.parametrize("arch", list(HF_ROLES))
def test_hf_attention_roles(arch):
    prefix, by_role, kind, _ = HF_ROLES[arch]
    _, sites, _ = hf_sites(arch)
    for layer in ("0", "1"):
        p = prefix.replace(".0.", f".{layer}.")
        expected: dict[str, set] = {}
        for role, name in by_role.items():
            expected.setdefault(p + name, set()).add(role)
        got = {f: s.roles for f, s in sites.items() if s.roles and f.startswith(p)}
        assert got == expected
        assert all(sites[f].kind == kind for f in expected)
    n_roles = sum(len(s.roles) for s in sites.values())
    assert n_roles == 2 * 4                                    # 2 layers x q, k, v, o; nothing else has a role


@pytest.mark.parametrize("arch", list(HF_ROLES))
def test_hf_output_heads(arch):
    _, sites, heads = hf_sites(arch)
    assert heads == {HF_ROLES[arch][3]}
    assert sites[HF_ROLES[arch][3]].kind == "linear"


def test_gpt2_conv1d_is_matched_as_addmm_with_transposed_weight():
    gm, sites, _ = hf_sites("gpt2")
    conv = {f: s for f, s in sites.items() if s.kind == "conv1d"}
    assert len(conv) == 2 * 4                                  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    c_attn = sites["transformer.h.0.attn.c_attn"]
    assert c_attn.module_type == "Conv1D"
    assert [n.target for n in c_attn.nodes] == [aten.addmm.default]
    assert c_attn.nodes[0].args[2].target == c_attn.weight == "transformer.h.0.attn.c_attn.weight"
    assert tuple(gm.get_parameter(c_attn.weight).shape) == (64, 192)            # Conv1D stores W as [in, out]
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    fc = sites["transformer.h.0.mlp.c_fc"]
    assert (fc.in_features, fc.out_features) == (64, 256)
    proj = sites["transformer.h.0.mlp.c_proj"]
    assert (proj.in_features, proj.out_features) == (256, 64)
