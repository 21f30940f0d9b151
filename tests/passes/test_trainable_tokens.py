"""trainable tokens pass: reads of an embedding matrix see W.index_copy(0, rows, delta) from the call's route, per
reader; resolving a spec (PEFT's tying rule), folding into a constant, and the weights a merged export writes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftc.errors import SpecError
from peftc.passes.match import find_sites
from peftc.passes.match import set_tensor
from peftc.passes.route import plain_route, route_keys
from peftc.passes.trainable_tokens import (TAG, fold_token_rows, insert_token_rows, resolve_token_rows, rows_for,
                                           token_state)
from peftc.spec import LoRA
from peftc.store import STORE, Adapter, AdapterStore, site_key
from peftc.trace import trace

V, D = 10, 4
IDS = torch.tensor([[1, 2, 3], [4, 5, 1]])


class Tables(nn.Module):
    """Two embeddings and an output head tied to the first; `tied` gives it a config saying so (as HF models
    have), which is what makes PEFT tie the head to the embedding's rows."""

    def __init__(self, tied: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Embedding(V, D)
        self.b = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.a.weight
        if tied:
            self.config = SimpleNamespace(tie_word_embeddings=True)

    def get_input_embeddings(self):
        return self.a

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):                                             # (B, T) -> (B, T, V)
        return self.head(self.a(ids) + self.b(ids))


def graph(model, adapters: dict):
    """The traced model with adapters {name: trainable_token_indices} in a store, and the pass run."""
    gm = trace(model, (IDS,)).gm
    sites = find_sites(gm)
    store = AdapterStore()
    gm.add_submodule(STORE, store)
    for name, tti in adapters.items():
        ad = Adapter(LoRA(r=1), [], [])
        for t in resolve_token_rows(gm, sites, model, LoRA(trainable_token_indices=tti).trainable_token_indices):
            ad.tokens[site_key(t.path)] = t
        store.add(name, ad)
    n = insert_token_rows(gm, store)
    gm.graph.lint()
    gm.recompile()
    return gm, store, n


def run(gm, name="default"):
    return gm(IDS, peftc_route=plain_route(gm, gm.get_submodule(STORE), name))


def expected(model, ad: Adapter):
    """The model computed by hand: each reader's matrix with its rows in place."""
    w = {p: getattr(model, p).weight.detach() for p in ("a", "b", "head")}
    for t in ad.tokens.values():
        for r in t.readers:
            w[r] = w[r].index_copy(0, t.index, t.delta.detach())
    h = nn.functional.embedding(IDS, w["a"]) + nn.functional.embedding(IDS, w["b"])
    return h @ w["head"].T


def randomize(store):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in store.names():
            for t in store[a].tokens.values():
                t.delta.add_(torch.randn(t.delta.shape, generator=g))


def test_resolve_follows_peft_tying():
    model, tied = Tables(), Tables(tied=True)
    gm, sites = trace(model, (IDS,)).gm, None
    sites = find_sites(gm)
    (t,) = resolve_token_rows(gm, sites, model, (1, 2))                 # a list: the input embedding
    assert (t.path, t.target, t.index.tolist(), t.tied) == ("a", sites["a"].weight, [1, 2], ())   # no config: untied
    assert torch.equal(t.delta, model.a.weight[[1, 2]])                 # starts as the rows themselves
    gm = trace(tied, (IDS,)).gm
    (t,) = resolve_token_rows(gm, sites, tied, (1, 2))
    assert t.tied == ("head",)                                          # config.tie_word_embeddings: head follows
    (t,) = resolve_token_rows(gm, sites, tied, (("a", (1, 2)), ("head", (1, 2))))
    assert t.readers == ("a", "head")                                   # the same rows listed twice: still tied
    ts = resolve_token_rows(gm, sites, tied, (("a", (1, 2)), ("head", (3,))))
    assert [(t.path, t.tied) for t in ts] == [("a", ()), ("head", ())]   # other rows: each its own
    (t,) = resolve_token_rows(gm, sites, tied, (("b", (0, 9)),))
    assert (t.path, t.tied) == ("b", ())


