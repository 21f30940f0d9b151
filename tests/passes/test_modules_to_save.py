"""modules_to_save pass: named modules read trainable copies of their weights from the adapter store."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import SpecError
from peftc.passes.modules_to_save import insert_saved_copies, module_paths, resolve_modules_to_save, saved_copies
from peftc.passes.route import plain_route, route_keys
from peftc.passes.lora import LoRA
from peftc.store import STORE, Adapter, AdapterStore, site_key
from peftc.trace import trace
from tests.models import inputs, make

D = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):                                           # (B, D)
        return self.head(self.norm(self.body(x)))


X = torch.randn(2, D)


def saved_graph(model, names):
    gm = trace(model, (X,)).gm
    paths = resolve_modules_to_save(gm, names)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    adapter = Adapter(LoRA(r=1), [], paths)
    for path in paths:
        adapter.saved[site_key(path)] = saved_copies(gm, path)
    store.add("default", adapter)
    n = insert_saved_copies(gm, store)
    gm.graph.lint()
    gm.recompile()
    return gm, store["default"], n


def run(gm, x):
    """The rewritten graph called as a PeftModule calls it: the adapter's copies (or originals) as its route."""
    return gm(x, peftc_route=plain_route(gm, gm.get_submodule(STORE), "default"))


def test_resolve_names():
    gm = trace(Net(), (X,)).gm
    assert module_paths(gm) >= {"body", "body.0", "body.2", "norm", "head"}
    assert resolve_modules_to_save(gm, ["head"]) == ["head"]
    assert resolve_modules_to_save(gm, ["2"]) == ["body.2"]                 # trailing components, PEFT's rule
    assert resolve_modules_to_save(gm, ["body.0", "norm"]) == ["body.0", "norm"]
    assert resolve_modules_to_save(gm, ["body", "body.2"]) == ["body"]      # a child of a saved module is covered
    assert resolve_modules_to_save(gm, ["head", "classifier"], optional=("classifier",)) == ["head"]


def test_unknown_name_lists_top_level_modules():
    gm = trace(Net(), (X,)).gm
    with pytest.raises(SpecError, match=r"'classifier' matched no module.*\['body', 'head', 'norm'\]"):
        resolve_modules_to_save(gm, ["classifier"])
    with pytest.raises(SpecError, match="'ead'"):
        resolve_modules_to_save(gm, ["ead"])                                # a name, not a suffix of characters


def test_insert_saved_copies_structure():
    model = Net().eval()
    gm, adapter, n = saved_graph(model, ["head", "norm"])
    assert n == 4                                                           # weight + bias of each
    assert route_keys(gm) == [("saved", m, p, f"{m}.{p}") for m in ("norm", "head") for p in ("weight", "bias")]
    for x in gm.graph.nodes:                      # the originals are read no more: the call passes its tensors
        if x.op == "get_attr" and x.target.startswith(("head.", "norm.")):
            assert not x.users
    route = plain_route(gm, gm.get_submodule(STORE), "default")
    assert all(r is adapter.saved[k[1]].get_parameter(k[2]) for r, k in zip(route, route_keys(gm)))
    for m in ("head", "norm"):
        for p in ("weight", "bias"):
            copy = gm.get_parameter(f"{STORE}.adapters.default.saved.{m}.{p}")
            orig = getattr(model.get_submodule(m), p)
            assert copy.requires_grad
            assert torch.equal(copy, orig) and copy.data_ptr() != orig.data_ptr()
    assert not gm.get_parameter("body.0.weight").requires_grad              # the rest stays frozen and shared


def test_copies_train_without_touching_the_model():
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm, adapter, _ = saved_graph(model, ["head"])
    assert torch.equal(run(gm, X), model(X))
    run(gm, X).sum().backward()
    head = adapter.saved["head"]
    assert head.weight.grad is not None and head.bias.grad is not None
    with torch.no_grad():
        head.bias.add_(1.0)
    torch.testing.assert_close(run(gm, X), model(X) + 1.0)                       # y = head'(h) = head(h) + 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_nested_dotted_parameter_names():
    gm, adapter, n = saved_graph(Net().eval(), ["body"])
    assert n == 4
    assert sorted(dict(adapter.saved["body"].named_parameters())) == ["0-bias", "0-weight", "2-bias", "2-weight"]
    store = gm.get_submodule(STORE)
    assert sorted(store.peft_state_dict("default")) == [                   # PEFT's keys put the dots back
        f"base_model.model.body.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]


def test_seq_cls_saves_the_bert_classifier():
    model = make("bert")
    pm = peftc.compile(model, LoRA(r=2, task_type="SEQ_CLS"))
    ad = pm.store["default"]
    assert ad.saved_modules == ["classifier"]                               # "score" is optional and absent
    keys = list(pm.store.peft_state_dict("default"))
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    trainable = {n for n, _ in pm.named_trainable_parameters()}
    assert f"graph_module.{STORE}.adapters.default.saved.classifier.weight" in trainable
    kw = inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(pm(**kw).logits, model(**kw).logits)


def test_target_and_saved_module_overlap_is_an_error():
    with pytest.raises(SpecError, match=r"\['head'\].*both adapter targets and modules_to_save"):
        peftc.compile(Net(), LoRA(r=1, targets=["head"], modules_to_save=["head"]), example_inputs=(X,))
