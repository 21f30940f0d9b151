"""Per-layer structure (peftc.blocks): every form's code calls the model's repeated blocks as modules at the model's
own paths, so hooks, activation-checkpoint wrappers and fully_shard put on them take effect, and outputs stay equal."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.fx import Graph

import peftc
from peftc.blocks import Block, assign, block_paths
from tests.models import ARCHS, inputs, main_output, make


def layer_paths(model: nn.Module) -> list[str]:
    return [f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.ModuleList) for k in m._modules]


def out(f, **kw) -> torch.Tensor:
    with torch.no_grad():
        return main_output(f(**kw))


# --- unit: assigning and splitting ------------------------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x + torch.relu(self.lin(x)) * self.scale


class Stack(nn.Module):
    def __init__(self, order=(0, 1, 2)):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(Layer(8) for _ in range(3))
        self.head = nn.Linear(8, 2)
        self.order = order

    def forward(self, x):
        h = self.embed(x)
        for i in self.order:
            h = self.layers[i](h)
        return self.head(h)


def test_block_paths_are_module_list_items_with_parameters():
    assert block_paths(Stack()) == {f"layers.{i}": "Layer" for i in range(3)}
    assert list(block_paths(make("llama"))) == ["model.layers.0", "model.layers.1"]


def test_custom_module_calls_its_layers_as_blocks():
    torch.manual_seed(0)
    m = Stack().eval()
    x = torch.randn(3, 4)
    pm = peftc.compile(m, peftc.LoRA(r=2, targets=["lin"], init=False), example_inputs=(x,))
    assert sorted(pm.blocks()) == ["layers.0", "layers.1", "layers.2"]
    top = [n for n in pm.graph_module.graph.nodes]     # the flat graph is still there, for passes and merge
    assert not any(n.op == "call_module" and n.target.startswith("layers.") for n in top)
    seen = []
    for path, b in pm.blocks().items():
        assert pm.graph_module.get_submodule(path) is b and b.kind == "Layer"
        b.register_forward_hook(lambda mod, args, o, p=path: seen.append(p))
    ref = pm(x)
    assert seen == ["layers.0", "layers.1", "layers.2"]
    with pm.disable_adapters():
        torch.testing.assert_close(pm(x), m(x), rtol=0, atol=0)
    assert len(seen) == 6
    assert (ref - m(x)).abs().max() > 1e-4     # the adapters inside the blocks are applied


def test_a_block_called_twice_apart_stays_flat():
    torch.manual_seed(0)
    m = Stack(order=(0, 1, 0)).eval()
    x = torch.randn(3, 4)
    pm = peftc.compile(m, peftc.LoRA(r=2, targets=["lin"], init=False), example_inputs=(x,))
    g: Graph = pm.base_graph_module.graph
    assert set(assign(g, block_paths(m))) == {"layers.1"}
    calls = []
    pm.blocks()["layers.1"].register_forward_pre_hook(lambda mod, args: calls.append(1))
    with pm.disable_adapters():
        torch.testing.assert_close(pm(x), m(x), rtol=0, atol=0)
    assert calls == [1]


# --- real architectures -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_every_form_calls_the_models_layers(arch):
    model = make(arch)
    pm = peftc.compile(model, peftc.LoRA(r=4, init=False))       # the query and value projections
    pm.add_adapter("b", peftc.LoRA(r=2, init=False))
    assert list(pm.blocks()) == layer_paths(model)
    x = inputs(arch)
    calls: list[str] = []
    for path, b in pm.blocks().items():
        b.register_forward_pre_hook(lambda mod, args, p=path: calls.append(p))
    with pm.disable_adapters():
        torch.testing.assert_close(out(pm, **x), out(model, **x), rtol=0, atol=1e-5)
    single = out(pm, **x)
    rows = ["default", "b", "__base__"]
    mixed = out(pm, **x, adapter_names=rows)
    assert calls == layer_paths(model) * 3                   # base, single and mixed forms
    torch.testing.assert_close(mixed[0], single[0], rtol=0, atol=1e-5)


def test_block_output_is_the_layers_output():
    """A forward hook on a block sees what the same hook on the HF decoder layer sees (the hidden states)."""
    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj"]))
    x = inputs("llama")
    got, want = [], []
    pm.blocks()["model.layers.1"].register_forward_hook(lambda m, a, o: got.append(o))
    h = model.model.layers[1].register_forward_hook(lambda m, a, o: want.append(o[0] if isinstance(o, tuple) else o))
    out(pm, **x)
    out(model, **x, use_cache=False)
    h.remove()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)


def test_hooks_survive_adding_and_deleting_adapters():
    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj"]))
    before = pm.blocks()
    calls = []
    before["model.layers.0"].register_forward_pre_hook(lambda m, a: calls.append(1))
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["v_proj", "o_proj"]))
    pm.set_adapter("b")
    pm.delete_adapter("default")
    assert {p: id(b) for p, b in pm.blocks().items()} == {p: id(b) for p, b in before.items()}
    out(pm, **inputs("llama"))
    assert calls == [1]


def test_activation_checkpointing_wraps_blocks():
    """torch's checkpoint wrapper on every Block: same gradients, and the blocks run again in backward."""
    torch.manual_seed(0)
    x = inputs("llama")
    grads, runs = [], []
    for wrap in (False, True):
        pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False)).train()
        n = [0]
        for b in pm.blocks().values():
            b.register_forward_pre_hook(lambda m, a: n.__setitem__(0, n[0] + 1))
        if wrap:
            apply_activation_checkpointing(pm, check_fn=lambda m: isinstance(m, Block))
            assert sum(type(m).__name__ == "CheckpointWrapper" for m in pm.modules()) == 2
        main_output(pm(**x)).square().mean().backward()
        grads.append([p.grad for p in pm.trainable_parameters()])
        runs.append(n[0])
    assert runs == [2, 4]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_merged_module_has_blocks():
    model = make("gpt2")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["c_attn"], init=False))
    merged = pm.merge()
    calls = []
    for b in merged.blocks().values():
        b.register_forward_pre_hook(lambda m, a: calls.append(1))
    x = inputs("gpt2")
    torch.testing.assert_close(out(merged, **x), out(pm, **x), rtol=0, atol=1e-4)
    assert len(calls) == 2


def test_compiled_stays_one_graph_through_blocks():
    import torch._dynamo as dynamo

    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False))
    x = inputs("llama")
    ex = dynamo.explain(pm)(**x)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), ex.break_reasons
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    torch.testing.assert_close(out(compiled, **x), out(pm, **x), rtol=0, atol=1e-5)


def test_fully_shard_blocks_single_process():
    """FSDP2's fully_shard on each Block and on the module: its hooks gather the parameters the block code reads
    (a world of one, gloo on CPU: parameters become DTensors, which only an all-gather turns back into tensors)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        model = make("llama")
        pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False))
        x = inputs("llama")
        want = out(pm, **x)
        mesh = dist.device_mesh.init_device_mesh("cpu", (1,))
        for b in pm.blocks().values():
            fully_shard(b, mesh=mesh)
        fully_shard(pm, mesh=mesh)
        from torch.distributed.tensor import DTensor

        assert isinstance(pm.blocks()["model.layers.0"].self_attn.q_proj.weight, DTensor)
        torch.testing.assert_close(out(pm, **x), want, rtol=0, atol=1e-5)
    finally:
        dist.destroy_process_group()
