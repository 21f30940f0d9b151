"""Trace a model to an FX GraphModule with torch.export (non-strict, dynamic batch and sequence), sharing its weights."""
from __future__ import annotations

import inspect
import logging
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.export import Dim

from .blocks import block_paths
from .errors import PeftcError, TraceError
from .quant import stand_in

log = logging.getLogger(__name__)

TRACE_BATCH = 2  # batch 1 would be specialized by export (0/1 specialization)
TRACE_SEQ = 8


@dataclass
class Traced:
    """The traced graph plus what PeftModule needs to call it like the model."""

    gm: torch.fx.GraphModule
    input_names: tuple[str, ...]           # the graph's inputs, in order (kwargs form), or () for positional inputs
    constants: dict[str, Any]              # inputs fixed at trace time (use_cache=False)
    defaults: dict[str, Callable] = field(default_factory=dict)  # name -> fn(inputs) giving the model's default
    positional: bool = False
    example: tuple = ((), {})              # (args, kwargs) the graph was traced with, constants included
    dynamic: Any = None                    # their dynamic_shapes spec
    blocks: dict[str, str] = field(default_factory=dict)   # the model's repeated blocks: path -> class name


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _first_text_input(kw: dict) -> torch.Tensor:
    return kw["input_ids"]


def hf_example_inputs(model: nn.Module) -> tuple[dict, dict, dict, dict]:
    """(inputs, dynamic_shapes, constants, defaults) for a Hugging Face model, built from its config."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    batch = Dim("batch", min=1)
    constants: dict[str, Any] = {}
    if "use_cache" in params:
        constants["use_cache"] = False
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        x = torch.randn(TRACE_BATCH, cfg.num_channels, size, size, dtype=_dtype(model), device=_device(model))
        return {"pixel_values": x}, {"pixel_values": {0: batch}}, constants, {}
    vocab = getattr(cfg, "vocab_size", None)
    if not vocab:
        raise TraceError(f"{type(model).__name__}: cannot build example inputs (config has no vocab_size); "
                         "pass example_inputs=(...) or a dict of keyword inputs")
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 4096
    seq = Dim("seq", min=1, max=int(max_pos))
    ids = torch.randint(0, vocab, (TRACE_BATCH, TRACE_SEQ), device=_device(model))
    inputs = {"input_ids": ids}
    dyn: dict[str, Any] = {"input_ids": {0: batch, 1: seq}}
    defaults: dict[str, Callable] = {}
    if "attention_mask" in params:
        inputs["attention_mask"] = torch.ones_like(ids)
        dyn["attention_mask"] = {0: batch, 1: seq}
        defaults["attention_mask"] = lambda kw: torch.ones_like(_first_text_input(kw))
    if "token_type_ids" in params and getattr(cfg, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
        dyn["token_type_ids"] = {0: batch, 1: seq}
        defaults["token_type_ids"] = lambda kw: torch.zeros_like(_first_text_input(kw))
    return inputs, dyn, constants, defaults


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)   # past a quantized layer's codes
    return p.dtype if p is not None else torch.float32


class _ModuleTracker:
    """Global forward hooks that remember which module was running when tracing failed (the user's model is not
    touched)."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): (n or "<root>", type(m).__name__) for n, m in model.named_modules()}
        self.stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(mod, args):
            if id(mod) in self.names:
                self.stack.append(self.names[id(mod)])

        def post(mod, args, out):
            if id(mod) in self.names and self.stack:
                self.stack.pop()

        self.handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        return self

    def __exit__(self, et, ev, tb):
        if ev is not None and self.stack:
            self.failed_in = self.stack[-1]
        for h in self.handles:
            h.remove()


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch/peftc: where the user's code stopped tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = (os.sep + "torch" + os.sep, os.sep + "peftc" + os.sep, os.sep + "sympy" + os.sep)
    for fr in reversed(frames):
        if not any(s in fr.filename for s in skip):
            return f"{fr.filename}:{fr.lineno} ({fr.line})"
    return "unknown location"


def _with_autocast(device_type, dtype, enabled, cache_enabled, body, *args):
    with torch.autocast(device_type, dtype, enabled, cache_enabled):
        return body(*args)


def _inline_mode_wrappers(gm: torch.fx.GraphModule) -> None:
    """export wraps `with torch.no_grad()` regions (the rotary embedding's) in a higher-order op that torch.compile
    cannot re-trace once shapes are dynamic, and autocast regions in another. Grad-mode regions are inlined into the
    graph, their outputs detached when grad was off (no gradient leaves them, as before); autocast regions become a
    plain call of their body under autocast."""
    hop = torch.ops.higher_order
    grad_op = getattr(hop, "wrap_with_set_grad_enabled", None)
    autocast_op = getattr(hop, "wrap_with_autocast", None)
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if autocast_op is not None and node.target is autocast_op:
            node.target = _with_autocast
        elif grad_op is not None and node.target is grad_op:
            enabled, body_node, *args = node.args
            body = getattr(gm, body_node.target)
            phs = [n for n in body.graph.nodes if n.op == "placeholder"]
            if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
                continue   # a body with state of its own: leave the wrapper
            with g.inserting_before(node):
                outs = g.graph_copy(body.graph, dict(zip(phs, args)))
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                if not enabled:
                    outs = [g.call_function(torch.ops.aten.detach.default, (o,)) if isinstance(o, torch.fx.Node)
                            else o for o in outs]
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(outs[user.args[1]])
                    g.erase_node(user)
            if not node.users:
                g.erase_node(node)
                if not body_node.users:
                    g.erase_node(body_node)
                    delattr(gm, body_node.target)
    g.lint()
    gm.recompile()


