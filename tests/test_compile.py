"""torch.compile on a PeftModule: one graph, eager's outputs, and routing as data (switching never recompiles).

Most tests use backend="eager" or "aot_eager" (dynamo's tracing and guards, no codegen) to stay fast on CPU; one test
runs inductor. Recompiles are caught twice over: torch._dynamo.config.error_on_recompile raises RecompileError, and
graphs() counts the graphs dynamo made.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import peftc
from peftc.checkpoint import load_weights_
from tests.models import inputs, main_output, make
from tests.recompiles import fresh_dynamo, graphs, no_recompiles  # noqa: F401 (fresh_dynamo: autouse fixture)

TOL = 1e-5          # eager / aot_eager backends run the same kernels as eager mode
TOL_INDUCTOR = 1e-4
X = inputs("llama")  # 3 rows x 11 tokens, row 1 left-padded


def build(backend: str | None = None):
    """(the HF model, the adapted model): adapters "default" (r=4 on q, v) and "b" (r=8, alpha=16 on q, k, o), both
    with random non-zero B so each changes the output; "default" is active."""
    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False), backend=backend).eval()
    pm.add_adapter("b", peftc.LoRA(r=8, alpha=16, targets=["q_proj", "k_proj", "o_proj"], init=False))
    return model, pm


def out(f, **kw) -> torch.Tensor:
    with torch.no_grad():
        return main_output(f(**X, **kw))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a - b).abs().max().item() < tol


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-3


# --- one graph, eager's outputs ---------------------------------------------------------------------------------------
def test_one_graph_no_graph_break():
    _, pm = build()
    for kw in ({}, {"adapter_index": pm.adapter_index(["b", "__base__", "default"])}):
        ex = dynamo.explain(pm)(**X, **kw)
        assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_matches_eager(backend):
    model, pm = build()
    compiled = torch.compile(pm, backend=backend, fullgraph=True)
    assert close(out(compiled), out(pm))
    assert differ(out(compiled), out(model))            # the adapter is applied, not skipped
    idx = pm.adapter_index(["b", "__base__", "default"])
    assert close(out(compiled, adapter_index=idx), out(pm, adapter_index=idx))


def test_fullgraph_training_step_matches_eager():
    """Backward through the compiled graph (aot_eager) gives eager's gradients on the adapter's weights."""
    _, pm = build()
    pm.train()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    grads = []
    for f in (pm, compiled):
        pm.zero_grad()
        main_output(f(**X)).square().mean().backward()
        grads.append([p.grad.clone() for p in pm.trainable_parameters()])
    assert all(g.abs().max() > 0 for g in grads[0])
    assert all(close(a, b) for a, b in zip(*grads))


# --- routing is data: no recompiles ---------------------------------------------------------------------------------
def test_set_adapter_no_recompile():
    _, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    first = out(compiled)
    with no_recompiles():
        pm.set_adapter("b")
        second = out(compiled)
        pm.set_adapter("default")
        again = out(compiled)
    pm.set_adapter("b")
    assert differ(first, second) and close(second, out(pm))
    assert torch.equal(first, again)                    # switching back and forth is the identity
    assert graphs() == 1


def test_disable_adapters_gives_base_no_recompile():
    model, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    adapted = out(compiled)
    with pm.disable_adapters():    # the base form's first compile
        out(compiled)
    with no_recompiles():
        with pm.disable_adapters():
            base = out(compiled)
        after = out(compiled)
    assert close(base, out(model)) and differ(base, adapted)
    assert torch.equal(after, adapted)


def test_loading_weights_into_a_slot_no_recompile():
    _, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    before = out(compiled)
    g = torch.Generator().manual_seed(5)
    with no_recompiles():
        w = pm.store["default"].sites["model-layers-0-self_attn-q_proj"]
        with torch.no_grad():
            w.B.copy_(torch.randn(w.B.shape, generator=g))
        copied, copied_eager = out(compiled), out(pm)
        tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in pm.store.peft_state_dict("default").items()}
        load_weights_(pm.checkpoint_data, "default", tensors, source="test")
        loaded = out(compiled)
    assert differ(copied, before) and close(copied, copied_eager)
    assert differ(loaded, copied) and close(loaded, out(pm))


def test_adapter_index_per_call_no_recompile():
    """A different per-row routing each call, as a tensor: the call's own input of the gathered form's graph, so
    once each form has compiled (plain, gathered, base), no routing recompiles."""
    _, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    out(compiled)
    out(compiled, adapter_index=pm.adapter_index(["default", "__base__", "b"]))
    out(compiled, adapter_index=pm.adapter_index(["__base__"] * 3))
    assert graphs() == 3
    routings = [["b", "__base__", "default"], ["default", "b", "b"], ["__base__", "__base__", "b"], ["b", "b", "b"]]
    with no_recompiles():
        results = [out(compiled, adapter_index=pm.adapter_index(r)) for r in routings]
        out(compiled)
    for r, got in zip(routings, results):
        assert close(got, out(pm, adapter_names=r))
    assert differ(results[0], results[1]) and differ(results[1], results[2])


def test_adapter_names_per_call_plain_torch_compile_no_recompile():
    """Python strings in adapter_names never reach the compiled frame: a new list per call, no recompile."""
    _, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    routings = [["b", "__base__", "default"], ["default", "b", "b"], ["__base__", "__base__", "b"],
                ["b", "b", "b"], ["default", "default", "default"]]
    first = out(compiled, adapter_names=routings[0])
    out(compiled, adapter_names=["b"] * 3)     # the plain form's first compile
    assert graphs() == 2
    with no_recompiles():
        results = [first] + [out(compiled, adapter_names=r) for r in routings[1:]]
        plain = out(compiled)
    for r, got in zip(routings, results):
        assert close(got, out(pm, adapter_names=r))
    assert close(plain, out(pm)) and close(results[-1], plain)
    assert differ(results[0], results[1]) and differ(results[3], results[4])


def test_module_compile_method_routes_without_recompile():
    """pm.compile() (nn.Module's own, as HF Trainer may use) goes through the same eager routing frame."""
    _, pm = build()
    routings = [["b", "__base__", "default"], ["default", "b", "b"]]
    want = [out(pm, adapter_names=r) for r in routings]
    pm.compile(backend="eager", fullgraph=True)
    got = [out(pm, adapter_names=routings[0])]
    with no_recompiles():
        got.append(out(pm, adapter_names=routings[1]))
    assert graphs() == 1 and all(close(g, w) for g, w in zip(got, want))


def test_adapter_names_training_step_plain_torch_compile():
    """Routed rows train under torch.compile: gradients equal eager's, and reach only the adapters in the batch."""
    _, pm = build()
    pm.train()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    names = ["b", "__base__", "b"]
    grads = []
    for f in (pm, compiled):
        pm.zero_grad(set_to_none=True)
        main_output(f(**X, adapter_names=names)).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all((g.abs().sum() > 0) == (".adapters.b." in n) for n, g in grads[0].items())
    assert all(close(grads[0][n], grads[1][n], 1e-4) for n in grads[0])


# --- CompiledPeftModule: adapter names, set_adapter, disable and weights as data --------------------------------
def test_compiled_peft_module_never_recompiles_on_routing():
    model, cpm = build(backend="eager")
    assert isinstance(cpm, peftc.CompiledPeftModule)
    pm = cpm.peft
    first = out(cpm)
    assert close(first, out(pm))
    out(cpm, adapter_names=["default", "b", "__base__"])    # each form's first compile: gathered, base
    with cpm.disable_adapters():
        out(cpm)
    routings = [["b", "__base__", "default"], ["default", "b", "b"], ["__base__", "b", "__base__"]]
    with no_recompiles():
        mixed = [out(cpm, adapter_names=r) for r in routings]
        cpm.set_adapter("b")
        on_b = out(cpm)
        with cpm.disable_adapters():
            base = out(cpm)
        with torch.no_grad():
            w = pm.store["b"].sites["model-layers-1-self_attn-o_proj"]
            w.B.mul_(3.0)
        reloaded = out(cpm)
    assert graphs() == 3
    assert close(reloaded, out(pm)) and differ(reloaded, on_b)
    with torch.no_grad():
        w.B.div_(3.0)
    for r, got in zip(routings, mixed):
        assert close(got, out(pm, adapter_names=r))
    assert differ(mixed[0], mixed[1])
    assert differ(on_b, first) and close(on_b, out(pm))          # pm's active adapter is "b" now
    assert close(base, out(model))


# --- adding and deleting adapters changes the graph: one recompile ---------------------------------------------
def test_add_adapter_recompiles_once():
    _, pm = build()
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    out(compiled)
    pm.add_adapter("c", peftc.LoRA(r=2, targets=["o_proj"], init=False))
    out(compiled)          # the rebuilt graph has a fresh compile cache: compiled once more, not a cache-entry recompile
    assert graphs() == 2
    with no_recompiles():
        pm.set_adapter("c")
        on_c = out(compiled)
    assert close(on_c, out(pm))


def test_compiled_peft_module_add_and_delete_recompile_once_each():
    _, cpm = build(backend="eager")
    out(cpm)
    cpm.add_adapter("c", peftc.LoRA(r=2, targets=["o_proj"], init=False))
    names = ["c", "b", "default"]
    got = out(cpm, adapter_names=names)
    assert graphs() == 2 and close(got, out(cpm.peft, adapter_names=names))
    with no_recompiles():
        out(cpm, adapter_names=["default", "c", "__base__"])
    cpm.delete_adapter("b")
    out(cpm, adapter_names=["c", "c", "default"])
    assert graphs() == 3


@pytest.mark.slow       # long: runs in CI's slow pass
def test_compiled_peft_module_survives_many_adapter_additions():
    """A server that adds adapters one by one: every addition recompiles once, and the graphs of earlier adapter
    sets must not use up dynamo's per-function cache (recompile_limit, 8), which fullgraph=True turns into an error."""
    _, cpm = build(backend="eager")
    out(cpm)
    for i in range(dynamo.config.recompile_limit + 1):
        cpm.add_adapter(f"n{i}", peftc.LoRA(r=2, targets=["o_proj"], init=False))
        names = [f"n{i}", "b", "__base__"]
        assert close(out(cpm, adapter_names=names), out(cpm.peft, adapter_names=names)), i


@pytest.mark.slow       # long: runs in CI's slow pass
def test_many_compiled_peft_modules_in_one_process():
    """Separate PeftModules each get their own compiled graph; the ninth must compile like the first."""
    model = make("llama")
    for i in range(dynamo.config.recompile_limit + 1):
        cpm = peftc.compile(model, peftc.LoRA(r=2, targets=["q_proj"], init=False), backend="eager").eval()
        assert close(out(cpm), out(cpm.peft)), i


# --- shapes ----------------------------------------------------------------------------------------------------------
def test_new_sequence_length_compiles():
    """A new batch size or sequence length may recompile (dynamo then marks the dim dynamic), but it must run and
    match eager."""
    _, cpm = build(backend="eager")
    for batch, seq in ((3, 11), (5, 11), (4, 13), (2, 7)):
        x = inputs("llama", batch=batch, seq=seq)
        with torch.no_grad():
            got = main_output(cpm(**x))
            want = main_output(cpm.peft(**x))
        assert close(got, want), (batch, seq)


# --- inductor --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inductor_matches_eager_and_routing_never_recompiles():
    model, cpm = build(backend="inductor")
    pm = cpm.peft
    assert close(out(cpm), out(pm), TOL_INDUCTOR)
    out(cpm, adapter_names=["default", "b", "__base__"])    # each form's first compile: gathered, base
    with cpm.disable_adapters():
        out(cpm)
    routings = [["b", "__base__", "default"], ["default", "b", "b"]]
    with no_recompiles():
        mixed = [out(cpm, adapter_names=r) for r in routings]
        cpm.set_adapter("b")
        on_b = out(cpm)
        with cpm.disable_adapters():
            base = out(cpm)
    assert graphs() == 3
    for r, got in zip(routings, mixed):
        assert close(got, out(pm, adapter_names=r), TOL_INDUCTOR)
    assert close(on_b, out(pm), TOL_INDUCTOR) and close(base, out(model), TOL_INDUCTOR)
    assert differ(mixed[0], mixed[1]) and differ(on_b, base)
