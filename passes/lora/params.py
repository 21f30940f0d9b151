"""LoRA at parameter sites (passes.param_sites): a per-expert low-rank update of a stacked expert weight, applied to
each expert's own activations; no full-size delta is formed (PEFT adds B_e A_e to the whole weight every call).

    Before:  y = grouped_mm(x, transpose(W, -2, -1), offs)          W [E, out, in]; x [S, in] sorted by expert
    After:   y = grouped_mm(x, transpose(W, -2, -1), offs)
             y' = ExpertLora(x, y, offs, A, B, s)
                = y + s * grouped_mm(grouped_mm(x, A_E^T, offs), B_E^T, offs)      # (S, r) then (S, out)

    Before:  y = bmm(index(W, [ids]), x3)                            x3 [S, in, 1]: one expert per row
    After:   y' = ExpertLora(x3, y, ids, A, B, s) = y + s * bmm(B_E[ids], bmm(A_E[ids], x3))

A and B are PEFT's tensors (A, B, s: route inputs, the call's adapter's, as passes.lora.plain's): A [r E, in], expert
e's rows e r .. e r + r - 1, so A_E = A.view(E, r, in); B [out, r E], expert e's columns e, e + E, e + 2E, ..., so
B_E = B.view(out, r, E).permute(2, 0, 1) [E, out, r]. A weight stored [E, in, out] (is_transposed) takes the same
update in its layout. merge() folds W_e + s B_e A_e (expert_delta). As in PEFT there is no dropout, DoRA or
lora_bias on a parameter target (check_parameter_targets), and no mixed (per-row) batch: the gathered form leaves
these sites alone, and passes.lora.method refuses such an adapter from mixed batches.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.methods import form_module, work_dtype
from peftc.store import AdapterStore, site_key

from ..match import Site
from ..route import route_input
from .variants import variants_on
from .weights import LoraWeights


class ExpertLoraWeights(LoraWeights):
    """One adapter at an expert weight: A [r E, in], B [out, r E] (PEFT's layout), r per expert (its rank, as a
    capacity's rank is compared with). A_r and B_r are A and B (what checkpoints and merging read). No padded
    form: a declared capacity leaves it as it is (adding or deleting such an adapter rebuilds the graph)."""

    def __init__(self, r: int, experts: int, in_features: int, out_features: int, scale: float, init, dtype,
                 device, kind: str):
        super().__init__(0, in_features, out_features, scale, 0.0, True, dtype=dtype, device=device,
                         rank=r * experts, kind=kind)
        self.r, self.experts = r, experts
        self.reset(init)

    @property
    def A_r(self) -> torch.Tensor:
        return self.A

    @property
    def B_r(self) -> torch.Tensor:
        return self.B

    @property
    def padded(self):     # no padded copy (Adapter.padded is then False)
        raise AttributeError("expert LoRA weights have no padded form")

    @torch.no_grad()
    def reset(self, init=True) -> None:
        """PEFT's ParamWrapper inits: True (Kaiming-uniform A over `in`, zero B), "gaussian" (A ~ N(0, 1/r), r per
        expert), False (both as nn.Linear initialises them)."""
        if not getattr(self, "experts", 0):      # LoraWeights.__init__ (r = 0): nothing to draw yet
            return
        if init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.B)

    def zeros(self, rank: int) -> "ExpertLoraWeights":
        w = ExpertLoraWeights(self.r, self.experts, self.A.shape[1], self.B.shape[0], 0.0, True,
                              self.A.dtype, self.A.device, self.kind)
        return w.requires_grad_(False)


def factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_E [E, r, in], B_E [E, out, r]): views of PEFT's A [r E, in] and B [out, r E]."""
    return A.view(experts, -1, A.shape[-1]), B.view(B.shape[0], -1, experts).permute(2, 0, 1)


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, in] (rows sorted by group) times w [E, in, out] per group (offs: cumulative row counts): transformers'
    grouped_mm_fallback (a custom op with its own backward, opaque to torch.compile), else the same loop here."""
    try:
        op = torch.ops.transformers.grouped_mm_fallback
    except (AttributeError, RuntimeError):
        op = None
    if op is not None:
        return op(x, w, offs)
    out, start = [], 0
    for i, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[i])
        start = end
    out.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))      # rows past the last group (none in practice)
    return torch.cat(out)


class ExpertLora(nn.Module):
    """The update at one expert-weight site: (x, y, offs or ids, A, B, s) -> y + s * x A_e^T B_e^T per expert;
    in place on y where autograd needs neither (y feeds only this call)."""

    def __init__(self, kind: str, experts: int, weight_arg: int, path: str):
        super().__init__()
        self.kind, self.experts, self.weight_arg, self.path = kind, experts, weight_arg, path

    def forward(self, x, y, route, A, B, s):
        A_E, B_E = factors(A, B, self.experts)
        if self.kind == "grouped_mm":           # x [S, in], route = offs [E]
            h = _grouped(x, A_E.transpose(1, 2).contiguous(), route)                     # (S, r)
            u = _grouped(h, B_E.transpose(1, 2).contiguous(), route)                     # (S, out)
        elif self.weight_arg == 0:              # y = bmm(W[ids], x) with x [S, in, 1], route = ids [S]
            u = torch.bmm(B_E[route], torch.bmm(A_E[route], x))                           # (S, out, 1)
        else:                                   # y = bmm(x, W[ids]) with x [S, 1, in]
            u = torch.bmm(torch.bmm(x, A_E[route].transpose(1, 2)), B_E[route].transpose(1, 2))  # (S, 1, out)
        if torch.is_grad_enabled() and (u.requires_grad or y.requires_grad):
            return y + u * s
        return y.add_(u.mul_(s))

    def extra_repr(self) -> str:
        return f"{self.kind}, experts={self.experts}, site={self.path}"


def insert_param_lora(gm: GraphModule, calls: list[tuple[Site, Node]], store: AdapterStore, rank) -> int:
    """y' = ExpertLora(x, y, offs / ids, A, B, s) after every call of every parameter site in `calls` (plain form:
    the call's adapter's A, B and s are route inputs, zeros for an adapter that does not target the site).
    `rank(path)`: the A rows the graph's route inputs have there. Returns the number of rewritten calls."""
    g = gm.graph
    for site, node in calls:
        E = site.params["experts"]
        if site.kind == "grouped_mm":
            x, route = node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs["offs"]
        else:
            arg = site.params["weight_arg"]
            x, route = node.args[1 - arg], node.args[arg].args[1][0]         # bmm(W[ids], x) / bmm(x, W[ids])
        like = torch.empty(0, dtype=tensor_dtype(gm, site))
        r = rank(site.fqn)
        parts = [route_input(gm, ("lora", site.fqn, part), ex) for part, ex in
                 (("A", like.new_empty(r, site.in_features)), ("B", like.new_empty(site.out_features, r)),
                  ("s", like.new_empty(())))]
        target = form_module(gm, "single", ExpertLora(site.kind, E, site.params.get("weight_arg", 1), site.fqn), "e")
        with g.inserting_after(node):
            out = g.call_module(target, (x, node, route, *parts))
        out.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        out.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    return len(calls)


