"""LoRA on nn.MultiheadAttention, as PEFT adapts it: targeting the attention module adapts its packed in_proj
(W_in [3E, E], B [3E, r]) and its out_proj; checkpoints in PEFT's layout (<m>.lora_A, <m>.base_layer.out_proj.lora_A).
Every layout PEFT serves is a site: batch_first True or False, batched (N, L, E) / (L, N, E) or unbatched (L, E) (PEFT's
own test model: batch_first=False, unbatched). Unbatched, and with different query / key / value tensors, the module
projects with row blocks of W_in (chunk / split), each a call of the one site reading its rows of B.

PEFT 0.21.2 applies out_proj's delta twice in its forward and merge (peft PR #3774, open); peftc applies it once, as
that fix does. So parity with PEFT is checked with out_proj's B at zero, and the full adapter against the reference
formula: the plain module with W_in + s B A and W_out + s B A."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

import peftc
from peftc.errors import SpecError

TOL = 1e-5
PEFT_KEYS = {"base_model.model.attn.lora_A.weight", "base_model.model.attn.lora_B.weight",
             "base_model.model.attn.base_layer.out_proj.lora_A.weight",
             "base_model.model.attn.base_layer.out_proj.lora_B.weight"}
# layout -> (batch_first, the input's leading dims from (batch, seq))
LAYOUTS = {"batch_first": (True, lambda n, l: (n, l)), "seq_first": (False, lambda n, l: (l, n)),
           "unbatched": (False, lambda n, l: (l,)), "unbatched_batch_first": (True, lambda n, l: (l,))}


class Net(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.need_weights = need_weights

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        return self.head(a)


def net(seed: int = 0, layout: str = "batch_first", **kw) -> Net:
    torch.manual_seed(seed)
    return Net(batch_first=LAYOUTS[layout][0], **kw).eval()


def x_of(batch: int = 2, seq: int = 5, seed: int = 1, layout: str = "batch_first") -> torch.Tensor:
    return torch.randn(*LAYOUTS[layout][1](batch, seq), 6, generator=torch.Generator().manual_seed(seed))


def reference(model: Net, w_in, w_out) -> Net:
    """The model with the deltas added to its weights (LoRA's formula, each delta once)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.in_proj_weight += w_in
        ref.attn.out_proj.weight += w_out
    return ref


def deltas(pm, name="default"):
    ad = pm.store[name]
    s = ad.spec.alpha / ad.spec.r
    return tuple(s * ad.sites[k].B @ ad.sites[k].A for k in ("attn", "attn-out_proj"))


@pytest.mark.parametrize("layout,need_weights", [("batch_first", False), ("batch_first", True), ("seq_first", False),
                                                 ("seq_first", True), ("unbatched", False), ("unbatched", True),
                                                 ("unbatched_batch_first", False)])
def test_adapts_in_proj_and_out_proj_once(layout, need_weights):
    """Traced at one shape, called at another (the batch and sequence dims stay dynamic in every layout)."""
    model = net(layout=layout, need_weights=need_weights)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["attn"], init=False), example_inputs=(x_of(layout=layout),))
    assert pm.store["default"].targets == ["attn", "attn.out_proj"]
    ref = reference(model, *deltas(pm))
    with torch.no_grad():
        for x in (x_of(layout=layout), x_of(3, 4, 2, layout)):
            assert (pm(x) - model(x)).abs().max() > 1e-3
            torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=TOL)
            torch.testing.assert_close(pm.merge()(x), ref(x), rtol=0, atol=TOL)


def zero_peft_out_proj_B_(theirs) -> None:
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()                                       # PEFT doubles out_proj's delta (see above)


def assert_equals_peft_merged_too(pm, theirs, x) -> None:
    """pm == theirs unmerged, and pm.merge() == theirs with its adapter merged in."""
    with torch.no_grad():
        assert (pm(x) - pm.base_model(x)).abs().max() > 1e-3
        torch.testing.assert_close(pm(x), theirs(x), rtol=0, atol=TOL)
        theirs.merge_adapter()
        try:
            torch.testing.assert_close(pm.merge()(x), theirs(x), rtol=0, atol=TOL)
        finally:
            theirs.unmerge_adapter()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peftc_saved_loads_in_peft(layout, tmp_path):
    model = net(layout=layout)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["attn"], init=False), example_inputs=(x_of(layout=layout),))
    with torch.no_grad():
        pm.store["default"].sites["attn-out_proj"].B.zero_()     # PEFT doubles out_proj's delta (see above)
    pm.save_adapter(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == PEFT_KEYS
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert_equals_peft_merged_too(pm, theirs, x_of(3, 4, 2, layout))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_peft_saved_loads_in_peftc(layout, tmp_path):
    model = net(layout=layout)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["attn"],
                                                             init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    pm = peftc.load_adapter(model, tmp_path, example_inputs=(x_of(layout=layout),))
    sd = theirs.state_dict()
    s = 4 / 2
    w_in = s * sd["base_model.model.attn.lora_B.default.weight"] @ sd["base_model.model.attn.lora_A.default.weight"]
    w_out = s * sd["base_model.model.attn.base_layer.out_proj.lora_B.default.weight"] \
        @ sd["base_model.model.attn.base_layer.out_proj.lora_A.default.weight"]
    x = x_of(3, 4, 2, layout)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), reference(model, w_in, w_out)(x), rtol=0, atol=TOL)
        zero_peft_out_proj_B_(theirs)                              # where PEFT is right
        pm.store["default"].sites["attn-out_proj"].B.zero_()
    assert_equals_peft_merged_too(pm, theirs, x)


