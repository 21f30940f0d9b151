"""LoRA's trainable_token_indices (PEFT's): chosen embedding rows trained in full. Parity with PEFT both ways through
checkpoints (list and dict forms; Llama, GPT-2 and a tied Llama), merged and exported, a training step (gradients,
only the chosen rows move), adapter switching, and bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from safetensors.torch import load_file

import peftc
from peftc.errors import InputError, SpecError
from tests.models import _decoder_cfg, inputs, main_output, make
from tests.parity import TOL, assert_parity, assert_same_weights, parity_inputs, randomize_ours_, randomize_peft_

TOL_TT = 1e-5
LORA_KEY = "token_adapter.trainable_tokens_delta"


def build(arch: str):
    """make(arch), plus "tied_llama": the tiny Llama with tie_word_embeddings=True (lm_head reads embed_tokens)."""
    if arch != "tied_llama":
        return make(arch)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(_decoder_cfg(tf.LlamaConfig, tie_word_embeddings=True)).eval()


def family(arch: str) -> str:
    return "llama" if arch == "tied_llama" else arch


# (arch, trainable_token_indices, LoRA targets, PEFT's saved token keys (module paths))
CASES = [
    ("llama", [3, 5, 7], None, ["model.embed_tokens"]),
    ("gpt2", [1, 5, 7], ["c_attn"], ["transformer.wte"]),                         # lm_head tied: same rows
    ("tied_llama", [3, 5, 7], None, ["model.embed_tokens"]),
    ("tied_llama", {"embed_tokens": [2, 9]}, None, ["model.embed_tokens"]),
    ("tied_llama", {"embed_tokens": [2, 9], "lm_head": [2, 9]}, None, ["model.embed_tokens"]),   # tied, one key
    ("tied_llama", {"embed_tokens": [2, 9], "lm_head": [4]}, None, ["lm_head", "model.embed_tokens"]),  # untied
    ("llama", {"embed_tokens": [1, 2], "lm_head": [4, 6]}, None, ["lm_head", "model.embed_tokens"]),
    ("gpt2", {"lm_head": [4]}, ["c_attn"], ["lm_head"]),           # the head alone: the embedding reads W itself
]
IDS = ["llama-list", "gpt2-list", "tied-list", "tied-dict", "tied-dict-same", "tied-dict-other", "llama-dict",
       "gpt2-head"]


def peft_model(arch, tti, targets, seed=0):
    ref = get_peft_model(build(arch), LoraConfig(r=4, target_modules=targets, trainable_token_indices=tti))
    randomize_peft_(ref, seed)
    return ref.eval()


def ours(arch, tti, targets, seed=3):
    pm = peftc.compile(build(arch), peftc.LoRA(r=4, targets=targets, trainable_token_indices=tti))
    randomize_ours_(pm, seed)
    return pm


@pytest.mark.parametrize("arch,tti,targets,keys", CASES, ids=IDS)
def test_both_ways_with_peft(arch, tti, targets, keys, tmp_path):
    """PEFT's adapter loads in peftc (same tensors, same outputs unmerged and merged), and peftc's in PEFT."""
    ref = peft_model(arch, tti, targets)
    ref.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(k for k in saved if "lora" not in k) == [f"base_model.model.{p}.{LORA_KEY}" for p in keys]
    pm = peftc.load_adapter(build(arch), tmp_path / "peft")
    assert_same_weights(pm, ref)
    base, merged = build(arch), pm.merge()
    for x in parity_inputs(family(arch), labels=True):
        assert_parity(pm, ref, x, TOL_TT)
        assert_parity(merged, ref, x, TOL_TT)
        assert (main_output(pm(**x)) - main_output(base(**x))).abs().max() > 10 * TOL_TT

    mine = ours(arch, tti, targets)
    mine.save_adapter(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == json.loads((tmp_path / "peft" / "adapter_config.json").read_text())[
        "trainable_token_indices"] == tti
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(saved)
    back = PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()
    assert_same_weights(mine, back)
    for x in parity_inputs(family(arch)):
        assert_parity(mine, back, x, TOL_TT)
        assert_parity(mine.merge(), back, x, TOL_TT)


# rows of tokens the input holds (and lm_head's row 4, which every logit's gradient reaches)
@pytest.mark.parametrize("arch,tti", [("gpt2", [5, 22, 40]), ("tied_llama", {"embed_tokens": [5, 22], "lm_head": [4]}),
                                      ("llama", [17, 20])])
def test_training_step_moves_only_the_chosen_rows_and_matches_peft(arch, tti, tmp_path):
    """One SGD step: the gradients of the rows are PEFT's (through both reads of a tied matrix), the effective
    embedding changes in the chosen rows only, and the model's own weights never change."""
    targets = ["c_attn"] if arch == "gpt2" else None
    ref = peft_model(arch, tti, targets)
    ref.save_pretrained(tmp_path)
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peftc.load_adapter(model, tmp_path, is_trainable=True)
    x = parity_inputs(family(arch), labels=True)[0]
    pm.eval(), ref.eval()                           # GPT-2's dropout off: both sides compute the same loss
    pm(**x).loss.backward()
    ref(**x).loss.backward()
    theirs = {n.removesuffix(".default"): p.grad for n, p in ref.named_parameters() if "trainable_tokens" in n}
    for k, p in pm.store.peft_parameters("default"):
        if "trainable_tokens" in k:
            assert p.grad is not None and p.grad.abs().sum() > 0
            assert (p.grad - theirs[k]).abs().max() <= TOL_TT, k

    rows = list(pm.store["default"].tokens.values())
    seen = {t.path: t.value(model.get_submodule(t.path).weight).detach().clone() for t in rows}
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=1.0)
    opt.step()
    for t in rows:
        now = t.value(model.get_submodule(t.path).weight).detach()
        moved = (now - seen[t.path]).abs().sum(-1).nonzero().flatten().tolist()
        graded = t.index[t.delta.grad.abs().sum(-1) > 0].tolist()
        assert moved and moved == sorted(graded) and set(moved) <= set(t.index.tolist()), (t.path, moved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the user's model changed"


def test_fresh_rows_change_nothing_and_adapters_switch():
    """A fresh adapter is the identity; two adapters with different rows of one embedding switch back and forth
    exactly; disabled is the base model; a second adapter without rows reads the embedding itself."""
    model = make("gpt2")
    x = inputs("gpt2")
    with torch.no_grad():
        want = model(**x).logits
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["c_attn"], trainable_token_indices=[1, 2, 3]))
    with torch.no_grad():
        assert torch.equal(pm(**x).logits, want)
    randomize_ours_(pm, 1)
    pm.add_adapter("other", peftc.LoRA(r=4, targets=["c_attn"], trainable_token_indices={"wte": [4, 9]}))
    pm.add_adapter("plain", peftc.LoRA(r=4, targets=["c_attn"]))
    randomize_ours_(pm, 2, name="other")
    randomize_ours_(pm, 3, name="plain")
    outs = {}
    with torch.no_grad():
        for name in ("default", "other", "plain", "default", "other"):
            pm.set_adapter(name)
            y = pm(**x).logits
            assert name not in outs or torch.equal(outs[name], y)
            outs[name] = y
        with pm.disable_adapters():
            assert torch.equal(pm(**x).logits, want)
    assert len({id(t) for t in outs.values()}) == 3 and not torch.equal(outs["default"], outs["other"])
    for name in ("other", "plain"):     # the same weights, each alone, give the same outputs
        solo = peftc.compile(make("gpt2"), pm.store[name].spec)
        solo.store["default"].load_state_dict(pm.store[name].state_dict())
        with torch.no_grad():
            assert (solo(**x).logits - outs[name]).abs().max() <= TOL_TT


