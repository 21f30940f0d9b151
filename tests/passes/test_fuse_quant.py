"""Fuse pass: quantized base call + LoRA group -> one QuantLoraGroup with its own backward; the same outputs and
gradients as the unfused graph, less saved for backward, and no dequantized weight kept."""
from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.passes.fuse_quant import FUSIONS, Fusion, _table, fuse_quantized
from peftc.passes.lora.fused import QuantLoraGroup
from peftc.passes.lora.ops import LoraGroup
from peftc.quant import OPS_4BIT, OPS_8BIT

D = 64                       # bitsandbytes' CPU 4-bit kernels want out_features a multiple of 64
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


def q4(lin: nn.Linear) -> nn.Module:
    """`lin` as bitsandbytes' Linear4bit: nf4 with double quantization, computing in float32."""
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")      # quantizes


def q8(lin: nn.Linear) -> nn.Module:
    """`lin` as bitsandbytes' Linear8bitLt (int8 inference weights, LLM.int8() threshold 6)."""
    layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


class QBlock(nn.Module):
    """A decoder block on quantized layers: q, k (4-bit; q with a bias) and v (8-bit) share x, o is 8-bit, the
    SwiGLU MLP 4-bit (down reads silu(gate) * up, which the gated pass recomputes)."""

    def __init__(self, plain_k: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.q = q4(nn.Linear(D, D))
        self.k = nn.Linear(D, D, bias=False).requires_grad_(False) if plain_k else q4(nn.Linear(D, D, bias=False))
        self.v, self.o = q8(nn.Linear(D, D)), q8(nn.Linear(D, D))
        self.gate, self.up = q4(nn.Linear(D, 2 * D, bias=False)), q4(nn.Linear(D, 2 * D, bias=False))
        self.down = q4(nn.Linear(2 * D, D, bias=False))

    def forward(self, x):                                                      # (B, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, 4, D // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        h = x + self.o(a)
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


X = torch.randn(2, 8, D)     # N = 16 rows: no activation has a weight's shape


def pair(spec: peftc.LoRA, model: nn.Module | None = None):
    """(unfused, fused) PeftModules of one quantized model with the same adapter weights."""
    model = model if model is not None else QBlock()
    unfused = peftc.compile(model, spec, example_inputs=(X,), fuse_quant=False)
    fused = peftc.compile(model, spec, example_inputs=(X,))
    fused.store.load_state_dict(unfused.store.state_dict())
    return unfused, fused


def groups(pm) -> list[nn.Module]:
    return list(pm.graph_module.peftc_single.children())


def quant_calls(pm) -> int:
    return sum(n.op == "call_function" and n.target in (*OPS_4BIT, *OPS_8BIT) for n in pm.graph_module.graph.nodes)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """|a - b| <= tol * max(1, max |a|): fp32 agreement relative to the tensor's scale. Outputs come out equal; a
    gradient may differ in its last bits, since the fused backward sums a site's terms (sum_i g_i W_i and the
    update's) before autograd adds the others, an order of fp32 additions of its own, and the GEMMs' own order
    changes with the thread count (measured: up to 6e-7 relative, from 1 to 4 threads)."""
    return bool((a - b).abs().max() <= tol * max(1.0, a.abs().max().item()))


def step(pm, seed: int = 0):
    """One training forward and backward from `seed`: (output, {name: grad} of x and every adapter tensor)."""
    x = X.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = pm(x)
    params = {k: p for k, p in pm.store.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                [x, *params.values()])
    return out.detach(), {"x": grads[0], **dict(zip(params, grads[1:]))}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_unfused_in_training(dropout):
    """4-bit (nf4, double quantization) and 8-bit sites, one group mixing both: the same output and gradients (x
    and every A and B); with dropout the same seed draws the same masks."""
    unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False, dropout=dropout))
    assert quant_calls(unfused) == 7 and quant_calls(fused) == 0
    assert [type(g) for g in groups(fused)] == [QuantLoraGroup] * 4
    assert [g.paths for g in groups(fused)] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    assert groups(fused)[3].remake is not None         # down's x (silu(gate) * up) is made again, not kept
    (a, ga), (b, gb) = step(unfused.train()), step(fused.train())
    assert close(a, b)
    assert ga.keys() == gb.keys() and all(ga[k] is not None for k in ga) and len(ga) == 1 + 2 * len(TARGETS)
    for k in ga:
        assert close(ga[k], gb[k]), k
    if dropout:                      # the masks are live: another seed gives another output
        assert not torch.allclose(step(fused, seed=1)[0], b)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_fused_equals_unfused_without_autograd(ctx):
    unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False, dropout=0.3))
    for mode in (False, True):         # eval, and training mode without autograd (dropout still drawn)
        unfused.train(mode), fused.train(mode)
        with ctx():
            torch.manual_seed(0)
            a = unfused(X)
            torch.manual_seed(0)
            b = fused(X)
        assert close(a, b) and not b.requires_grad


