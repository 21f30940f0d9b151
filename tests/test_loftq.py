"""LoftQ (init="loftq") end to end against HF PEFT 0.21.2 on tiny Llama and GPT-2: the compiled module's outputs,
checkpoints both ways, merge, and the layers PEFT's LoftQ cannot serve.

PEFT's LoftQ (peft/tuners/lora/layer.py, LoraLayer.loftq_init) overwrites the base layer's weight with its
quantized-dequantized copy Q and sets lora_A, lora_B from the SVD of W - Q (no division by the scale). Its saved
adapter_config.json keeps init_lora_weights="loftq" and loftq_config, so PeftModel.from_pretrained runs LoftQ again
on the base it is given (quantizing its weights again) before loading the saved A, B; PEFT's own LoftQ example sets
init_lora_weights=True before saving to avoid that. peftc does the same: loading re-derives Q from the base it is
given and takes A, B from the file. On the base PEFT saved after LoftQ (the weights already Q) quantizing again changes
nothing (tests/passes/test_loftq.py: the round trips are idempotent), so both bases give PEFT's outputs.

PEFT's LoftQ runs on "cuda"; tests/peft_cpu.py runs it on the CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.config import LoftQConfig

import peftc
from peftc.quant_math import nf4_roundtrip
from tests.models import make
from tests.parity import assert_parity, assert_same_weights, max_diff, parity_inputs
from tests.peft_cpu import cuda_as_cpu
from tests.test_layer_kinds import kinds_inputs, model as kinds_model

# PEFT warns about tied weights, Conv1D's fan_in_fan_out and the like
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

R = 4
TOL = 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["lm_head"]}


def untied_gpt2() -> torch.nn.Module:
    """Tiny GPT-2 with its own lm_head weight: its only linear layer (the blocks are Conv1D, which LoftQ does not
    serve) and, untied, one PEFT's LoftQ does not write into the input embedding too."""
    m = make("gpt2")
    m.config.tie_word_embeddings = False
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
    return m


def base(arch: str) -> torch.nn.Module:
    return untied_gpt2() if arch == "gpt2" else make(arch)


def peft_loftq(model, targets, bits: int, iters: int, alpha: float = R, **kw):
    with cuda_as_cpu():
        return get_peft_model(model, LoraConfig(r=R, lora_alpha=alpha, target_modules=targets,
                                                init_lora_weights="loftq",
                                                loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters), **kw))


def ours_loftq(model, targets, bits: int, iters: int, alpha: float = R, **kw):
    return peftc.compile(model, peftc.LoRA(r=R, alpha=alpha, targets=targets, init="loftq", loftq_bits=bits,
                                           loftq_iter=iters, **kw))