@pytest.mark.parametrize("layout", ["seq_first", "unbatched"])
def test_in_proj_gradients_equal_peft(layout, tmp_path):
    """Training through the row blocks (unbatched) and the packed call (seq-first): A and B of the in_proj get PEFT's
    gradients (out_proj's B at zero, where PEFT is right; its A then gets none on either side). PEFT runs the module
    on merged weights, so its lora_dropout never applies there: nor in peftc."""
    model = net(layout=layout)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["attn"],
                                                             lora_dropout=0.5, init_lora_weights=False)).train()
    zero_peft_out_proj_B_(theirs)
    theirs.save_pretrained(tmp_path)
    pm = peftc.load_adapter(model, tmp_path, is_trainable=True, example_inputs=(x_of(layout=layout),)).train()
    assert pm.store["default"].spec.dropout == 0.5
    x = x_of(3, 4, 2, layout)
    a, b = pm(x), theirs(x)
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    a.square().sum().backward()
    b.square().sum().backward()
    ours = pm.store["default"].sites
    peft = theirs.base_model.model.attn
    torch.testing.assert_close(ours["attn"].A.grad, peft.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["attn"].B.grad, peft.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    assert ours["attn"].B.grad.abs().max() > 1e-3
    assert ours["attn-out_proj"].A.grad.abs().max() == 0


class Cross(nn.Module):
    """Attention whose key and value differ from its query: `key is value` (split(W_in, [E, 2E]) when batched) or
    all three different (chunk(W_in, 3))."""

    def __init__(self, same_kv: bool):
        super().__init__()
        self.emb, self.mem = nn.Linear(6, 16), nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.same_kv = same_kv

    def forward(self, x):
        q, kv = self.emb(x), self.mem(x.flip(-2))
        return self.attn(q, kv, kv if self.same_kv else torch.tanh(kv), need_weights=False)[0]


@pytest.mark.parametrize("same_kv,unbatched", [(True, False), (False, False), (True, True)])
def test_cross_attention_adapts_each_block_of_in_proj(same_kv, unbatched, tmp_path):
    torch.manual_seed(0)
    model = Cross(same_kv).eval()
    lead = (5,) if unbatched else (2, 5)
    x = torch.randn(*lead, 6, generator=torch.Generator().manual_seed(1))
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["attn"], init=False), example_inputs=(x,))
    assert len(pm.sites["attn"].nodes) == (2 if same_kv and not unbatched else 3) == len(pm.sites["attn"].rows)
    ref = reference(model, *deltas(pm))
    with torch.no_grad():
        assert (pm(x) - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=TOL)
        torch.testing.assert_close(pm.merge()(x), ref(x), rtol=0, atol=TOL)
        pm.store["default"].sites["attn-out_proj"].B.zero_()     # PEFT doubles out_proj's delta (see above)
    pm.save_adapter(tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert_equals_peft_merged_too(pm, theirs, x)


class SeqFirst(nn.Module):
    """A linear layer on a sequence-first (L, N, E) activation: the batch is dim 1 of its input."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x).transpose(0, 1)          # (L, N, E)
        return self.head(torch.relu(self.mid(h)).transpose(0, 1))


def test_mixed_batch_on_a_sequence_first_layer_routes_each_row():
    torch.manual_seed(0)
    model = SeqFirst().eval()
    x = x_of(batch=3)
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["mid"], init=False), example_inputs=(x_of(),))
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["mid"], init=False))
    rows = ["default", "b", "__base__"]
    with torch.no_grad():
        mixed = pm(x, adapter_names=rows)
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i:i + 1], pm(x[i:i + 1], adapter_names=[name]), rtol=0, atol=TOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_batch_through_attention_is_refused_clearly(layout):
    """PEFT refuses adapter_names on nn.MultiheadAttention; a row (dim 0) of an unbatched or sequence-first input is
    a position, which attention mixes: refused in every layout, never routed wrong. Other layers of the same model
    route dim 0 as PEFT does (there, unbatched, a row is a position)."""
    pm = peftc.compile(net(layout=layout), peftc.LoRA(r=2, targets=["attn"], init=False),
                       example_inputs=(x_of(layout=layout),))
    pm.add_adapter("b", peftc.LoRA(r=4, targets=["attn"], init=False))
    x = x_of(3, 3, layout=layout)
    with torch.no_grad():
        single = pm(x)
        with pytest.raises(peftc.InputError, match=r"attn \(nn.MultiheadAttention\) has no per-row form, as in PEFT"):
            pm(x, adapter_names=["default", "b", "__base__"])
        torch.testing.assert_close(pm(x), single, rtol=0, atol=0)      # nothing of the failed call is left
        torch.testing.assert_close(pm(x, adapter_names=["default"] * 3), single, rtol=0, atol=0)   # one adapter: fine


def test_mixed_rows_of_an_unbatched_input_route_positions_elsewhere_as_peft_does(tmp_path):
    """Unbatched, the layers around the attention module take one adapter per row (a position), as PEFT's
    adapter_names splits dim 0 there too."""
    model = net(layout="unbatched")
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["emb", "head"], init=False),
                       example_inputs=(x_of(layout="unbatched"),))
    pm.add_adapter("b", peftc.LoRA(r=3, targets=["head"], init=False))
    pm.save_adapter(tmp_path)                                   # "default" there, "b" in tmp_path / "b"
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    x = x_of(seq=3, layout="unbatched")
    rows = ["default", "b", "__base__"]
    with torch.no_grad():
        mixed = pm(x, adapter_names=rows)
        assert (mixed - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(mixed, theirs(x, adapter_names=rows), rtol=0, atol=TOL)


def test_all_linear_leaves_attention_modules_out_as_peft_does(tmp_path):
    """PEFT's all-linear wraps emb, head and attn.out_proj, but out_proj's LoRA never runs (the attention's forward
    reads its weight itself): peftc adapts emb and head, with the same outputs."""
    model = net()
    x = x_of()
    pm = peftc.compile(model, peftc.LoRA(r=2, targets="all-linear", init=False), example_inputs=(x,))
    assert pm.store["default"].targets == ["emb", "head"]
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False)).eval()
    with torch.no_grad():       # its saved config names "out_proj", which peftc then adapts for real: left at zero
        theirs.base_model.model.attn.out_proj.lora_B.default.weight.zero_()
    assert_loads_both_ways(model, x, pm, theirs, tmp_path)


class Blocks(nn.Module):
    """Two residual self-attention blocks between an input and an output layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4, batch_first=True)})
                                    for _ in range(2))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        for block in self.blocks:
            h = h + block["attn"](h, h, h, need_weights=False)[0]
        return self.head(h)


