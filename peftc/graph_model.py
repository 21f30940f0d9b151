"""GraphModel: a traced graph called like the model it came from (same inputs, same output type, the model's loss)."""
from __future__ import annotations

import copy
import inspect
import threading
import types
from typing import Any, Callable

import torch
from torch import nn

from torch.fx import GraphModule

from .blocks import Block, install_blocks, structure
from .errors import GenerationError, InputError
from .generation import Steps
from .loss import compute_loss
from .trace import Traced


_GENERATE_LOCK = threading.Lock()     # a module's generation graphs are emitted once, by one thread


class GraphModel(nn.Module):
    """A traced model's graph plus the model's config: takes the model's own arguments (plus `labels`) and returns
    the model's own output type. Base of PeftModule (adapted) and MergedModule (adapters folded in)."""

    extra_call_kwargs: tuple[str, ...] = ()   # keyword arguments a subclass's forward adds
    eager_calls: tuple[str, ...] = ()         # methods forward calls that torch.compile must never trace
    forms: tuple[str, ...] = ("graph",)       # the graphs a subclass may call, each compiled on its own

    def __init__(self, traced: Traced, *, config: Any = None, loss_type: str | None = None, model_class: str = "",
                 base_name: str | None = None, generation_config: Any = None):
        super().__init__()
        self.graph_module = traced.gm            # the module tree every form's code runs against
        self._traced = traced
        self._blocks = install_blocks(traced.gm, traced.blocks)
        self._codes: dict[str, Callable] = {}    # form -> its generated top-level code (peftc.blocks)
        self.config = copy.deepcopy(config)      # never the user's object: losses may set config.problem_type
        self.loss_type = loss_type
        self.model_class = model_class
        self.base_name = base_name
        self.main_input_name = (traced.input_names or ("input_ids",))[0]
        self.generation_config = copy.deepcopy(generation_config)   # the model's; generate's defaults
        self._forget_decoder()
        self.forward = types.MethodType(_forward_with_signature(type(self), self.input_names), self)
        self.fresh_compile_cache()
        if "graph" in self.forms:
            self._structure("graph", traced.gm)
        _mark_eager_frames(type(self))

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's add_fused_lm_head assigns a forward that runs `self.base_model` as a transformers backbone; a graph
        # answers its fused calls from its own logits instead (peftc.trl.fused_forward)
        if name == "forward" and type(value).__name__ == "method" and _is_trl_fused(value):
            from .trl import fused_forward
            value = fused_forward(self, value)
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._forget_decoder()      # emitted again over the moved / cast tensors
        return out

    def _structure(self, form: str, flat: GraphModule) -> None:
        """Make `form`'s code from its flat graph: the model's blocks called as modules (peftc.blocks)."""
        self._codes[form] = structure(flat, self.graph_module, self._blocks, form)

    def blocks(self) -> dict[str, Block]:
        """{path: Block}: the model's repeated blocks (e.g. "model.layers.0"), each called as a module by every
        form's code, so hooks, `fully_shard` and activation-checkpoint wrappers put on them take effect. They live in
        this module's tree at `graph_module.<path>`."""
        return dict(self._blocks)

    def fresh_compile_cache(self) -> None:
        """Give each of this module's graph calls (one per form) its own code object: torch.compile caches (at most
        8 graphs) per code object, and every module, every form and every rebuilt graph would otherwise share one
        entry list."""
        self._runs = {f: types.MethodType(_fresh_copy(GraphModel._run_graph), self) for f in self.forms}

    @property
    def input_names(self) -> list[str]:
        """The inputs the graph was traced with (constants such as use_cache=False left out)."""
        return [n for n in self._traced.input_names if n not in self._traced.constants]

    # --- generation ----------------------------------------------------------------------------------------------
    def _emit_decoder(self):
        """The generation graphs of this module (pipeline.DecoderForms), from its compiler; None where it has none."""
        return None

    def _decoder_steps(self, forms, adapter_names, batch: int, wrap: Callable):
        """The prefill and decode calls (generation.Steps) of one generate call, routed for `adapter_names`, each
        graph put through `wrap`."""
        if adapter_names is not None:
            raise InputError(f"{type(self).__name__} holds one adapter folded in: adapter_names does not apply")
        return Steps(Steps.call(wrap(forms.prefill["graph"]), []), Steps.call(wrap(forms.decode["graph"]), []))

    def _forget_decoder(self) -> None:
        """Drop the generation graphs (made again from the compiler on the next generate)."""
        object.__setattr__(self, "_decoder", None)

    def _decoder_forms(self):
        forms = self._decoder
        if forms is None:
            with _GENERATE_LOCK:
                forms = self._decoder
                if forms is None:
                    forms = self._emit_decoder()
                    if forms is None:
                        raise GenerationError(f"cannot generate: {self.model_class or type(self).__name__} was not "
                                              "compiled from a transformers causal LM")
                    object.__setattr__(self, "_decoder", forms)
        return forms

    def can_generate(self) -> bool:
        """Whether generate() can run: the model is a transformers causal LM (transformers' own answer)."""
        from .decoder import causal_lm_refusal
        return causal_lm_refusal(self._source_model()) is None

    def _source_model(self):
        return None

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                 generation_config: Any = None, streamer: Any = None, generator: torch.Generator | None = None,
                 adapter_names: Any = None, **kwargs) -> torch.Tensor:
        """Generate as transformers' `generate` does (greedy or sampled; returns the prompt followed by the new
        tokens, rows that ended padded): `max_new_tokens`, `min_new_tokens`, `max_length`, `min_length`,
        `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `typical_p`, `repetition_penalty`, `eos_token_id` (one
        or several), `pad_token_id`, or a `generation_config` (default: the model's), `generator` (a torch.Generator
        for sampling; default the global RNG, as transformers), `streamer` (transformers' put/end protocol, e.g.
        TextStreamer) and, on a PeftModule, `adapter_names` (one per row, "__base__" for none).

        Runs on the model's prefill and decode graphs over a static KV cache that belongs to this call (peftc.decoder):
        traced on the first call and reused after (any batch, prompt and cache length). Generation runs the model
        in eval mode. Several threads may generate at once, each with its own adapters."""
        return self._generate(input_ids, attention_mask, generation_config=generation_config, streamer=streamer,
                              generator=generator, adapter_names=adapter_names, wrap=None, **kwargs)

    def _generate(self, input_ids, attention_mask, *, generation_config, streamer, generator, adapter_names,
                  wrap: Callable | None, **kwargs) -> torch.Tensor:
        """generate, with each graph call put through `wrap` (CompiledPeftModule: torch.compile) when given."""
        from .generation import check_prompt, decode_loop, resolve_config

        if input_ids is None:
            input_ids = kwargs.pop(self.main_input_name, None)
        gc = resolve_config(self.generation_config, generation_config, kwargs)
        input_ids, attention_mask = check_prompt(input_ids, attention_mask)
        forms = self._decoder_forms()
        # generation has no autograd: routes go in detached (PeftModule._route_of), so every adapter's route has the
        # same tensor types and switching adapters never recompiles a wrapped graph (CompiledPeftModule.generate)
        with torch.no_grad():
            steps = self._decoder_steps(forms, adapter_names, input_ids.shape[0], wrap or (lambda gm: gm))
        return decode_loop(steps, forms.layout, input_ids, attention_mask, gc, streamer=streamer, generator=generator)

    # --- calling -----------------------------------------------------------------------------------------------
    # torch.compile(module) catches the first Python frame below nn.Module.__call__. forward (and a subclass's) is
    # skipped, so that frame is one of _runs: the graph call proper, a function of tensors only. forward stays free
    # to turn Python values (PeftModule's adapter_names) into the call's data before the compiled graph runs.
    def forward(self, *args, **kwargs):
        return self._runs["graph"](self._codes["graph"], None, *args, **kwargs)

    def _run_graph(self, code, route, *args, labels: torch.Tensor | None = None, return_dict: bool | None = None,
                   num_items_in_batch: Any = None, **kwargs):
        """Run a form's `code` (on this module's tree) with the model's inputs and, when given, the call's route
        (passes.route)."""
        t = self._traced
        extra = {"peftc_route": route} if route else {}     # a graph with nothing routed takes no route
        if t.positional:
            if kwargs:
                raise InputError(f"this module was traced with positional inputs; got keyword inputs {sorted(kwargs)}")
            out = code(self.graph_module, *args, **extra)
        else:
            if args:
                if len(args) > len(t.input_names):
                    raise InputError(f"expected at most {len(t.input_names)} positional inputs "
                                     f"({', '.join(t.input_names)}), got {len(args)}")
                kwargs.update(zip(t.input_names, args))
            out = code(self.graph_module, **self._complete(kwargs), **extra)
        if labels is not None:
            loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            out = self._with_loss(out, labels, loss_kwargs)
        if return_dict is False and hasattr(out, "to_tuple"):
            return out.to_tuple()
        return out

    def _complete(self, kwargs: dict) -> dict:
        t = self._traced
        unknown = [k for k in kwargs if k not in t.input_names]
        for k in list(unknown):
            if k in t.constants and kwargs[k] == t.constants[k]:
                unknown.remove(k)
            elif kwargs[k] is None:   # an optional input left at its default
                unknown.remove(k)
                kwargs.pop(k)
        if unknown:
            raise InputError(
                f"unexpected input(s) {unknown}: this module was traced with inputs {self.input_names}. "
                "Pass example_inputs=... to peftc.compile with these inputs included to trace them."
            )
        full = {}
        for name in t.input_names:
            if name in t.constants:
                full[name] = t.constants[name]
            elif kwargs.get(name) is not None:
                full[name] = kwargs[name]
            elif name in t.defaults:
                full[name] = t.defaults[name](kwargs)
            else:
                raise InputError(f"missing input {name!r}; this PeftModule takes {self.input_names}")
        return full

    def _with_loss(self, out, labels: torch.Tensor, loss_kwargs: dict):
        if self.loss_type is None:
            raise InputError(
                f"labels were given, but peftc does not know the loss of {self.model_class or 'this model'}; "
                "call without labels and compute the loss from the outputs"
            )
        logits = out["logits"] if isinstance(out, dict) else out.logits
        loss = compute_loss(self.loss_type, self.config, logits, labels, **loss_kwargs)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})