def test_frozen_adapter_and_trained_bias():
    """Gradients reach only what needs them: the layers' own biases trained by the adapter (bias="lora_only", a
    bias input that requires grad) and x, with A and B frozen."""
    unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False, bias="lora_only"))
    for pm in (unfused, fused):
        for name, p in pm.store.named_parameters():
            p.requires_grad_("bias" in name)
    (a, ga), (b, gb) = step(unfused.train()), step(fused.train())
    assert close(a, b)
    trained = list(ga)
    assert trained[0] == "x" and len(trained) == 4 and all("bias" in k for k in trained[1:])   # q, v, o biases
    assert trained == list(gb)
    for k in trained:
        assert close(ga[k], gb[k]), k


def saved_bytes(pm) -> tuple[int, list[torch.Tensor]]:
    """(bytes of the distinct non-parameter storages one training forward saves for backward, those tensors)."""
    params = {t.untyped_storage().data_ptr() for t in (*pm.parameters(), *pm.buffers())}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    x = X.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pm(x)
    del out
    return sum(t.untyped_storage().nbytes() for t in seen.values()), list(seen.values())


def test_saves_less_and_never_a_dequantized_weight():
    """QLoRA's training step (dropout 0.05): the fused graph saves under 3/4 of what PEFT with bitsandbytes saves
    (and less than the unfused graph), and no saved tensor has a weight's shape."""
    import peft

    spec = peftc.LoRA(r=16, alpha=32, targets=TARGETS, dropout=0.05)
    unfused, fused = (pm.train() for pm in pair(spec))
    (ub, _), (fb, kept) = saved_bytes(unfused), saved_bytes(fused)
    ref = peft.get_peft_model(QBlock(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                        lora_dropout=0.05)).train()
    pb, _ = saved_bytes(ref)
    assert fb < ub and fb <= 0.75 * pb, (fb, ub, pb)
    weights = {(D, D), (2 * D, D), (D, 2 * D)}
    assert not [tuple(t.shape) for t in kept if t.is_floating_point() and tuple(t.shape) in weights]
    assert sum(t.dtype == torch.bool for t in kept) == len(TARGETS)   # one mask per site, as bool


def test_dora_and_lora_bias_stay_unfused(caplog):
    """Variants the fused op has no formula for keep the unfused group (and say so in the log)."""
    for spec, why in ((peftc.LoRA(r=4, targets=TARGETS, use_dora=True), "DoRA"),
                      (peftc.LoRA(r=4, targets=TARGETS, lora_bias=True), "lora_bias")):
        with caplog.at_level(logging.INFO, logger="peftc.passes.fuse_quant"):
            caplog.clear()
            pm = peftc.compile(QBlock(), spec, example_inputs=(X,))
        assert [type(g) for g in groups(pm)] == [LoraGroup] * 4 and quant_calls(pm) == 7
        assert sum(why in r.getMessage() for r in caplog.records) == 4


def test_group_with_a_site_without_a_row_stays_unfused(caplog):
    """q, k, v share x but k is a plain nn.Linear (no row): that group stays a LoraGroup, the others fuse."""
    with caplog.at_level(logging.INFO, logger="peftc.passes.fuse_quant"):
        unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False), QBlock(plain_k=True))
    assert [type(g) for g in groups(fused)] == [LoraGroup, QuantLoraGroup, QuantLoraGroup, QuantLoraGroup]
    assert quant_calls(fused) == 2                     # q and v, beside k's linear
    assert any("not every site" in r.getMessage() for r in caplog.records)
    (a, ga), (b, gb) = step(unfused.train()), step(fused.train())
    assert close(a, b)
    assert all(close(ga[k], gb[k]) for k in ga)