def test_export_merged_keeps_tied_rows_tied_and_unties_other_rows(tmp_path):
    pm = ours("gpt2", [1, 5], ["c_attn"])
    out = peftc.export_merged(pm, tmp_path / "gpt2", progress=False)
    loaded = tf.GPT2LMHeadModel.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings        # both reads see the same rows: the matrix stays one tensor
    for x in parity_inputs("gpt2"):
        assert_parity(loaded, pm, x, TOL_TT)

    pm = ours("tied_llama", {"embed_tokens": [2, 9], "lm_head": [4]}, None)
    out = peftc.export_merged(pm, tmp_path / "llama", progress=False)
    loaded = tf.LlamaForCausalLM.from_pretrained(out).eval()
    assert not loaded.config.tie_word_embeddings    # the embedding and the head see different rows
    for x in parity_inputs("llama"):
        assert_parity(loaded, pm, x, TOL_TT)


def test_mixed_batch_and_weighted_combination_refuse_token_rows():
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, trainable_token_indices=[1, 2]))
    pm.add_adapter("plain", peftc.LoRA(r=4))
    x = inputs("llama")
    with pytest.raises(InputError, match="trainable_token_indices"):
        pm(**x, adapter_names=["default", "plain", "plain"])
    with pytest.raises(InputError, match="trainable_token_indices"):
        pm(**x, adapter_names=["default", "__base__", "default"])
    with torch.no_grad():                          # one adapter for the whole batch is served
        assert torch.equal(pm(**x, adapter_names=["default"] * 3).logits, pm(**x).logits)
    with pytest.raises(SpecError, match="trainable_token_indices"):
        pm.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "both")
    assert pm.adapters == ["default", "plain"]


