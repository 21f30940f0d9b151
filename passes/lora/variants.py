"""LoRA's variants as data, kept apart from the base method as PEFT keeps them apart from its base layer: one frozen
Variant per variant in VARIANTS, declaring what the method surface (passes.lora.method) and the forms read.

    variant      on when                        adds at a site                 serves              mixed  capacity
    dora         use_dora                       magnitude m (out)              linear, conv1d,     no     its rescale
                                                lora_magnitude_vector          embedding, conv
    lora_bias    lora_bias                      B's bias b_B (out)             linear, conv1d,     yes    rebuild
                                                lora_B.bias                    conv
    pissa        init pissa / pissa_niter_N     its residual base weight       linear, conv1d      no     rebuild
    olora        init olora                     its residual base weight       linear              no     rebuild
    orthogonal   init orthogonal                -                              linear, conv1d      yes    as data
    loftq        init loftq                     its quantized base weight      linear              no     rebuild

Fold (merge): V + s B A - W, where V is the weight the adapter runs on (`base`: W, its residual or its quantized
weight); DoRA then rescales each output channel, g (V + s B A) - W; lora_bias adds s b_B to the layer's bias
(`fold_bias`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule

from peftc.targets import MHA

from ..match import Site
from ..route import route_input
from .dora import dora_args, dora_norm
from .inits import changes_base_weight, loftq_init
from .ops import LoraGroup

# where a site is, for the variants: its kind (passes.match), "attention" for an nn.MultiheadAttention's packed
# in_proj, "param" for a stacked expert weight (target_parameters)
WHERE = {"linear": "a linear layer", "conv1d": "a GPT-2 Conv1D layer", "embedding": "an embedding",
         "conv": "a convolution", "attention": "nn.MultiheadAttention", "param": "a parameter target",
         "linear4bit": "a 4-bit quantized linear layer", "linear8bit": "an 8-bit quantized linear layer"}
SERVED = {"linear": "linear", "conv1d": "Conv1D", "embedding": "embedding", "conv": "convolution",
          "linear4bit": "4-bit", "linear8bit": "8-bit"}
ATTENTION = ("{option} on {path} (nn.MultiheadAttention) is not supported (as in PEFT); leave it out of targets "
             "(exclude_modules) or drop the option")
ELSEWHERE = ("{option} on {path} ({what}, {type}) is not supported: peftc serves it on {served} layers; leave the "
             "layer out of targets (exclude_modules) or drop the option")


@dataclass(frozen=True)
class Variant:
    """One LoRA variant, as data.

    name:     its name (errors, logs)
    on:       (spec) -> whether an adapter of that spec has it
    option:   (spec) -> how errors name the spec's option ("use_dora", "init='pissa'")
    at:       (LoraWeights) -> whether an adapter's weights at a site have it
    tensors:  (LoraWeights attribute, PEFT checkpoint key after "<module path>.") it adds at a site
    channel_params: the trainable parameters it adds per output channel (param_count)
    serves:   the places (WHERE) it serves; elsewhere it is refused with refusals[where], else the default message
    mixed:    why an adapter with it cannot join a mixed batch (a template of `spec`), or None: it can
    graph:    (plain-form graph) -> the module paths where that graph serves it as data (a capacity then adds such an
              adapter without a rebuild); None: an adapter with it always rebuilds the graph
    route:    {route key part: LoraWeights attribute} of the plain form's route inputs it adds (passes.lora.values)
    inputs:   (gm, site, node, weight) -> the node(s) a plain-form site call passes for it, where an adapter has it
    build:    (weights, spec, site, the site's weight) -> None: its set-up at a site after A and B are drawn
    base:     (weights) -> the weight the adapter runs on instead of W (fold, build order), or None
    fold:     (weights, site, the weight it runs on, V + s B A) -> the adapter's weight, W' (fold), or None
    fold_bias: (weights) -> b, where merging adds s b to the layer's bias, or None
    """

    name: str
    on: Callable[[Any], bool]
    option: Callable[[Any], str]
    at: Callable[[Any], bool]
    tensors: tuple[tuple[str, str], ...] = ()
    channel_params: int = 0
    serves: tuple[str, ...] = ("linear", "conv1d", "embedding", "conv", "attention", "param")
    refusals: dict = field(default_factory=dict, hash=False, compare=False)
    mixed: Optional[str] = None
    graph: Optional[Callable[[GraphModule], set]] = None
    route: dict = field(default_factory=dict, hash=False, compare=False)
    inputs: Optional[Callable[..., Any]] = None
    build: Optional[Callable[..., None]] = None
    base: Optional[Callable[[Any], torch.Tensor]] = None
    fold: Optional[Callable[..., torch.Tensor]] = None
    fold_bias: Optional[Callable[[Any], torch.Tensor]] = None

    def refusal(self, spec, site: Site) -> Optional[str]:
        """Why the variant cannot serve `site` (an error message), or None."""
        where = where_of(site)
        if where in self.serves:
            return None
        template = self.refusals.get(where, ATTENTION if where == "attention" else ELSEWHERE)
        served = [SERVED[k] for k in self.serves if k in SERVED]
        return template.format(option=self.option(spec), path=site.fqn, what=WHERE[where],
                               type=site.module_type or site.kind,
                               served=", ".join(served[:-1]) + " and " + served[-1] if len(served) > 1 else served[0])


def where_of(site: Site) -> str:
    return "param" if site.param else "attention" if site.module_type == MHA else site.kind


def _magnitude(lw, spec, site: Site, weight: torch.Tensor) -> None:
    """m = ||V + s B A|| per output channel (V: the weight the adapter runs on), so a fresh adapter is the identity."""
    base = weight if lw.residual is None else lw.residual
    with torch.no_grad():
        lw.magnitude.copy_(dora_norm(base, lw.A_r, lw.B_r, lw.scale, site.kind).view(lw.magnitude.shape))


def _rescale(w, site: Site, base: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """g (V + s B A), g = m / ||V + s B A|| per output channel (1 where the norm is 0, as the unmerged graph has it)."""
    n = dora_norm(base, w.A_r, w.B_r, w.scale, site.kind)
    m = w.magnitude.detach().to(merged.dtype).flatten()
    g = torch.where(n > 0, m / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
    channel = 1 if site.kind in ("embedding", "conv1d") else 0                # the output channels' axis
    shape = [1] * merged.dim()
    shape[channel] = -1
    return g.view(shape) * merged


def _rescaled_paths(gm: GraphModule) -> set:
    """The sites where a plain-form graph has DoRA's rescale (its LoraGroup calls)."""
    return {p for g in gm.modules() if isinstance(g, LoraGroup) for p, on in zip(g.paths, g.dora) if on}


def _residual(lw, spec, site: Site, weight: torch.Tensor) -> None:
    lw.set_residual_init(spec.init, weight, site.kind == "conv1d")


def _is_pissa(init) -> bool:
    return changes_base_weight(init) and init != "olora"


_INIT = dict(option=lambda spec: f"init={spec.init!r}")
_RESIDUAL = dict(_INIT, at=lambda w: w.residual is not None, build=_residual, base=lambda w: w.residual,
                 mixed="it runs on its own residual base weights (init {spec.init!r}), which the per-row form does "
                       "not route")

DORA = Variant(
    "dora", on=lambda spec: spec.use_dora, option=lambda spec: "use_dora", at=lambda w: w.magnitude is not None,
    tensors=(("magnitude", "lora_magnitude_vector"),), channel_params=1,
    serves=("linear", "conv1d", "embedding", "conv", "linear4bit", "linear8bit"),
    mixed="it uses DoRA, whose per-channel rescale the per-row form does not have yet (PEFT refuses adapter_names "
          "with DoRA too)",
    graph=_rescaled_paths, route={"m": "magnitude", "d": "d_t"}, inputs=dora_args, build=_magnitude, fold=_rescale)

LORA_BIAS = Variant(
    "lora_bias", on=lambda spec: spec.lora_bias, option=lambda spec: "lora_bias", at=lambda w: w.B_bias is not None,
    tensors=(("B_bias", "lora_B.bias"),), channel_params=1,
    serves=("linear", "conv1d", "conv", "linear4bit", "linear8bit"),
    # PEFT 0.21.2 makes and saves the packed in_proj's lora_B.bias but never applies it (its forward adds only
    # s B A to in_proj_weight): an adapter with that bias would mean one thing here and another there
    refusals={"attention": "lora_bias on {path} (nn.MultiheadAttention) is not supported: PEFT keeps a bias for its "
                           "packed in_proj but never applies it, so the adapter would not carry over between peftc "
                           "and PEFT; leave it out of targets (exclude_modules) or pass lora_bias=False"},
    route={"c": "B_bias"},
    inputs=lambda gm, site, node, w: route_input(gm, ("lora", site.fqn, "c"), w.new_empty(site.out_features)),
    fold_bias=lambda w: w.B_bias)

PISSA = Variant("pissa", on=lambda spec: _is_pissa(spec.init), serves=("linear", "conv1d"), **_RESIDUAL)

OLORA = Variant(
    "olora", on=lambda spec: spec.init == "olora", serves=("linear",),
    refusals={"conv1d": "init 'olora' on {path} (a GPT-2 Conv1D layer) is not supported: PEFT's OLoRA factors the "
                        "stored [in, out] weight, which does not reproduce the layer; use 'pissa' or another init "
                        "there"},
    **_RESIDUAL)


def _loftq(lw, spec, site: Site, weight: torch.Tensor) -> None:
    """LoftQ (inits.loftq_init): A, B and the quantized-dequantized weight the adapter runs on, from `weight`."""
    lw.set_base(*loftq_init(weight, lw.r, spec.loftq_bits, spec.loftq_iter))


# PEFT 0.21.2 factors a Conv1D's stored [in, out] weight (its adapter then fails at the forward, or on a square layer
# no longer reproduces it), and its embedding and convolution layers call loftq_init without the config (a TypeError)
_NOT_LOFTQ = "init 'loftq' on {path} ({what}) is not supported: {why}; leave the layer out of targets " \
             "(exclude_modules) or use another init"
LOFTQ = Variant(
    "loftq", on=lambda spec: spec.init == "loftq", serves=("linear",),
    refusals={"conv1d": _NOT_LOFTQ.replace("{why}", "PEFT's LoftQ factors the stored [in, out] weight, which does not "
                                                    "reproduce the layer (its adapter fails at the forward)"),
              "embedding": _NOT_LOFTQ.replace("{why}", "PEFT's LoftQ fails on embeddings (it serves linear layers)"),
              "conv": _NOT_LOFTQ.replace("{why}", "PEFT's LoftQ fails on convolutions (it serves linear layers)")},
    **dict(_RESIDUAL, build=_loftq))

ORTHOGONAL = Variant("orthogonal", on=lambda spec: spec.init == "orthogonal", at=lambda w: False,
                     serves=("linear", "conv1d"), **_INIT)

VARIANTS: tuple[Variant, ...] = (DORA, LORA_BIAS, PISSA, OLORA, ORTHOGONAL, LOFTQ)


def variants_on(spec) -> list[Variant]:
    """The variants an adapter of `spec` has, in table order."""
    return [v for v in VARIANTS if v.on(spec)]


def variants_at(w) -> list[Variant]:
    """The variants an adapter's weights at one site have, in table order."""
    return [v for v in VARIANTS if v.at(w)]