def test_pass_counts_and_leaves_an_unquantized_graph():
    pm = peftc.compile(QBlock(), peftc.LoRA(r=4, targets=TARGETS), example_inputs=(X,), fuse_quant=False)
    gm = pm._single_gm
    assert fuse_quantized(gm) == len(TARGETS)          # every site call fused
    gm.graph.lint()
    assert fuse_quantized(gm) == 0                     # nothing left to fuse
    plain = peftc.compile(nn.Sequential(nn.Linear(D, D)), peftc.LoRA(r=2, targets=["0"]), example_inputs=(X,))
    assert [type(g) for g in groups(plain)] == [LoraGroup]
    assert fuse_quantized(plain._single_gm) == 0


def test_table_refuses_duplicate_rows():
    with pytest.raises(ValueError, match="both fuse"):
        _table((*FUSIONS, Fusion("linear4bit", LoraGroup, QuantLoraGroup)))
    with pytest.raises(ValueError, match="known"):
        _table((Fusion("linear2bit", LoraGroup, QuantLoraGroup),))


def test_fuse_quant_must_be_a_bool():
    model = QBlock()
    for bad in ("yes", 1, None):
        with pytest.raises(peftc.SpecError, match="fuse_quant must be True or False"):
            peftc.compile(model, peftc.LoRA(r=2, targets=TARGETS), example_inputs=(X,), fuse_quant=bad)


