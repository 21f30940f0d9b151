"""trace / compile and the user's model: shared frozen weights, untouched model, clear errors, dynamic shapes."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import peftc
from peftc.trace import trace
from tests.models import inputs, main_output, make


# --- the user's model is left alone --------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> dict:
    """Everything compile could disturb: tensors (bitwise), flags, modes, hooks, attributes, config."""
    return {
        "state": {k: (v.dtype, v.detach().clone()) for k, v in model.state_dict().items()},
        "params": [(n, id(p), p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()],
        "modules": [(n, type(m), m.training, sorted(vars(m)), sorted(m._parameters), sorted(m._buffers),
                     sorted(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for n, m in model.named_modules()],
        "config": model.config.to_dict() if hasattr(model, "config") else None,
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, (dtype, v) in before["state"].items():
        assert after["state"][k][0] == dtype and torch.equal(after["state"][k][1], v), k
    assert before["params"] == after["params"]
    assert before["modules"] == after["modules"]
    assert before["config"] == after["config"]


def unusual_state_(model: nn.Module) -> nn.Module:
    """Train mode, with one frozen parameter and one submodule in eval: flags compile must not reset."""
    model.train()
    next(model.parameters()).requires_grad_(False)
    list(model.children())[-1].eval()
    return model


def test_weights_are_shared_frozen_and_tied_in_the_graph():
    model = unusual_state_(make("gpt2"))                       # gpt2 ties lm_head to wte
    before = snapshot(model)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets="all-linear"))
    assert_same(before, snapshot(model))
    gm = pm.graph_module
    graph_params = dict(gm.named_parameters(remove_duplicate=False))
    for name, p in model.named_parameters(remove_duplicate=False):
        q = graph_params[name]
        assert q.data_ptr() == p.data_ptr(), name              # shared, not copied
        assert q is not p and not q.requires_grad, name        # frozen there, the user's flag untouched
    for name, b in model.named_buffers():
        if name in dict(gm.named_buffers()):
            assert dict(gm.named_buffers())[name].data_ptr() == b.data_ptr()
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("transformer.wte.weight")
    assert pm.training                                          # follows the model's mode
    trainable = {n for n, _ in pm.named_trainable_parameters()}
    assert trainable and all(".peftc_store.adapters.default.sites." in n for n in trainable)


def test_training_the_peft_module_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    before = snapshot(model)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["0", "2"], init=False), example_inputs=(torch.randn(2, 4),))
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        pm(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    assert_same(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters())


# --- untraceable models ----------------------------------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:                                         # data-dependent branch
            return self.lin(x)
        return -self.lin(x)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.pre(x)))


class ItemShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        n = int(x[0, 0].abs().item()) + 1                       # .item() used as a shape
        return self.lin(x).new_zeros(n)


class ItemModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = ItemShape()

    def forward(self, x):
        return self.blk(x)


X4 = torch.randn(2, 4)


@pytest.mark.parametrize("model, culprit, code", [
    (Gated, r"module 'body\.1' \(Gate\)", r"if x\.sum\(\) > 0"),
    (ItemModel, r"module 'blk' \(ItemShape\)", r"\.item\(\)"),
])
def test_untraceable_model_names_the_culprit_and_what_to_try(model, culprit, code):
    m = model()
    before = snapshot(m)
    with pytest.raises(peftc.TraceError) as e:
        peftc.compile(m, peftc.LoRA(r=1, targets="all-linear"), example_inputs=(X4,))
    msg = str(e.value)
    assert re.search(f"tracing stopped in {culprit} at .*test_trace.py:\\d+ \\(.*{code}", msg), msg
    assert "What to try" in msg and "torch.cond" in msg and "PEFTC_LOG=debug" in msg
    assert e.value.__cause__ is not None                        # the full torch.export error is chained
    assert_same(before, snapshot(m))


def test_non_hf_model_needs_example_inputs():
    m = nn.Linear(4, 4)
    with pytest.raises(peftc.TraceError, match=r"Linear is not a Hugging Face model.*pass example_inputs="):
        peftc.compile(m, peftc.LoRA(r=1, targets="all-linear"))
    with pytest.raises(peftc.TraceError, match=r"example_inputs must be a tuple of args or a dict of kwargs, got int"):
        trace(m, 3)


def test_example_inputs_forms():
    m = nn.Linear(4, 3).eval()
    x = torch.randn(5, 4)
    for ex in (X4, (X4,), [X4]):
        t = trace(m, ex)
        assert t.positional and t.input_names == ()
        assert torch.equal(t.gm(x), m(x))
    t = trace(m, {"input": X4})
    assert not t.positional and t.input_names == ("input",)
    assert torch.equal(t.gm(input=x), m(x))


# --- a failing compile leaves nothing behind -------------------------------------------------------------------------
@pytest.mark.parametrize("arch, spec, error", [
    ("llama", peftc.LoRA(r=2, targets=["q_proj", "v_prj"]), peftc.TargetNotFound),
    ("bert", peftc.LoRA(r=65, targets=["query"]), peftc.SpecError),
    ("gated", peftc.LoRA(r=1, targets="all-linear"), peftc.TraceError),
    ("mlp", peftc.LoRA(r=1, targets=["0"], modules_to_save=["classifier"]), peftc.SpecError),
])
def test_failed_compile_leaves_the_model_as_it_was(arch, spec, error):
    if arch == "gated":
        model, ex = Gated(), (X4,)
    elif arch == "mlp":
        model, ex = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2)), (X4,)
    else:
        model, ex = make(arch), None
    unusual_state_(model)
    before = snapshot(model)
    with pytest.raises(error):
        peftc.compile(model, spec, example_inputs=ex)
    assert_same(before, snapshot(model))


# --- the traced graph is the model at other shapes -------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def compiled(arch: str):
    model = make(arch)
    return model, peftc.compile(model, peftc.LoRA(r=2, targets="all-linear"))   # zero-init B: the base model


SHAPES = [(1, 1), (1, 6), (3, 11)]                              # (batch, seq); batch 3 has a left-padded row


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("batch, seq", SHAPES)
def test_text_models_at_other_shapes(arch, batch, seq):
    model, pm = compiled(arch)
    kw = inputs(arch, batch=batch, seq=seq)
    with torch.no_grad():
        want = main_output(model(**kw))
        got = main_output(pm(**kw))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("batch", [1, 3])
def test_vit_at_other_batch_sizes(batch):
    model, pm = compiled("vit")
    kw = inputs("vit", batch=batch)
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, model(**kw).logits)


def test_plain_module_batch_is_dynamic():
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    gm = trace(m, (X4,)).gm
    for b in (1, 2, 7):
        x = torch.randn(b, 4)
        assert torch.equal(gm(x), m(x))


class BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


@functools.lru_cache(maxsize=1)
def compiled_bn():
    torch.manual_seed(0)
    model = BN()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.5)
        model.bn.running_var.fill_(2.0)
    model.eval()
    return model, peftc.compile(model, peftc.LoRA(r=2, targets=["a"]), example_inputs=(torch.randn(4, 8),))


def test_batchnorm_model_in_eval_mode_uses_running_statistics():
    """Train and eval differ beyond dropout here: in eval the PeftModule must normalise with the running stats."""
    model, pm = compiled_bn()
    assert not pm.training
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = model(x)
        got = pm(x)
    torch.testing.assert_close(got, want)


def test_calling_the_peft_module_does_not_update_the_models_buffers():
    model, pm = compiled_bn()
    before = snapshot(model)
    with torch.no_grad():
        pm(torch.randn(5, 8))
    assert_same(before, snapshot(model))