def blocks(seed: int = 0) -> Blocks:
    torch.manual_seed(seed)
    return Blocks().eval()


def zero_out_proj_B(pm):
    with torch.no_grad():
        for key, w in pm.store["default"].sites.items():
            if key.endswith("out_proj"):
                w.B.zero_()                                     # PEFT doubles out_proj's delta (see above)


def assert_round_trips(model, x, spec: peftc.LoRA, config: LoraConfig, tmp_path):
    """peftc's adapter loads in PEFT and PEFT's in peftc, with the same tensors and outputs (out_proj's B zero)."""
    pm = peftc.compile(model, spec, example_inputs=(x,))
    zero_out_proj_B(pm)
    theirs = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()
    assert_loads_both_ways(model, x, pm, theirs, tmp_path)
    shapes = {k: v.shape for k, v in load_file(tmp_path / "theirs" / "adapter_model.safetensors").items()}
    assert {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()} == shapes
    return pm


def assert_loads_both_ways(model, x, pm, theirs, tmp_path) -> None:
    """pm (peftc) saved and loaded in PEFT equals pm, theirs (PEFT) saved and loaded in peftc equals theirs, and pm
    moves the model's output."""
    pm.save_adapter(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_in_peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    theirs_in_peftc = peftc.load_adapter(model, tmp_path / "theirs", example_inputs=(x,))
    with torch.no_grad():
        assert (pm(x) - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours_in_peft(x), pm(x), rtol=0, atol=TOL)
        torch.testing.assert_close(theirs_in_peftc(x), theirs(x), rtol=0, atol=TOL)


def test_excluding_an_attention_module_leaves_its_out_proj_out_too(tmp_path):
    targets = r"(.*\.)?(head|emb|attn)"
    pm = assert_round_trips(
        blocks(), x_of(), peftc.LoRA(r=2, targets=targets, exclude_modules=("blocks.0.attn",), init=False),
        LoraConfig(r=2, lora_alpha=8, target_modules=targets, exclude_modules=["blocks.0.attn"],
                   init_lora_weights=False), tmp_path)
    assert pm.store["default"].targets == ["emb", "blocks.1.attn", "blocks.1.attn.out_proj", "head"]


def test_layers_to_transform_takes_out_proj_with_its_attention_module():
    pm = peftc.compile(blocks(), peftc.LoRA(r=2, targets=["attn"], layers_to_transform=1, layers_pattern="blocks"),
                       example_inputs=(x_of(),))
    assert pm.store["default"].targets == ["blocks.1.attn", "blocks.1.attn.out_proj"]


def test_rank_and_alpha_patterns_on_an_attention_module_reach_its_out_proj(tmp_path):
    """PEFT builds the out_proj's LoRA inside the attention module's layer, with that module's r and alpha."""
    pattern = {r"blocks\.1\.attn": 3}
    pm = assert_round_trips(
        blocks(), x_of(), peftc.LoRA(r=2, targets=["attn"], rank_pattern=pattern, alpha_pattern={"attn": 6},
                                     init=False),
        LoraConfig(r=2, lora_alpha=8, target_modules=["attn"], rank_pattern=pattern, alpha_pattern={"attn": 6},
                   init_lora_weights=False), tmp_path)
    sites = pm.store["default"].sites
    assert {k: (w.A.shape[0], w.scale) for k, w in sites.items()} == {
        "blocks-0-attn": (2, 3.0), "blocks-0-attn-out_proj": (2, 3.0),
        "blocks-1-attn": (3, 2.0), "blocks-1-attn-out_proj": (3, 2.0)}


def test_a_pattern_key_for_out_proj_alone_is_refused():
    """In PEFT such a key reaches nothing (the out_proj takes its attention module's entry): refused, as any key
    that matches no adapted layer."""
    with pytest.raises(SpecError, match=r"rank_pattern key 'out_proj' matches none .*key the attention module"):
        peftc.compile(net(), peftc.LoRA(r=2, targets=["attn"], rank_pattern={"out_proj": 1}),
                      example_inputs=(x_of(),))


def test_lora_bias_is_refused_naming_the_module():
    """PEFT 0.21.2 keeps a lora_B bias for the packed in_proj but never applies it: an adapter with it cannot mean
    the same in both, so peftc refuses it rather than disagree."""
    with pytest.raises(SpecError, match=r"lora_bias on attn \(nn.MultiheadAttention\) is not supported: PEFT keeps "
                                        r"a bias .* never applies it.*lora_bias=False"):
        peftc.compile(net(), peftc.LoRA(r=2, targets=["attn"], lora_bias=True), example_inputs=(x_of(),))
    pm = peftc.compile(net(), peftc.LoRA(r=2, targets=["emb"], lora_bias=True), example_inputs=(x_of(),))
    assert pm.store["default"].targets == ["emb"]                # other layers keep it


@pytest.mark.parametrize("option", [{"use_dora": True}, {"init": "pissa"}])
def test_unsupported_options_are_refused_naming_the_module(option):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpecError, match=r"attn \(nn.MultiheadAttention\) is not supported"):
        peftc.compile(model, peftc.LoRA(r=2, targets=["attn"], **option), example_inputs=(x_of(),))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_of_an_attention_module_use_peft_keys_both_ways(bias, tmp_path):
    """bias='all'/'lora_only' on a targeted attention module: its out_proj's bias sits where PEFT wraps that layer,
    <m>.base_layer.out_proj.base_layer.bias (and the packed in_proj's at <m>.base_layer.in_proj_bias)."""
    model = net()
    x = x_of()
    pm = peftc.compile(model, peftc.LoRA(r=2, targets=["attn"], bias=bias, init=False), example_inputs=(x,))
    with torch.no_grad():
        pm.store["default"].sites["attn-out_proj"].B.zero_()     # PEFT doubles out_proj's delta (see above)
        for p in pm.store["default"].saved.parameters():
            p.add_(torch.randn_like(p) * 0.5)                   # trained-looking biases
    pm.save_adapter(tmp_path / "ours")
    theirs_cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["attn"], bias=bias, init_lora_weights=False)
    peft_keys = set(get_peft_model_state_dict(get_peft_model(copy.deepcopy(model), theirs_cfg)))
    ours_keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours_keys == peft_keys, (sorted(ours_keys - peft_keys), sorted(peft_keys - ours_keys))
    assert "base_model.model.attn.base_layer.out_proj.base_layer.bias" in ours_keys
    theirs = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (pm(x) - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(theirs(x), pm(x), rtol=0, atol=TOL)
    theirs.save_pretrained(tmp_path / "theirs")
    again = peftc.load_adapter(model, tmp_path / "theirs", example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(again(x), pm(x))