# --- tiny Llama quantized by transformers (nf4 + double quantization, fp4, 8-bit): fused == unfused == PEFT ----------
KINDS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
EMB = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(5))       # (B, T, hidden): x's gradient too
LLAMA_SPEC = dict(r=4, alpha=8, targets="all-linear", dropout=0.1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tests.models import make

    d = tmp_path_factory.mktemp("llama")
    make("llama").save_pretrained(d)
    return d


def load_llama(directory, kind: str):
    """The tiny Llama quantized as `kind`; bitsandbytes' CPU eval path computes in the layer's compute dtype (not its
    AVX512-BF16 repack), as peftc's ops do."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                             device_map="cpu")
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def llamas(llama_dir):
    """kind -> (unfused, fused): two PeftModules of one quantized Llama with the same random (non-zero) adapter."""
    made = {}

    def get(kind: str):
        if kind not in made:
            model = load_llama(llama_dir, kind)
            ex = {"inputs_embeds": EMB, "use_cache": False}
            unfused = peftc.compile(model, peftc.LoRA(**LLAMA_SPEC), example_inputs=ex, fuse_quant=False)
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for _, p in unfused.named_trainable_parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
            fused = peftc.compile(model, peftc.LoRA(**LLAMA_SPEC), example_inputs=ex)
            fused.store.load_state_dict(unfused.store.state_dict())
            made[kind] = unfused, fused
        return made[kind]
    return get


def site_grads(pm, grads_of) -> dict:
    """{path: (dL/dA, dL/dB)} of the active adapter, from `grads_of(list of A and B parameters)`."""
    ad = pm.store[pm.active_adapter]
    ws = list(ad.sites.values())
    gs = grads_of([t for w in ws for t in (w.A, w.B)])
    return {key.replace("-", "."): (gs[2 * i][: w.r], gs[2 * i + 1][:, : w.r]) for i, (key, w) in enumerate(ad.sites.items())}


def llama_step(pm, seed: int = 0):
    """(logits, dL/dx, {path: (dL/dA, dL/dB)}) of one forward and backward from `seed` (x: inputs_embeds)."""
    x = EMB.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = pm(inputs_embeds=x, use_cache=False).logits
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    res = {}

    def grads_of(params):
        g = torch.autograd.grad(loss, [x, *params])
        res["x"] = g[0]
        return g[1:]
    sites = site_grads(pm, grads_of)
    return out.detach(), res["x"], sites


LLAMA_KINDS = ["nf4-dq", pytest.param("fp4", marks=pytest.mark.slow), "int8"]


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_llama_fused_equals_unfused(llamas, kind):
    """Train mode (dropout 0.1, one seed: the same masks), eval mode with autograd (dropout off: the grouped path),
    and without autograd (no_grad, inference_mode; train and eval): outputs, dL/dx and every dL/dA, dL/dB."""
    unfused, fused = llamas(kind)
    assert quant_calls(unfused) == 14 and quant_calls(fused) == 0
    assert {type(g) for g in groups(fused)} == {QuantLoraGroup}
    for mode in (True, False):
        (a, xa, ga), (b, xb, gb) = llama_step(unfused.train(mode)), llama_step(fused.train(mode))
        assert close(a, b) and close(xa, xb), mode
        assert ga.keys() == gb.keys() and len(ga) == 14
        for k in ga:
            assert close(ga[k][0], gb[k][0]) and close(ga[k][1], gb[k][1]), (mode, k)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                torch.manual_seed(0)
                c = unfused(inputs_embeds=EMB, use_cache=False).logits
                torch.manual_seed(0)
                d = fused(inputs_embeds=EMB, use_cache=False).logits
            assert close(c, d) and close(a, d), (mode, ctx)
    fused.train()
    assert not close(llama_step(fused, seed=1)[0], b)            # the masks are live: another seed, another output


@pytest.mark.parametrize("kind", LLAMA_KINDS)
def test_llama_fused_equals_peft(llamas, llama_dir, tmp_path, kind):
    """PEFT (get_peft_model's layers on the same bitsandbytes model, the adapter loaded from our checkpoint): the same
    logits, dL/dx and dL/dA, dL/dB within 1e-5, in train mode (dropout 0.1, one seed) and eval mode."""
    from peft import PeftModel

    _, fused = llamas(kind)
    fused.save_adapter(tmp_path)
    ref = PeftModel.from_pretrained(load_llama(llama_dir, kind), tmp_path, is_trainable=True)
    for mode in (True, False):
        a, xa, ga = llama_step(fused.train(mode))
        x = EMB.clone().requires_grad_(True)
        torch.manual_seed(0)
        out = ref.train(mode)(inputs_embeds=x, use_cache=False).logits
        layers = {p: ref.get_submodule(f"base_model.model.{p}") for p in ga}
        params = [t for m in layers.values() for t in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
        g = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(), [x, *params])
        assert close(out, a, 1e-5) and close(g[0], xa, 1e-5), mode
        for i, p in enumerate(layers):
            assert close(g[1 + 2 * i], ga[p][0], 1e-5) and close(g[2 + 2 * i], ga[p][1], 1e-5), (mode, p)


# --- what stays unfused, and says why ------------------------------------------------------------------------------
def _tap_q(gm) -> int:
    """A form pass for the test: q's base output also feeds an add after its adapter (q' + q / 2), so it has a user
    besides the group."""
    for call in gm.graph.nodes:
        if call.op == "call_module" and isinstance(gm.get_submodule(call.target), LoraGroup) \
                and gm.get_submodule(call.target).paths[0] == "q":
            y = call.args[1][0]
            item = next(u for u in call.users if u.args[1] == 0)
            with gm.graph.inserting_after(item):
                half = gm.graph.call_function(torch.ops.aten.mul.Tensor, (y, 0.5))
            with gm.graph.inserting_after(half):
                both = gm.graph.call_function(torch.ops.aten.add.Tensor, (item, half))
            item.replace_all_uses_with(both, delete_user_cb=lambda n: n is not both)
            return 1
    return 0


def test_site_output_with_another_user_stays_unfused(monkeypatch, caplog):
    """A base output that feeds more than its group keeps the group (q, k, v) unfused, logged; the rest fuse, and
    the outputs and gradients are the unfused graph's."""
    from peftc import pipeline

    tap = ("tap", _tap_q, ("single",), lambda sites: True, "")
    monkeypatch.setattr(pipeline, "FORM_PASSES", (tap, *pipeline.FORM_PASSES))
    with caplog.at_level(logging.INFO, logger="peftc.passes.fuse_quant"):
        unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False))
    assert [type(g) for g in groups(fused)] == [LoraGroup, QuantLoraGroup, QuantLoraGroup, QuantLoraGroup]
    assert any("has other users" in r.getMessage() and "q, k, v" in r.getMessage() for r in caplog.records)
    (a, ga), (b, gb) = step(unfused.train()), step(fused.train())
    assert close(a, b) and all(close(ga[k], gb[k]) for k in ga)


def test_mixed_batches_use_the_unfused_gathered_form(caplog):
    """The gathered form (one adapter per row) keeps its base calls apart (logged); a mixed batch's rows equal the
    fused plain form's calls with each row's adapter."""
    with caplog.at_level(logging.INFO, logger="peftc.pipeline"):
        pm = peftc.compile(QBlock(), peftc.LoRA(r=4, targets=TARGETS, init=False), example_inputs=(X,))
        pm.add_adapter("b", peftc.LoRA(r=4, alpha=12, targets=TARGETS, init=False))
    assert any("fuse_quant: not run on the mixed form" in r.getMessage() for r in caplog.records)
    assert {type(g) for g in groups(pm)} == {QuantLoraGroup}
    assert quant_calls(pm) == 0 and sum(n.op == "call_function" and n.target in (*OPS_4BIT, *OPS_8BIT)
                                        for n in pm.mixed_graph_module.graph.nodes) == 7
    with torch.no_grad():
        mixed = pm(X, adapter_names=["b", "default"])
        single = {}
        for name in ("default", "b"):
            pm.set_adapter(name)
            single[name] = pm(X)
    assert close(mixed[0], single["b"][0]) and close(mixed[1], single["default"][1])
    assert not close(single["b"], single["default"])


