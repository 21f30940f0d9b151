"""Merging and exporting onto quantized bases (bitsandbytes 4-bit / 8-bit): exact by default, requantized on request
with its error reported, equal to PEFT's merge where both requantize."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftc
from peftc.errors import ExportError, MergeError

pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

warnings.filterwarnings("ignore", message=".*inputs will be cast.*")

KINDS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
SPECS = {
    "lora": lambda: peftc.LoRA(r=4, alpha=8, targets="all-linear"),
    "dora": lambda: peftc.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "ia3": lambda: peftc.IA3(),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=100, vocab_size=128)     # 100: a width bitsandbytes' CPU eval path rejects
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load(base_dir, kind: str):
    return LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                            device_map="cpu")


def fp32_bnb(model):
    """bitsandbytes' CPU eval path (AVX512-BF16 CPUs) repacks 4-bit weights in place and computes in bf16; the
    reference must compute as the layer's compute dtype says, as peftc does."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def adapted(base_dir, kind: str, spec: str, seed: int = 3):
    pm = peftc.compile(load(base_dir, kind), SPECS[spec]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))       # an adapter that changes the output
    return pm.eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


SLOW = pytest.mark.slow


@pytest.mark.parametrize("kind, spec", [("nf4-dq", "lora"), ("nf4-dq", "dora"), ("nf4-dq", "ia3"),
                                        pytest.param("fp4", "lora", marks=SLOW), pytest.param("fp4", "dora", marks=SLOW),
                                        pytest.param("fp4", "ia3", marks=SLOW)])
def test_merge_onto_4bit_is_exact(base_dir, kind, spec):
    pm = adapted(base_dir, kind, spec)
    want = logits(pm)
    with pm.disable_adapters():
        assert (want - logits(pm)).abs().max() > 1e-2          # the adapter matters
    merged = pm.merge()
    assert merged.requantize_report is None
    assert (logits(merged) - want).abs().max() < 1e-5
    kinds = {n.target.__name__ for n in merged.graph_module.graph.nodes if n.op == "call_function"
             and "peftc" in str(n.target)}
    # layers the adapter leaves (all-linear leaves none) stay quantized ...
    assert ("linear_4bit.default" in kinds) == (spec != "lora")
    adapted_paths = pm.store[pm.active_adapter].targets
    q = f"{adapted_paths[0]}.weight"
    assert merged.graph_module.get_parameter(q).dtype == torch.float32   # ... adapted ones are dense


def test_merge_onto_8bit_within_its_own_noise(base_dir):
    pm = adapted(base_dir, "int8", "lora")
    want = logits(pm)
    merged = logits(pm.merge())
    # the base's own 8-bit noise: its eval matmul (LLM.int8(), activations quantized) against its dequantized weights
    with pm.disable_adapters():
        int8 = logits(pm)
        pm.train()
        dense = logits(pm)
        pm.eval()
    noise = (int8 - dense).abs().max()
    assert noise > 0
    assert (merged - want).abs().max() <= 2 * noise


@pytest.mark.parametrize("kind", ["nf4-dq", pytest.param("fp4", marks=SLOW), "int8"])
def test_requantize_equals_peft_merge_and_reports_error(base_dir, kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = adapted(base_dir, kind, "lora")
    rq = pm.merge(requantize=True)
    report = rq.requantize_report
    assert set(report.layers) == set(pm.store[pm.active_adapter].targets)
    assert report.max_abs == max(e for e, _ in report.layers.values()) > 0
    assert 0 < report.relative < 0.5
    # PEFT's merge_and_unload requantizes W + s B A the same way
    tmp = base_dir / f"adapter-{kind}"
    pm.save_adapter(tmp)
    peft_model = PeftModel.from_pretrained(fp32_bnb(load(base_dir, kind)), tmp)
    theirs = fp32_bnb(peft_model.merge_and_unload()).eval()
    with torch.no_grad():
        got = theirs(input_ids=IDS, use_cache=False).logits
    assert (logits(rq) - got).abs().max() < 1e-5
    if kind != "int8":    # on 4 bits rounding moves the output, where the exact merge does not
        assert (logits(rq) - logits(pm)).abs().max() > 1e3 * (logits(pm.merge()) - logits(pm)).abs().max()
    del get_peft_model, LoraConfig


def test_export_merged_from_4bit(base_dir, tmp_path):
    pm = adapted(base_dir, "nf4-dq", "lora")
    before = {k: v.clone() for k, v in pm.base_model.state_dict().items()}
    dense = peftc.export_merged(pm, tmp_path / "dense", progress=False)
    back = LlamaForCausalLM.from_pretrained(dense).eval()
    assert not hasattr(back.config, "quantization_config")
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    with torch.no_grad():
        assert (back(input_ids=IDS, use_cache=False).logits - logits(pm)).abs().max() < 1e-5
    q4 = peftc.export_merged(pm, tmp_path / "q4", progress=False, requantize=True)
    back4 = fp32_bnb(LlamaForCausalLM.from_pretrained(q4, device_map="cpu")).eval()
    assert type(back4.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert (back4(input_ids=IDS, use_cache=False).logits - logits(pm.merge(requantize=True))).abs().max() < 1e-5
    after = pm.base_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_requantize_refused_where_nothing_is_quantized(base_dir, tmp_path):
    pm = peftc.compile(LlamaForCausalLM.from_pretrained(base_dir), peftc.LoRA(r=2))
    with pytest.raises(MergeError, match="no adapted layer of this model is quantized"):
        pm.merge(requantize=True)
    with pytest.raises(ExportError, match="no adapted layer of this model is quantized"):
        peftc.export_merged(pm, tmp_path / "x", requantize=True, progress=False)
    assert not (tmp_path / "x").exists()
    q = adapted(base_dir, "nf4-dq", "lora")
    with pytest.raises(ExportError, match="dtype applies to a full-precision export"):
        peftc.export_merged(q, tmp_path / "y", requantize=True, dtype="bf16", progress=False)
    assert not (tmp_path / "y").exists()