def tensor_dtype(gm: GraphModule, site: Site) -> torch.dtype:
    return gm.get_parameter(site.weight).dtype


def build_expert_lora(spec, site: Site, weight: torch.Tensor) -> ExpertLoraWeights:
    """LoRA's weights at an expert-weight site: rank and alpha from the parameter's name (as PEFT's patterns)."""
    at = site.pattern_path
    return ExpertLoraWeights(spec.rank_at(at), site.params["experts"], site.in_features, site.out_features,
                             spec.scale_at(at), spec.init, weight.dtype, weight.device, site.kind)


def expert_delta(adapter, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """merge()'s fold rule at an expert-weight site, in W's layout and work_dtype: s B_e A_e per expert, [E, out, in]
    (transposed for a weight stored [E, in, out])."""
    w = adapter.sites[site_key(site.fqn)]
    dt = work_dtype(weight.dtype, w.A.dtype)
    A_E, B_E = factors(w.A.detach().to(dt), w.B.detach().to(dt), w.experts)
    delta = w.scale * torch.bmm(B_E, A_E)                                        # (E, out, in)
    return delta.transpose(1, 2) if site.params["transposed"] else delta


def expert_param_count(spec, site: Site) -> int:
    """E experts x (A_e [r, in] + B_e [out, r])."""
    return site.params["experts"] * spec.rank_at(site.pattern_path) * (site.in_features + site.out_features)


def check_parameter_targets(spec, sites: dict[str, Site], chosen: list[str]) -> None:
    """PEFT's ParamWrapper refusals, by name, for an adapter with parameter targets: no dropout (it cannot be
    factored out of a weight update), DoRA, lora_bias, weight-derived inits, or trained biases."""
    first = next((p for p in chosen if sites[p].param or sites[p].key), None)
    if first is None:
        return
    name = sites[first].key or first
    bad = ["dropout"] if spec.dropout > 0 else []
    bad += [v.option(spec) for v in variants_on(spec) if "param" not in v.serves]    # DoRA, lora_bias, inits
    bad += [f"bias={spec.bias!r}"] if spec.bias != "none" else []
    if bad:
        raise SpecError(f"{', '.join(bad)} with target_parameters (e.g. {name!r}) is not supported (PEFT's "
                        "ParamWrapper refuses it too: a parameter's update is a weight delta, so dropout cannot "
                        "apply to its input); drop the option, or leave target_parameters out")


def param_targets_refusal(adapter) -> str | None:
    """Why an adapter with parameter targets cannot join a mixed batch, or None."""
    names = getattr(adapter, "peft_paths", {})
    if not names:
        return None
    first = next(iter(names))
    return (f"it adapts parameters through target_parameters (e.g. {first}), which the per-row form does not serve "
            "(PEFT refuses adapter_names with target_parameters too)")
