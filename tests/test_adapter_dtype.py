"""Adapter dtype as PEFT's (autocast_adapter_dtype): float32 adapter weights on a bfloat16 model, outputs in bfloat16,
parity with PEFT in eval and training, checkpoints both ways; False keeps the model's dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peftc
from peftc.errors import SpecError
from tests.models import main_output, make
from tests.parity import assert_same_weights, parity_inputs, randomize_peft_

BF16 = torch.bfloat16
TARGETS = ["q_proj", "v_proj", "down_proj"]
# bfloat16 logits of the tiny models (|logits| < ~1.5): one or two bf16 ulps of the largest ones
TOL = 2e-2


def _peft(arch: str, config, autocast: bool = True, seed: int = 3):
    """PEFT's model on a bfloat16 copy of `arch`, with random lora_B (drawn in float32: not bf16-representable)."""
    ref = get_peft_model(make(arch).to(BF16), config, autocast_adapter_dtype=autocast)
    randomize_peft_(ref, seed)
    return ref


def _assert_close(ours, ref, xs, tol=TOL):
    with torch.no_grad():
        for x in xs:
            a, b = main_output(ours(**x)), main_output(ref(**x))
            assert a.dtype == b.dtype == BF16, (a.dtype, b.dtype)
            diff = (a.float() - b.float()).abs().max().item()
            assert diff <= tol, f"outputs differ by {diff:.3g} > {tol}"


def _dtypes(pm, name="default"):
    return {p.dtype for p in pm.store[name].parameters()}


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_lora_bf16_fp32_adapter_parity_eval_train_and_checkpoints(arch, tmp_path):
    """PEFT's adapter (fp32 on bf16) saved, loaded by peftc: fp32 weights bit for bit, PEFT's outputs in eval and the
    same loss and float32 gradients in training; peftc's save loads back into PEFT as the same fp32 tensors."""
    ref = _peft(arch, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert {p.dtype for n, p in ref.named_parameters() if "lora_" in n} == {torch.float32}
    ref.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}

    base = make(arch).to(BF16)
    ours = peftc.load_adapter(base, tmp_path / "peft", is_trainable=True)
    assert _dtypes(ours) == {torch.float32}
    assert_same_weights(ours, ref)
    xs = parity_inputs(arch, labels=True)
    ours.eval(), ref.eval()
    _assert_close(ours, ref, xs)
    # a mixed batch (the gathered form) as PEFT's own: x cast up, the update cast back, then added
    rows = ["default", "__base__", "default"]
    with torch.no_grad():
        a, b = main_output(ours(**xs[0], adapter_names=rows)), main_output(ref(**xs[0], adapter_names=rows))
    assert a.dtype == b.dtype == BF16 and (a.float() - b.float()).abs().max().item() <= TOL
    # the fp32 path is what is measured: the same adapter in bf16 (autocast off) moves the output elsewhere
    low = peftc.load_adapter(make(arch).to(BF16), tmp_path / "peft", autocast_adapter_dtype=False)
    assert _dtypes(low) == {BF16}
    with torch.no_grad():
        assert not torch.equal(main_output(low(**xs[0])), main_output(ours(**xs[0])))

    # training: same loss, float32 gradients on the adapter's parameters equal PEFT's
    ours.train(), ref.train()
    la, lb = ours(**xs[0])["loss"], ref(**xs[0])["loss"]
    assert la.dtype == lb.dtype
    assert abs(la.item() - lb.item()) <= TOL
    la.backward(), lb.backward()
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    mine = ours.store.peft_state_dict("default")
    assert len(theirs) == len(mine) > 0
    params = dict(ours.store["default"].named_parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())
    for key, t in mine.items():
        g_ref = theirs[next(n for n in theirs if n.replace(".default", "") == key)]
        g_ours = next(p.grad for p in params.values() if p.data_ptr() == t.data_ptr())
        assert g_ref.dtype == torch.float32
        scale = g_ref.abs().max().item() + 1e-6
        assert (g_ours - g_ref).abs().max().item() <= 0.05 * scale, key

    # peftc -> PEFT: fp32 tensors on disk, PEFT's from_pretrained reads them as they are
    ours.eval()
    ours.save_adapter(tmp_path / "ours")
    assert {t.dtype for t in load_file(tmp_path / "ours" / "adapter_model.safetensors").values()} == {torch.float32}
    back = PeftModel.from_pretrained(make(arch).to(BF16), tmp_path / "ours")
    assert_same_weights(ours, back)
    _assert_close(ours, back, xs[:1])