def test_trainable_parameter_counts_equal_peft():
    for arch, tti in (("llama", [1, 2, 3]), ("tied_llama", {"embed_tokens": [1], "lm_head": [4, 5]})):
        pm = peftc.compile(build(arch), peftc.LoRA(r=4, trainable_token_indices=tti))
        ref = get_peft_model(build(arch), LoraConfig(r=4, trainable_token_indices=tti))
        assert pm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.fixture(scope="module")
def llama_pm():
    """One compiled tiny Llama (plain LoRA) for the refusals: add_adapter resolves a spec without tracing again."""
    model = make("llama")
    pm = peftc.compile(model, peftc.LoRA(r=2))
    with torch.no_grad():
        want = pm(**inputs("llama")).logits
    return model, pm, want, copy.deepcopy(model.state_dict())


def assert_unchanged(llama_pm):
    model, pm, want, before = llama_pm
    assert pm.adapters == ["default"]
    with torch.no_grad():
        assert torch.equal(pm(**inputs("llama")).logits, want)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tti,error", [
    ([3, 128], r"index 128 is outside the vocabulary of model.embed_tokens \(128 rows"),
    ({"lm_head": [0, 500]}, r"index 500 is outside the vocabulary of lm_head \(128 rows"),
    ({"q_proj": [1]}, r"'q_proj' names model.layers.0.self_attn.q_proj \(Linear\), which is not an embedding"),
    ({"norm": [1]}, r"'norm' names model.norm, which reads no embedding matrix"),
    ({"embed_token": [1]}, "'embed_token' matches no module"),
])
def test_bad_indices_or_modules_are_refused_and_nothing_changes(llama_pm, tti, error):
    with pytest.raises(SpecError, match=error):
        llama_pm[1].add_adapter("bad", peftc.LoRA(r=2, trainable_token_indices=tti))
    assert_unchanged(llama_pm)


def test_compile_refuses_before_anything_is_made(llama_pm):
    with pytest.raises(SpecError, match=r"index 128 is outside the vocabulary of model.embed_tokens \(128 rows"):
        peftc.compile(llama_pm[0], peftc.LoRA(r=2, trainable_token_indices=[3, 128]))
    assert_unchanged(llama_pm)


@pytest.mark.parametrize("tti,error", [
    ([1, 1], "lists token 1 twice"),
    ({"embed_tokens": [-1]}, r"\['embed_tokens'\] must be a non-empty list of token indices \(integers >= 0\)"),
    ([True], "must be a non-empty list of token indices"),
    ({"": [1]}, "keys must be module names"),
])
def test_bad_values_are_refused_by_the_spec(tti, error):
    with pytest.raises(SpecError, match=error):
        peftc.LoRA(trainable_token_indices=tti)