def _is_trl_fused(value) -> bool:
    from .trl import is_trl_fused_forward      # peftc.trl imports neither trl nor transformers
    return is_trl_fused_forward(value)


def _signature_forward(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def _fresh_copy(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own (torch.compile keys its cache on code objects)."""
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


_marked: set[type] = set()


def _mark_eager_frames(cls: type) -> None:
    """Tell torch.compile where a GraphModel class's eager code ends: the frames of `forward` (every class's in the
    MRO) run eagerly while the frames they call are compiled (torch._dynamo's skip), and `eager_calls` are never
    traced (torch.compiler.disable). Done once per class, on first use: it imports torch._dynamo, which
    `import peftc` alone should not pay for."""
    if cls in _marked:
        return
    from torch._dynamo.decorators import skip

    skip(_signature_forward)
    for c in cls.__mro__:
        if issubclass(c, GraphModel) and c not in _marked:
            if "forward" in vars(c):
                skip(vars(c)["forward"])
            for name in vars(c).get("eager_calls", ()):
                setattr(c, name, torch.compiler.disable(vars(c)[name]))
            _marked.add(c)


def _forward_with_signature(cls: type, input_names: list[str]):
    """The class's forward with the traced inputs spelled out in its signature: HF Trainer (and other tools) read
    the signature to decide which batch columns to keep."""
    f = _signature_forward
    forward = types.FunctionType(f.__code__, f.__globals__, "forward")

    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in input_names]
    params += [P(n, P.KEYWORD_ONLY, default=None)
               for n in ("labels", "return_dict", "num_items_in_batch", *cls.extra_call_kwargs)]
    params.append(P("kwargs", P.VAR_KEYWORD))
    forward.__signature__ = inspect.Signature(params)
    forward.__doc__ = cls.forward.__doc__
    return forward