def test_autocast_false_keeps_model_dtype_as_peft():
    ref = _peft("llama", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), autocast=False)
    assert {p.dtype for n, p in ref.named_parameters() if "lora_" in n} == {BF16}
    ours = peftc.compile(make("llama").to(BF16), peftc.LoRA(r=4, alpha=8, targets=TARGETS),
                         autocast_adapter_dtype=False)
    assert _dtypes(ours) == {BF16}
    _copy_from_peft(ours, ref)
    assert_same_weights(ours, ref)
    _assert_close(ours, ref, parity_inputs("llama"))


def _copy_from_peft(pm, ref, name="default"):
    """PEFT's adapter tensors into peftc's (the same keys, PEFT's adapter name stripped)."""
    from peft import get_peft_model_state_dict
    theirs = get_peft_model_state_dict(ref, adapter_name=name)
    with torch.no_grad():
        for key, t in pm.store.peft_state_dict(name).items():
            t.copy_(theirs[key])


@pytest.mark.slow
def test_only_half_precision_is_upcast():
    """A float32 model's adapter weights stay float32; a float16 model's become float32 (as bfloat16's)."""
    pm = peftc.compile(make("llama"), peftc.LoRA(r=2, targets=["q_proj"]))
    assert _dtypes(pm) == {torch.float32}
    pm16 = peftc.compile(make("llama").to(torch.float16), peftc.LoRA(r=2, targets=["q_proj"]))
    assert _dtypes(pm16) == {torch.float32}