def test_a_lora_target_or_a_saved_module_cannot_also_read_trained_rows(llama_pm):
    pm = llama_pm[1]
    with pytest.raises(SpecError, match="embed_tokens would be both a LoRA target"):
        pm.add_adapter("bad", peftc.LoRA(r=2, targets=["q_proj", "embed_tokens"], trainable_token_indices=[1]))
    with pytest.raises(SpecError, match=r"model.embed_tokens is in modules_to_save \(model.embed_tokens\) too"):
        pm.add_adapter("bad", peftc.LoRA(r=2, modules_to_save=["embed_tokens"], trainable_token_indices=[1]))
    assert_unchanged(llama_pm)
    # an untied head is another matrix: LoRA on it beside the embedding's rows is fine
    pm.add_adapter("head", peftc.LoRA(r=2, targets=["q_proj", "lm_head"], trainable_token_indices=[1]))
    assert pm.store["head"].targets[-1] == "lm_head"
    pm.delete_adapter("head")
    # GPT-2's lm_head reads the tied matrix with the embedding's rows
    with pytest.raises(SpecError, match="lm_head would be both a LoRA target and a reader of trained token rows"):
        peftc.compile(make("gpt2"), peftc.LoRA(r=2, targets=["c_attn", "lm_head"], trainable_token_indices=[1]))


def test_spec_reads_and_writes_both_forms():
    spec = peftc.LoRA(trainable_token_indices={"embed_tokens": [3, 1]})
    assert spec.trainable_token_indices == (("embed_tokens", (3, 1)),)
    assert peftc.LoRA(trainable_token_indices=[]).trainable_token_indices is None
    assert peftc.LoRA(trainable_token_indices=spec.trainable_token_indices) == spec   # pairs are accepted back
    assert hash(spec) == hash(peftc.LoRA(trainable_token_indices={"embed_tokens": (3, 1)}))


# --- PEFT's standalone method (peft_type TRAINABLE_TOKENS) --------------------------------------------------------
@pytest.mark.parametrize("arch,targets,keys", [
    ("llama", None, ["model.embed_tokens"]),
    ("tied_llama", None, ["lm_head", "model.embed_tokens"]),      # PEFT saves the tied head's key too
    ("gpt2", ["wte"], ["lm_head", "transformer.wte"]),
])
def test_standalone_trainable_tokens_both_ways_with_peft(arch, targets, keys, tmp_path):
    ref = get_peft_model(build(arch), TrainableTokensConfig(token_indices=[3, 5, 40], target_modules=targets))
    randomize_peft_(ref, 0)
    ref.eval().save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(saved) == [f"base_model.model.{p}.trainable_tokens_delta" for p in keys]
    pm = peftc.load_adapter(build(arch), tmp_path / "peft")
    assert isinstance(pm.store["default"].spec, peftc.TrainableTokens) and pm.store["default"].targets == []
    assert_same_weights(pm, ref)
    base, merged = build(arch), pm.merge()
    for x in parity_inputs(family(arch), labels=True):
        assert_parity(pm, ref, x, TOL_TT)
        assert_parity(merged, ref, x, TOL_TT)
        assert (main_output(pm(**x)) - main_output(base(**x))).abs().max() > 10 * TOL_TT

    mine = peftc.compile(build(arch), peftc.TrainableTokens(token_indices=[3, 5, 40], target_modules=targets))
    randomize_ours_(mine, 3)
    mine.save_adapter(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(saved)
    back = PeftModel.from_pretrained(build(arch), tmp_path / "ours").eval()
    assert_same_weights(mine, back)
    for x in parity_inputs(family(arch)):
        assert_parity(mine, back, x, TOL_TT)
    assert mine.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0] == 3 * 64