def test_resolve_refuses_with_the_culprit():
    model = Tables()
    gm = trace(model, (IDS,)).gm
    sites = find_sites(gm)
    with pytest.raises(SpecError, match=r"index 10 is outside the vocabulary of b \(10 rows, indices 0..9\)"):
        resolve_token_rows(gm, sites, model, (("b", (2, 10)),))
    with pytest.raises(SpecError, match="'c' matches no module"):
        resolve_token_rows(gm, sites, model, (("c", (1,)),))
    with pytest.raises(SpecError, match="a would be both a LoRA target"):
        resolve_token_rows(gm, sites, model, (1,), chosen=["a"])


def test_insert_structure_and_values():
    model = Tables(tied=True).eval()
    gm, store, n = graph(model, {"default": [1, 2], "other": {"b": [3], "head": [4, 5]}, "none": {"b": [7]}})
    assert n == 3                                   # a's, b's and head's reads
    copies = [x for x in gm.graph.nodes if x.op == "call_function" and x.target == torch.ops.aten.index_copy.default]
    assert sorted(x.meta["peftc"]["reader"] for x in copies) == ["a", "b", "head"]
    assert all(x.meta["peftc"]["method"] == TAG for x in copies)
    assert len(route_keys(gm)) == 6                 # index and delta per reader
    with torch.no_grad():
        assert torch.equal(run(gm), model(IDS))     # fresh rows change nothing
    randomize(store)
    with torch.no_grad():
        for name in ("default", "other", "none"):
            assert (run(gm, name) - expected(model, store[name])).abs().max() <= 1e-6, name
    assert rows_for(store["default"], store["default"].tokens["a"].target, "head") is store["default"].tokens["a"]
    assert rows_for(store["none"], store["none"].tokens["b"].target, "a") is None   # reads W: an empty index
    route = dict(zip(route_keys(gm), plain_route(gm, store, "none")))
    a = store["default"].tokens["a"].target
    assert route[("tokens", a, "a", "index")].shape == (0,)           # "none" has rows of b only: a reads W
    assert route[("tokens", a, "a", "delta")].shape == (0, D)
    assert route[("tokens", "b.weight", "b", "index")].tolist() == [7]


def test_gradients_reach_only_the_delta():
    model = Tables(tied=True).eval()
    gm, store, _ = graph(model, {"default": [1, 2]})
    run(gm).sum().backward()
    t = store["default"].tokens["a"]
    assert t.delta.grad is not None and t.delta.grad.abs().sum() > 0
    w = gm.get_parameter(t.target)                  # the traced matrix: frozen, shares the model's data
    assert not w.requires_grad and w.grad is None


@pytest.mark.parametrize("tti,tied_weights", [([1, 2], True), ({"a": [1, 2], "head": [6]}, False)])
def test_fold_writes_the_rows_into_a_constant_of_the_base_graph(tti, tied_weights):
    """merge() folds into a copy of the base graph: each reader's read becomes its weight with the rows in place."""
    model = Tables(tied=True).eval()
    gm, store, _ = graph(model, {"default": tti})
    randomize(store)
    with torch.no_grad():
        want = run(gm)
    base = trace(model, (IDS,)).gm
    assert fold_token_rows(base, store["default"], "default", set_tensor) == 2        # a's read and head's
    for x in reversed(list(base.graph.nodes)):
        if x.op == "get_attr" and not x.users:
            base.graph.erase_node(x)
    base.graph.lint()
    base.recompile()
    with torch.no_grad():
        assert (base(IDS) - want).abs().max() <= 1e-6
    names = {x.target for x in base.graph.nodes if x.op == "get_attr" and "tokens" in x.target}
    assert (not names) == tied_weights              # one tied matrix, or one constant per reader's rows
    state = token_state(store["default"], model.state_dict())
    assert sorted(state) == ["a.weight", "head.weight"]
    assert (state["a.weight"] is state["head.weight"]) == tied_weights