@torch.no_grad()
def copy_adapter(src, dst, name: str) -> None:
    """dst's adapter `name` given src's A and B, site for site (dst's may be padded to a declared capacity)."""
    for key, w in src.store[name].sites.items():
        v = dst.store[name].sites[key]
        v.A_r.copy_(w.A_r), v.B_r.copy_(w.B_r)


# --- the adapter life cycle with fusion on ---------------------------------------------------------------------------
def test_add_set_delete_save_load_and_capacity(tmp_path):
    """Adding, switching, deleting (within a declared capacity and beyond it), saving and loading adapters keep the
    quantized sites fused and give the unfused graph's outputs."""
    spec_b = peftc.LoRA(r=8, alpha=4, targets=["q", "v", "down"], init=False)
    unfused, fused = pair(peftc.LoRA(r=4, targets=TARGETS, init=False))
    capped = peftc.compile(QBlock(), peftc.LoRA(r=4, targets=TARGETS, init=False), example_inputs=(X,),
                           capacity=peftc.Capacity(adapters=3, rank=8))
    for pm in (unfused, fused, capped):
        pm.add_adapter("b", spec_b)
    for name in ("default", "b"):
        for pm in (fused, capped):
            copy_adapter(unfused, pm, name)
    outs = {}
    for name in ("b", "default"):
        for pm in (unfused, fused, capped):
            pm.set_adapter(name)
        with torch.no_grad():
            outs[name] = [pm.eval()(X) for pm in (unfused, fused, capped)]
        assert close(outs[name][0], outs[name][1]) and close(outs[name][0], outs[name][2]), name
    assert not close(outs["b"][0], outs["default"][0])
    for pm in (fused, capped):
        assert {type(g) for g in groups(pm)} == {QuantLoraGroup} and quant_calls(pm) == 0
    fused.save_adapter(tmp_path, "b")
    loaded = peftc.load_adapter(QBlock(), tmp_path / "b", example_inputs=(X,))     # PEFT's layout: b/
    assert {type(g) for g in groups(loaded)} == {QuantLoraGroup}
    with torch.no_grad():
        assert close(loaded(X), outs["b"][0])
    for pm in (fused, capped):
        pm.set_adapter("default")
        pm.delete_adapter("b")
        assert pm.adapters == ["default"] and {type(g) for g in groups(pm)} == {QuantLoraGroup}
        with torch.no_grad():
            assert close(pm(X), outs["default"][0])


def test_merge_on_a_fused_4bit_base(llamas):
    """merge() folds the adapter from the unfused contract (the base graph and the store), whatever the fused module
    does: the merged nf4 Llama computes the fused PeftModule's logits."""
    _, fused = llamas("nf4-dq")
    assert {type(g) for g in groups(fused)} == {QuantLoraGroup}
    with torch.no_grad():
        want = fused.eval()(inputs_embeds=EMB, use_cache=False).logits
        merged = fused.merge()
        got = merged(inputs_embeds=EMB, use_cache=False).logits
        with fused.disable_adapters():
            base = fused(inputs_embeds=EMB, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5 and (base - want).abs().max() > 1e-2
    assert not any(isinstance(m, QuantLoraGroup) for m in merged.modules())


# --- torch.compile: one graph, the unfused graph's training step ----------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_step_equals_unfused(backend):
    """torch.compile(fullgraph=True) of the fused and of the unfused PeftModule (dropout 0.3, one seed): one graph
    each, the same outputs and gradients (inductor: about 25 s per graph on this CPU)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    unfused, fused = (pm.train() for pm in pair(peftc.LoRA(r=4, targets=TARGETS, init=False, dropout=0.3)))
    cu, cf = (torch.compile(pm, backend=backend, fullgraph=True) for pm in (unfused, fused))
    for seed in (0, 1):
        (a, ga), (b, gb) = step(cu, seed), step(cf, seed)
        assert close(a, b) and ga.keys() == gb.keys() and all(close(ga[k], gb[k]) for k in ga), seed
    assert not close(step(cf, 0)[0], step(cf, 1)[0])           # masks are drawn in the graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