def test_lora_fp16_fp32_adapter_parity():
    """float16 as bfloat16: PEFT's float32 adapter copied into peftc's, outputs in float16 within an ulp or two of
    PEFT's; the adapter moves them off the base model's."""
    F16 = torch.float16
    ref = get_peft_model(make("llama").to(F16), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_peft_(ref, 5)
    ours = peftc.compile(make("llama").to(F16), peftc.LoRA(r=4, alpha=8, targets=TARGETS))
    assert _dtypes(ours) == {torch.float32}
    _copy_from_peft(ours, ref)
    assert_same_weights(ours, ref)
    ref.eval(), ours.eval()
    with torch.no_grad():
        for x in parity_inputs("llama"):
            a, b = main_output(ours(**x)), main_output(ref(**x))
            assert a.dtype == b.dtype == F16
            assert (a.float() - b.float()).abs().max().item() <= 2e-3   # float16 ulp at |logits| ~ 1.5 is 1e-3
            with ours.disable_adapters():
                assert (main_output(ours(**x)).float() - a.float()).abs().max().item() > 1e-2


def test_add_adapter_autocast_and_bad_flag():
    pm = peftc.compile(make("llama").to(BF16), peftc.LoRA(r=2, targets=["q_proj"]))
    pm.add_adapter("low", peftc.LoRA(r=2, targets=["q_proj"]), autocast_adapter_dtype=False)
    pm.add_adapter("high", peftc.LoRA(r=2, targets=["v_proj"]))
    assert _dtypes(pm, "low") == {BF16} and _dtypes(pm, "high") == {torch.float32}
    x = parity_inputs("llama")[1]
    for name in ("low", "high", "default"):
        pm.set_adapter(name)
        with torch.no_grad():
            assert main_output(pm(**x)).dtype == BF16
    with pytest.raises(SpecError, match="autocast_adapter_dtype must be True or False"):
        peftc.compile(make("llama"), peftc.LoRA(r=2), autocast_adapter_dtype="yes")


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_ia3_bf16_fp32_vectors_parity(arch, tmp_path):
    """IA3 as PEFT: float32 vectors on a bfloat16 model (output and feedforward sides), PEFT's outputs in the plain
    and the mixed form, fp32 tensors loaded from PEFT's checkpoint."""
    ref = get_peft_model(make(arch).to(BF16), IA3Config(target_modules=["k_proj", "down_proj"],
                                                        feedforward_modules=["down_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "ia3_l" in n:
                assert p.dtype == torch.float32
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make(arch).to(BF16), tmp_path)
    assert _dtypes(ours) == {torch.float32}
    assert_same_weights(ours, ref)
    xs = parity_inputs(arch)
    _assert_close(ours, ref, xs)
    ours.add_adapter("other", peftc.IA3(targets=["k_proj"], feedforward=[]))
    rows = ["default", "other", "__base__"]
    with torch.no_grad():
        mixed = main_output(ours(**xs[0], adapter_names=rows))
        plain = main_output(ref(**xs[0]))
    assert mixed.dtype == BF16
    assert (mixed[0].float() - plain[0].float()).abs().max().item() <= TOL


def test_dora_bf16_fp32_adapter_parity():
    """DoRA with PEFT's default autocast: float32 A, B and magnitude on a bfloat16 model, PEFT's outputs unmerged and
    merged."""
    from peft import set_peft_model_state_dict
    model = make("llama").to(BF16)
    pm = peftc.compile(model, peftc.LoRA(r=4, alpha=8, targets=TARGETS, init=False, use_dora=True))
    assert _dtypes(pm) == {torch.float32}
    ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                          init_lora_weights=False))
    assert not set_peft_model_state_dict(ref, pm.store.peft_state_dict("default")).unexpected_keys
    assert_same_weights(pm, ref.eval())
    xs = parity_inputs("llama")
    _assert_close(pm, ref, xs)
    with torch.no_grad():
        a, b = main_output(pm.merge()(**xs[0])), main_output(ref.merge_and_unload()(**xs[0]))
    assert a.dtype == b.dtype == BF16 and (a.float() - b.float()).abs().max().item() <= TOL


# ---- PEFT config objects as specs (read through to_dict(), peft never imported by peftc) ----

def test_peft_lora_config_object_equals_own_spec_and_peft():
    from peft import set_peft_model_state_dict
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, lora_dropout=0.1, use_rslora=True)
    own = peftc.LoRA(r=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj"], use_rslora=True)
    model = make("llama")
    pm = peftc.compile(model, cfg)
    assert pm.store["default"].spec == peftc.compile(model, own).store["default"].spec
    assert set(pm.store.peft_state_dict("default")) == set(peftc.compile(model, own).store.peft_state_dict("default"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B.copy_(torch.randn(w.B.shape, generator=g) * 0.5)
    ref = get_peft_model(copy.deepcopy(model), cfg)
    assert not set_peft_model_state_dict(ref, pm.store.peft_state_dict("default")).unexpected_keys
    assert_same_weights(pm, ref)
    pm.eval(), ref.eval()
    with torch.no_grad():
        for x in parity_inputs("llama"):
            a, b, base = main_output(pm(**x)), main_output(ref(**x)), main_output(model(**x))
            assert (a - b).abs().max().item() <= 1e-4
            assert (a - base).abs().max().item() > 1e-3          # the adapter moves the output
    assert cfg.target_modules == {"q_proj", "v_proj"} and cfg.r == 4    # the config is not changed


def test_peft_ia3_config_object_and_unknown_method():
    cfg = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peftc.compile(make("llama"), cfg)
    own = peftc.compile(make("llama"), peftc.IA3(targets=["k_proj", "down_proj"], feedforward=["down_proj"]))
    a, b = pm.store["default"], own.store["default"]
    assert a.targets == b.targets and set(a.spec.targets) == set(b.spec.targets)
    assert a.spec.feedforward == b.spec.feedforward == ("down_proj",)
    from peft import LoHaConfig
    with pytest.raises(SpecError, match=r"LoHaConfig \(a PEFT config\): peft_type='LOHA' is not supported yet; "
                                        r"supported: \[.*'LORA'.*'IA3'.*\]"):
        peftc.compile(make("llama"), LoHaConfig(r=4, target_modules=["q_proj"]))


def test_lora_on_4bit_bf16_model_fp32_adapters_equal_peft(tmp_path):
    """A bitsandbytes nf4 model in bfloat16: float32 adapters, computed as PEFT's Linear4bit LoRA layer (unfused),
    PEFT's outputs and float32 gradients."""
    import transformers as tf
    from peft import set_peft_model_state_dict
    from tests.test_quantized import bnb_config, keep_reference_kernels_, tiny

    tiny("llama").save_pretrained(tmp_path)

    def load():
        return keep_reference_kernels_(tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=bnb_config("nf4-bf16"), device_map="cpu", dtype=BF16))

    pm = peftc.compile(load(), peftc.LoRA(r=4, targets=["q_proj", "v_proj"]))
    assert _dtypes(pm) == {torch.float32}
    ref = get_peft_model(load(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B.copy_(torch.randn(w.B.shape, generator=g))
    set_peft_model_state_dict(ref, pm.store.peft_state_dict("default"))
    assert_same_weights(pm, ref)
    ids = torch.randint(1, 100, (2, 7), generator=g)
    _assert_close(pm, ref, [{"input_ids": ids}], tol=1e-2)
    pm.train()
    pm(input_ids=ids, labels=ids)["loss"].backward()
    assert {p.grad.dtype for p in pm.store["default"].parameters()} == {torch.float32}


def test_lora_on_embedding_bf16_fp32_adapter_equals_peft():
    """LoRA on the token embedding (LoraBranch) with float32 weights on a bfloat16 model: PEFT's outputs, plain and
    in a mixed batch."""
    from peft import set_peft_model_state_dict
    targets = ["embed_tokens", "q_proj"]
    model = make("llama").to(BF16)
    pm = peftc.compile(model, peftc.LoRA(r=4, alpha=8, targets=targets, init=False))
    assert _dtypes(pm) == {torch.float32}
    ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    set_peft_model_state_dict(ref, pm.store.peft_state_dict("default"))
    assert_same_weights(pm, ref)
    pm.eval(), ref.eval()
    xs = parity_inputs("llama")
    _assert_close(pm, ref, xs)
    rows = ["default", "__base__", "default"]
    with torch.no_grad():
        a, b = main_output(pm(**xs[0], adapter_names=rows)), main_output(ref(**xs[0], adapter_names=rows))
    assert a.dtype == BF16 and (a.float() - b.float()).abs().max().item() <= TOL


@pytest.mark.slow
def test_capacity_mixed_batch_takes_fp32_adapter_added_later():
    """A capacity's mixed graph on a bfloat16 model, made with a bfloat16 adapter, serves a float32 adapter added
    later (as data, no new graph): each row equals that adapter's plain call."""
    pm = peftc.compile(make("llama").to(BF16), peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init=False),
                       capacity=peftc.Capacity(adapters=3, rank=8), autocast_adapter_dtype=False)
    x = parity_inputs("llama")[0]
    with torch.no_grad():
        pm(**x, adapter_names=["default", "__base__", "default"])          # the mixed graph, before the new one
        pm.add_adapter("wide", peftc.LoRA(r=2, targets=["q_proj"], init=False))
        assert _dtypes(pm, "wide") == {torch.float32} and _dtypes(pm, "default") == {BF16}
        mixed = main_output(pm(**x, adapter_names=["default", "wide", "__base__"]))
        for i, name in enumerate(["default", "wide"]):
            pm.set_adapter(name)
            plain = main_output(pm(**x))
            assert (mixed[i].float() - plain[i].float()).abs().max().item() <= TOL, name


def test_trainable_tokens_rows_fp32_as_peft(tmp_path):
    """LoRA with trainable_token_indices on a bfloat16 model: PEFT keeps the trained rows in float32 too; its
    checkpoint loads bit for bit and gives its outputs."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7])
    ref = _peft("llama", cfg)
    deltas = [p for n, p in ref.named_parameters() if "trainable_tokens_delta" in n]
    assert deltas and {p.dtype for p in deltas} == {torch.float32}
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(make("llama").to(BF16), tmp_path, is_trainable=True)
    assert {p.dtype for p in ours.store["default"].parameters()} == {torch.float32}
    assert_same_weights(ours, ref)
    ours.eval(), ref.eval()
    _assert_close(ours, ref, parity_inputs("llama"))
    ours.train()
    x = parity_inputs("llama", labels=True)[0]
    ours(**x)["loss"].backward()
    rows = [t.delta for t in ours.store["default"].tokens.values()]
    assert rows and all(r.grad is not None and r.grad.dtype == torch.float32 for r in rows)