def _share_frozen(gm: torch.fx.GraphModule) -> None:
    """Give the graph its own frozen Parameter objects that alias the model's storage (no copy; the model's own
    parameters keep their requires_grad). Tied weights stay tied."""
    new: dict[int, nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        q = new.setdefault(id(p), nn.Parameter(p.data, requires_grad=False))
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        mod._parameters[leaf] = q


def trace(model: nn.Module, example_inputs: Any = None) -> Traced:
    """Export `model` and return a plain GraphModule over its (shared, frozen) weights.

    The model is traced in train mode so dropout appears in the graph (passes.dropout makes it follow the PeftModule's
    mode); the model's own mode is restored afterwards.
    """
    constants: dict[str, Any] = {}
    defaults: dict[str, Callable] = {}
    positional = False
    if example_inputs is None:
        if not _is_hf(model):
            raise TraceError(
                f"{type(model).__name__} is not a Hugging Face model, so peftc cannot build example inputs; "
                "pass example_inputs=(tensor, ...) or example_inputs={'name': tensor, ...}"
            )
        kwargs, dyn, constants, defaults = hf_example_inputs(model)
        args: tuple = ()
        kwargs = {**kwargs, **constants}
        dyn = {**dyn, **{k: None for k in constants}}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
        dyn = {k: _auto_dims(v) for k, v in kwargs.items()}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs, positional = tuple(example_inputs), {}, True
        dyn = tuple(_auto_dims(v) for v in args)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs, positional = (example_inputs,), {}, True
        dyn = (_auto_dims(example_inputs),)
    else:
        raise TraceError(f"example_inputs must be a tuple of args or a dict of kwargs, got {type(example_inputs).__name__}")

    gm = export_graph(model, model, args, kwargs, dyn, train=True)
    names = tuple(kwargs) if not positional else ()
    log.debug("traced %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return Traced(gm=gm, input_names=names, constants=constants, defaults=defaults, positional=positional,
                  example=(args, kwargs), dynamic=dyn, blocks=block_paths(model))


def export_graph(model: nn.Module, root: nn.Module, args: tuple, kwargs: dict, dyn: Any, *,
                 train: bool) -> torch.fx.GraphModule:
    """torch.export `root` (the model itself, or a module whose forward calls it with the model's own module paths)
    in train or eval mode, bitsandbytes layers stood in by peftc's ops, and return a plain GraphModule over the
    model's (shared, frozen) weights. The model's modes and layers are restored whatever happens; a failure is a
    TraceError naming the module where tracing stopped."""
    was_training = {m: m.training for m in model.modules()}
    tracker = None
    try:
        model.train(train)
        with stand_in(model):       # bitsandbytes layers as peftc's ops while tracing; the model's own afterwards
            tracker = _ModuleTracker(model)
            with tracker:
                ep = export_with_fallback(root, args, kwargs, dyn)
    except PeftcError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the culprit named
        where = tracker.failed_in if tracker is not None else None
        culprit = f"module '{where[0]}' ({where[1]})" if where else f"model {type(model).__name__}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: tracing stopped in {culprit} at {_user_frame(e)}: "
            f"{type(e).__name__}: {first}\n"
            "What to try: remove data-dependent Python control flow (if on tensor values, .item(), .tolist(), numpy) "
            "from that forward or rewrite it with torch.cond / torch.where; make sure example_inputs are what the "
            "model takes; set PEFTC_LOG=debug for the full torch.export error."
        ) from e
    finally:
        for m, t in was_training.items():
            m.training = t
    src = ep.module()
    gm = torch.fx.GraphModule(src, src.graph)
    _share_frozen(gm)
    _inline_mode_wrappers(gm)
    return gm


def export_with_fallback(model: nn.Module, args: tuple, kwargs: dict, dyn: Any) -> torch.export.ExportedProgram:
    """torch.export with our named Dims; if export cannot prove guards that hold over the whole declared range
    (seen with transformers' CUDA mask code: "Constraints violated"), retry with Dim.AUTO and require the result to
    keep every dimension we declared dynamic."""
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # noqa: BLE001
        if "Constraints violated" not in str(e):
            raise
        log.debug("export with named dims failed (%s); retrying with Dim.AUTO", str(e).splitlines()[0])
    auto = torch.utils._pytree.tree_map(lambda d: Dim.AUTO if isinstance(d, torch.export.dynamic_shapes._Dim) else d,
                                        dyn, is_leaf=lambda d: isinstance(d, torch.export.dynamic_shapes._Dim))
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=auto, strict=False)
    user = set(ep.graph_signature.user_inputs)
    static = [n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in user
              and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() >= 1
              and isinstance(n.meta["val"].shape[0], int)]
    if static:
        raise TraceError(f"torch.export made the batch dimension of {static} static; peftc needs it dynamic")
    return ep


def _auto_dims(v: Any):
    """Dim 0 (the batch; an unbatched (L, E) input's sequence) is dynamic, and dim 1 of integer inputs of rank >= 2
    (token ids, masks: the sequence) and of float inputs of rank >= 3 (a batch-first (N, L, E) input's sequence, a
    sequence-first (L, N, E) one's batch). Dim.AUTO: a dim the model fixes (an image's channels) stays static."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    dims = {0: Dim.AUTO}
    if v.dim() >= (3 if v.is_floating_point() else 2):
        dims[1] = Dim.AUTO
    return dims