@torch.no_grad()
def nudge_(params, seed: int) -> None:
    """A trained-looking adapter: every LoRA tensor moved off its init."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(0.05 * torch.randn(p.shape, generator=g))


CASES = [("llama", 4, 1), ("llama", 8, 2), ("gpt2", 4, 2)]


@pytest.mark.parametrize("arch,bits,iters", CASES, ids=[f"{a}-{b}bit-{n}iter" for a, b, n in CASES])
def test_compiled_loftq_equals_peft_and_merges(arch, bits, iters):
    model = base(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = ours_loftq(model, TARGETS[arch], bits, iters)
    ref = peft_loftq(base(arch), TARGETS[arch], bits, iters).eval()
    assert_same_weights(ours, ref)                     # A, B bit for bit
    xs = parity_inputs(arch)
    assert max_diff(ours, model, xs[0]) > 10 * TOL     # the quantized base moved the output
    merged = ours.merge()
    for x in xs:
        assert_parity(ours, ref, x, TOL)
        assert_parity(merged, ref, x, TOL)
    with ours.disable_adapters():                      # the model itself, not its quantized copy
        assert max_diff(ours, model, xs[0]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was changed"


def test_peft_checkpoint_loads_on_the_base_peft_saved_and_on_the_original(tmp_path):
    ref = peft_loftq(make("llama"), TARGETS["llama"], 4, 2)
    nudge_([p for n, p in ref.named_parameters() if "lora_" in n], seed=1)
    ref.eval().save_pretrained(tmp_path / "adapter")
    copy.deepcopy(ref).unload().save_pretrained(tmp_path / "base")         # the quantized base, PEFT's LoftQ workflow
    xs = parity_inputs("llama")
    saved = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    q_proj = saved.model.layers[0].self_attn.q_proj.weight                # Q, not the original weight
    assert torch.equal(q_proj, ref.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    assert (q_proj - make("llama").model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3
    for model in (saved, make("llama")):            # the base PEFT saved, the original
        ours = peftc.load_adapter(model.eval(), tmp_path / "adapter")
        spec = ours.store["default"].spec
        assert (spec.init, spec.loftq_bits, spec.loftq_iter) == ("loftq", 4, 2)
        assert_same_weights(ours, ref)                 # A, B from the file, not from LoftQ run again
        merged = ours.merge()
        for x in xs:
            assert_parity(ours, ref, x, TOL)
            assert_parity(merged, ref, x, TOL)
    with cuda_as_cpu():                                # PEFT's own reload runs LoftQ again, to the same outputs
        again = PeftModel.from_pretrained(make("llama"), tmp_path / "adapter").eval()
    assert_parity(again, ref, xs[0], TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftc_checkpoint_loads_in_peft(arch, tmp_path):
    ours = ours_loftq(base(arch), TARGETS[arch], 8, 1)
    nudge_(ours.trainable_parameters(), seed=2)
    ours.save_adapter(tmp_path)
    with cuda_as_cpu():
        ref = PeftModel.from_pretrained(base(arch), tmp_path).eval()
    assert ref.peft_config["default"].loftq_config == {"loftq_bits": 8, "loftq_iter": 1}
    assert_same_weights(ours, ref)
    for x in parity_inputs(arch):
        assert_parity(ours.eval(), ref, x, TOL)
    loaded = peftc.load_adapter(base(arch), tmp_path)                    # and back in peftc, exactly
    assert max_diff(loaded, ours, parity_inputs(arch)[0]) == 0


def test_loftq_with_dora_and_a_scale_equals_peft():
    """DoRA's magnitude starts at the norms of Q + s B A (the weight it runs on); alpha != r: PEFT does not divide B A
    by the scale, so the fresh adapter adds s (W - Q) approximately, and peftc too."""
    ours = ours_loftq(make("llama"), ["q_proj", "v_proj"], 4, 1, alpha=2 * R, use_dora=True)
    ref = peft_loftq(make("llama"), ["q_proj", "v_proj"], 4, 1, alpha=2 * R, use_dora=True).eval()
    a, b = ours.store.peft_state_dict("default"), get_peft_model_state_dict(ref)
    assert sorted(a) == sorted(b)
    for key, value in a.items():                       # A, B exactly; the magnitudes' norms up to rounding
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-6)
    for x in parity_inputs("llama"):
        assert_parity(ours, ref, x, TOL)
        assert_parity(ours.merge(), ref, x, TOL)


def test_layers_loftq_cannot_serve_are_refused_by_name():
    """PEFT's LoftQ on GPT-2's Conv1D factors the stored [in, out] weight (its adapter then fails at the forward); on
    an embedding or a convolution its layer calls loftq_init without the config (TypeError). peftc refuses them."""
    with pytest.raises(peftc.SpecError, match=r"init 'loftq' on transformer.h.0.attn.c_attn \(a GPT-2 Conv1D layer\) "
                                              r"is not supported: .*; leave the layer out of targets"):
        ours_loftq(make("gpt2"), ["c_attn"], 4, 1)
    ref = peft_loftq(make("gpt2"), ["c_attn"], 4, 1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ref(**parity_inputs("gpt2")[0])
    with pytest.raises(peftc.SpecError, match=r"init 'loftq' on transformer.wte \(an embedding\) is not supported"):
        ours_loftq(make("gpt2"), ["wte"], 4, 1)
    with pytest.raises(TypeError, match="loftq_init.* missing 1 required positional argument: 'config'"):
        peft_loftq(make("gpt2"), ["wte"], 4, 1)
    x = kinds_inputs(2)
    with pytest.raises(peftc.SpecError, match=r"init 'loftq' on c2 \(a convolution\) is not supported"):
        peftc.compile(kinds_model(), peftc.LoRA(r=R, targets=["c2"], init="loftq"), example_inputs=x)


def test_a_loftq_adapter_cannot_share_a_mixed_batch():
    pm = ours_loftq(make("llama"), ["q_proj"], 4, 1)
    pm.add_adapter("plain", peftc.LoRA(r=R, targets=["q_proj"], init=False))
    with pytest.raises(peftc.InputError, match=r"adapter 'default' cannot share a batch .*\(init 'loftq'\)"):
        pm(**parity_inputs("llama")[0], adapter_names=["default", "plain", "plain"])


@pytest.mark.slow       # long: runs in CI's slow pass
def test_tied_lm_head_keeps_the_quantized_copy_at_the_head():
    """Tied GPT-2: PEFT writes Q into the shared tensor, so its input embedding reads Q too; peftc keeps Q at the
    adapted layer (as it keeps PiSSA's residual), and the embedding reads the model's own weight."""
    model = make("gpt2")
    pm = ours_loftq(model, ["lm_head"], 4, 1)
    w = pm.store["default"].sites["lm_head"]
    assert torch.equal(w.residual, nf4_roundtrip(model.lm_head.weight))
    assert torch.equal(model.transformer.wte.weight, model.lm_head.weight)        # not changed
    ref = peft_loftq(make("gpt2"), ["lm_head"], 4, 1)
    assert torch.equal(ref.base_model.model.transformer.wte.weight, w.residual)   # PEFT: the embedding is Q too