def test_standalone_trainable_tokens_config_and_refusals(llama_pm):
    spec = peftc.TrainableTokens(token_indices=[1, 2], target_modules="model\\.embed_tokens", init=False)
    pm = llama_pm[1]
    pm.add_adapter("tt", spec)
    try:
        rows = pm.store["tt"].tokens["model-embed_tokens"]
        assert rows.index.tolist() == [1, 2]          # init=False: random rows, not the embedding's
        assert not torch.equal(rows.delta, pm.base_model.model.embed_tokens.weight[[1, 2]])
        with pytest.raises(InputError, match="TrainableTokens has no per-row form"):
            pm(**inputs("llama"), adapter_names=["tt", "default", "tt"])
    finally:
        pm.set_adapter("default")
        pm.delete_adapter("tt")
    assert_unchanged(llama_pm)
    with pytest.raises(SpecError, match="index 999 is outside the vocabulary"):
        pm.add_adapter("tt", {"peft_type": "TRAINABLE_TOKENS", "token_indices": [999]})
    with pytest.raises(SpecError, match="token_indices must be a non-empty list"):
        peftc.TrainableTokens()
    with pytest.raises(SpecError, match="TRAINABLE_TOKENS option peftc does not know"):
        pm.add_adapter("tt", {"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "use_magic": True})
    assert_unchanged(llama_pm)


@pytest.mark.slow       # long: runs in CI's slow pass
def test_switching_adapters_with_other_row_counts_never_recompiles():
    """Row counts are unbacked dynamic dims of the route: adapters with 0, 1 and 3 rows share one compiled graph."""
    import torch._dynamo as dynamo

    from tests.recompiles import graphs, no_recompiles

    dynamo.reset()
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, trainable_token_indices=[5]))
    pm.add_adapter("three", peftc.LoRA(r=4, trainable_token_indices=[1, 2, 3]))
    pm.add_adapter("none", peftc.LoRA(r=4))
    for name in pm.adapters:
        randomize_ours_(pm, 1, name=name)
    x = inputs("llama")
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    with torch.no_grad():
        eager = {}
        for name in pm.adapters:
            pm.set_adapter(name)
            eager[name] = pm(**x).logits
        pm.set_adapter("default")
        compiled(**x)
        before = graphs()
        with no_recompiles():
            for name in ("three", "none", "default", "three"):
                pm.set_adapter(name)
                assert (compiled(**x).logits - eager[name]).abs().max() <= TOL_TT, name
    assert graphs() == before
    dynamo.reset()


def test_every_method_joins_and_leaves_a_module_with_a_capacity():
    """A LoRA module with a declared capacity takes a LoRA adapter as data, and an IA3 and a TrainableTokens adapter
    too (TrainableTokens has no lane: it comes with a rebuild); each gives its own outputs, and deleting each leaves
    the others exact."""
    x = inputs("llama")
    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, init=False), capacity=peftc.Capacity(4, rank=8)).eval()
    with torch.no_grad():
        lora = pm(**x).logits
    pm.add_adapter("ia3", peftc.IA3(init_ia3_weights=False))
    pm.add_adapter("tok", peftc.TrainableTokens(token_indices=[1, 2, 3]))
    with torch.no_grad():
        for w in pm.store["tok"].tokens.values():
            for p in w.parameters():
                p.normal_()
    pm.add_adapter("b", peftc.LoRA(r=8, init=False))
    assert pm.store.slots() == ["__base__", "default", "ia3", "tok", "b"]
    outs = {}
    for name in ("default", "ia3", "tok", "b"):
        pm.set_adapter(name)
        with torch.no_grad():
            outs[name] = pm(**x).logits
    assert torch.equal(outs["default"], lora)
    for a, b in [("default", "ia3"), ("ia3", "tok"), ("tok", "b"), ("default", "b")]:
        assert (outs[a] - outs[b]).abs().max() > 1e-3, f"{a} and {b} give the same outputs"
    pm.set_adapter("default")
    for gone in ("tok", "ia3", "b"):
        pm.delete_adapter(gone)
        for name in [n for n in ("default", "ia3", "tok", "b") if n in pm.adapters]:
            pm.set_adapter(name)
            with torch.no_grad():
                torch.testing.assert_close(pm(**x).logits, outs[name], rtol=0, atol=1e-5)
        pm.set_adapter("default")
    assert pm.store.slots() == ["__base__", "default", None, None, None]
