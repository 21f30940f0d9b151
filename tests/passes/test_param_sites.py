"""Parameter sites (passes.param_sites) and LoRA on them (passes.lora.params): a stacked expert weight read by
grouped_mm or index + bmm, in both layouts, gets y_e + s x A_e^T B_e^T per expert; other reads are refused by op."""
from __future__ import annotations

import pytest
import torch
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
from torch import nn

import peftc
from peftc.errors import SpecError
from peftc.passes.lora.params import factors
from peftc.passes.param_sites import find_param_sites, param_reads
from peftc.trace import trace

E, D_IN, D_OUT, R = 3, 8, 6, 2


class Experts(nn.Module):
    """One expert per row (chosen from the row itself), W [E, out, in] or, transposed, [E, in, out]."""

    def __init__(self, form: str, transposed: bool):
        super().__init__()
        self.form, self.transposed = form, transposed
        self.is_transposed = transposed        # the layout as transformers declares it (PEFT reads this)
        self.w = nn.Parameter(torch.randn(E, D_IN, D_OUT) if transposed else torch.randn(E, D_OUT, D_IN))

    def forward(self, x, ids):                                  # x (S, in), ids (S,)
        if self.form == "grouped":
            ids_s, perm = torch.sort(ids)
            offs = torch.cumsum(torch.histc(ids_s.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
            w = self.w if self.transposed else self.w.transpose(-2, -1)
            y = torch.ops.transformers.grouped_mm_fallback(x[perm], w, offs)
            return y[torch.argsort(perm)]                       # (S, out), rows in the input's order
        if self.form == "einsum":
            return torch.einsum("si,eoi->seo", x, self.w).sum(1)
        w = self.w[ids]
        if self.transposed:
            return torch.bmm(x.unsqueeze(1), w).squeeze(1)      # (S, 1, in) @ (S, in, out)
        return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)        # (S, out, in) @ (S, in, 1)


class Net(nn.Module):
    def __init__(self, form: str, transposed: bool = False):
        super().__init__()
        self.experts = Experts(form, transposed)
        self.head = nn.Linear(D_OUT, 4)

    def forward(self, x):
        ids = (x[:, 0].abs() * 7).long() % E                   # a data-dependent expert per row
        return self.head(self.experts(x, ids)), ids


def example(rows: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed))


def reference(net: Net, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """The expected output: row n through expert e = ids[n] with W_e + s B_e A_e (in W's [out, in] view)."""
    A_E, B_E = factors(A, B, E)
    _, ids = net(x)
    W = net.experts.w.transpose(1, 2) if net.experts.transposed else net.experts.w     # (E, out, in)
    W = W + s * torch.bmm(B_E, A_E)
    return net.head(torch.einsum("si,soi->so", x, W[ids]))


CASES = [("grouped", False, "grouped_mm"), ("grouped", True, "grouped_mm"), ("bmm", False, "batched_mm"),
         ("bmm", True, "batched_mm")]


@pytest.mark.parametrize("form, transposed, kind", CASES)
def test_matches_each_form_and_layout(form, transposed, kind):
    torch.manual_seed(0)
    gm = trace(Net(form, transposed), (example(),)).gm
    sites = find_param_sites(gm)
    assert list(sites) == ["experts.w"]
    site = sites["experts.w"]
    assert (site.kind, site.in_features, site.out_features) == (kind, D_IN, D_OUT)
    assert site.params["experts"] == E and site.params["transposed"] == transposed
    assert site.state_key == "experts.w" and site.param and not site.linear_like


@pytest.mark.parametrize("form, transposed, kind", CASES)
def test_lora_per_expert_unmerged_and_merged(form, transposed, kind):
    torch.manual_seed(0)
    net = Net(form, transposed).eval()
    x0 = example()
    pm = peftc.compile(net, peftc.LoRA(r=R, alpha=4, targets=[], target_parameters=["experts.w"], init=False),
                       example_inputs=(x0,))
    w = pm.store["default"].sites["experts-w"]
    assert tuple(w.A.shape) == (R * E, D_IN) and tuple(w.B.shape) == (D_OUT, R * E)     # PEFT's layout
    pm.graph_module.graph.lint()
    x = example(rows=13, seed=1)                                                        # another row count
    with torch.no_grad():
        expected = reference(net, x, w.A, w.B, 4 / R)
        assert (pm(x)[0] - net(x)[0]).abs().max() > 1e-2
        torch.testing.assert_close(pm(x)[0], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(pm.merge()(x)[0], expected, rtol=0, atol=1e-5)


def test_other_reads_are_refused_naming_the_op():
    torch.manual_seed(0)
    net = Net("einsum")
    gm = trace(net, (example(),)).gm
    assert find_param_sites(gm) == {}
    assert any("einsum" in r for r in param_reads(gm, "experts.w"))
    with pytest.raises(SpecError, match=r"'experts\.w' is read by .*einsum.*cannot adapt"):
        peftc.compile(net, peftc.LoRA(targets=[], target_parameters=["w"]), example_inputs=(example(),))


def test_a_layout_the_module_declares_otherwise_is_refused():
    """PEFT takes in/out from the module's is_transposed; a graph that reads W the other way would not match it."""
    torch.manual_seed(0)
    net = Net("grouped", transposed=True)
    net.experts.is_transposed = False
    with pytest.raises(SpecError, match="is_transposed=False"):
        peftc.compile(net, peftc.LoRA(targets=[], target_parameters=["w"]), example_inputs=(example(),))
