"""Quantized bases end to end (bitsandbytes 4-bit nf4 / fp4 with and without double quantization, 8-bit LLM.int8()):
parity with PEFT per quantization kind and method, checkpoints both ways, QLoRA training, torch.compile, and a
quantized model that compile refuses or reads but never changes.

Models are tiny random-init transformers models saved to a temporary directory and loaded back with
from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map="cpu"), as a user loads a quantized model."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import transformers as tf
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

import peftc
from peftc import SpecError
from tests.compare import assert_differs
from tests.models import VOCAB, main_output
from tests.parity import MOVED, assert_parity, assert_same_weights, max_diff, parity_inputs
from tests.recompiles import fresh_dynamo  # noqa: F401 (autouse: an empty compile cache per test)

# PEFT and bitsandbytes warn about casts (fp32 inputs quantized through fp16, ...); they say nothing about parity
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FOUR_BIT = ("nf4", "nf4-dq", "fp4", "fp4-dq")
QUANTS = [f"{k}-{c}" for k in FOUR_BIT for c in COMPUTE] + ["int8"]       # nf4-dq-bf16: nf4, double quant., bf16
# Largest allowed |peftc - PEFT| of the logits per compute dtype (measured: ~1e-6 in float32 and int8; in half
# precision the adapters' float32 rounding flips an occasional bf16 / fp16 rounding of the next layer's input).
TOL = {"fp32": 1e-4, "int8": 1e-4, "bf16": 2e-3, "fp16": 2e-3}


def tol(quant: str) -> float:
    return TOL[quant.rsplit("-", 1)[-1]]


def bnb_config(quant: str) -> tf.BitsAndBytesConfig:
    """"nf4-dq-bf16" -> load_in_4bit, nf4, double quantization, bf16 compute; "int8" -> load_in_8bit."""
    if quant == "int8":
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    kind, compute = quant.rsplit("-", 1)
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[:3],
                                 bnb_4bit_use_double_quant=kind.endswith("-dq"),
                                 bnb_4bit_compute_dtype=COMPUTE[compute])


def tiny(arch: str) -> torch.nn.Module:
    """A one-layer random-init causal LM (one layer keeps each compile about a second; every linear layer of it
    is one bitsandbytes quantizes)."""
    torch.manual_seed(0)
    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config)}[arch]
    return cls(cfg(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128))


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """load(arch, quant): a fresh quantized model, from the arch's tiny model saved once per module."""
    dirs: dict[str, str] = {}

    def _load(arch: str, quant: str) -> torch.nn.Module:
        if arch not in dirs:
            dirs[arch] = str(tmp_path_factory.mktemp(arch))
            tiny(arch).save_pretrained(dirs[arch])
        return tf.AutoModelForCausalLM.from_pretrained(dirs[arch], quantization_config=bnb_config(quant),
                                                       device_map="cpu")
    return _load


def keep_reference_kernels_(model) -> torch.nn.Module:
    """On an AVX512-BF16 CPU, bitsandbytes repacks a Linear4bit's weight in place and computes in bf16 the first time
    the layer runs in eval mode without grad (support_avx512bf16_for_cpu); peftc computes as the layer's reference
    path does (dequantize in the compute dtype, then matmul). Keep PEFT's layers on that path for eval-mode parity."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


# --- methods: peftc's spec and PEFT's config with the same meaning ---------------------------------------------------
R, ALPHA = 4, 8
METHODS = {
    "lora": (lambda: peftc.LoRA(r=R, alpha=ALPHA, targets="all-linear"),
             lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")),
    "rslora": (lambda: peftc.LoRA(r=R, alpha=ALPHA, targets="all-linear", use_rslora=True),
               lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_rslora=True)),
    "dora": (lambda: peftc.LoRA(r=R, alpha=ALPHA, targets="all-linear", use_dora=True),
             lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=True)),
    "ia3": (lambda: peftc.IA3(), lambda: IA3Config()),            # defaults: k_proj, v_proj, down_proj (feedforward)
}


@torch.no_grad()
def randomize_(pm, seed: int = 5) -> None:
    """Trained-looking adapter weights: random A and B, DoRA magnitudes spread around the weight norms, IA3
    vectors around 1 (changes `pm`)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in pm.named_trainable_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.dtype)
        if name.endswith("magnitude"):
            p.mul_(1 + 0.3 * noise)
        elif name.endswith(".l"):
            p.copy_(1 + 0.5 * noise)
        else:
            p.copy_(0.2 * noise)


def peft_twin(load, arch: str, quant: str, method: str, pm) -> PeftModel:
    """PEFT's model of the same method on a fresh load of the same quantized model, with pm's adapter weights."""
    ref = keep_reference_kernels_(get_peft_model(load(arch, quant), METHODS[method][1]()))
    loaded = set_peft_model_state_dict(ref, pm.store.peft_state_dict("default"))
    assert not loaded.unexpected_keys, f"PEFT does not know peftc's keys {loaded.unexpected_keys[:3]}"
    assert_same_weights(pm, ref)
    return ref


def references(make, one_call: bool = False):
    """ref(training) -> PEFT's model for the next call in that mode: made once per mode (PEFT's model is not taken
    from train to eval), or with `one_call` afresh for every call. PEFT's DoRA on a CPU 8-bit layer needs that: its
    dequantize_module_weight moves the weight back with `.to(device)`, which leaves the Int8Params with codes but
    without SCB, and the layer's next call fails in bitsandbytes ('NoneType' object has no attribute 'unsqueeze')."""
    made: dict[bool, PeftModel] = {}

    def ref(training: bool) -> PeftModel:
        if one_call or training not in made:
            made[training] = make(training).train(training)
        return made[training]
    return ref


def twins(load, arch: str, quant: str, method: str, pm):
    return references(lambda training: peft_twin(load, arch, quant, method, pm),
                      one_call=quant == "int8" and method == "dora")


def assert_matches_peft(pm, ref, arch: str, quant: str) -> None:
    """pm equals PEFT (ref(training): see `references`) in train and in eval mode (no_grad) at parity_inputs'
    shapes, and its adapter moves the output well past the tolerance."""
    xs = parity_inputs(arch)
    for training in (True, False):
        pm.train(training)
        for x in xs:
            assert_parity(pm, ref(training), x, tol(quant))
        r = ref(training)
        with r.disable_adapter():
            moved = max_diff(pm, r, xs[0])
        assert moved > MOVED * tol(quant), f"the adapter moves the output by only {moved:.3g} (training={training})"


# --- parity ---------------------------------------------------------------------------------------------------------
# Each quantization kind, compute dtype and method at least once, and every method on both architectures (Qwen2:
# biases on q/k/v, which the 4-bit op casts to the compute dtype as bitsandbytes does; Qwen2 LoRA on nf4-bf16: the
# checkpoint test below); the whole product under -m slow.
DEFAULT = [("llama", "nf4-fp32", "lora"), ("llama", "nf4-dq-bf16", "dora"), ("llama", "fp4-fp32", "ia3"),
           ("llama", "fp4-dq-fp16", "rslora"), ("llama", "int8", "dora"),
           ("qwen2", "fp4-dq-fp32", "dora"), ("qwen2", "nf4-dq-fp16", "ia3"), ("qwen2", "int8", "rslora")]
MATRIX = [pytest.param(*c, id="-".join(c)) for c in DEFAULT] + [
    pytest.param(a, q, m, id=f"{a}-{q}-{m}", marks=pytest.mark.slow)
    for a in ("llama", "qwen2") for q in QUANTS for m in METHODS if (a, q, m) not in DEFAULT]


@pytest.mark.parametrize("arch, quant, method", MATRIX)
def test_matches_peft_in_train_and_eval_mode(load, arch, quant, method):
    pm = peftc.compile(load(arch, quant), METHODS[method][0]())
    kinds = {pm.sites[path].kind for path in pm.store["default"].targets}
    assert kinds == {"linear8bit" if quant == "int8" else "linear4bit"}, kinds
    randomize_(pm)
    assert_matches_peft(pm, twins(load, arch, quant, method, pm), arch, quant)


# --- checkpoints both ways ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant, method", [("nf4-dq-fp32", "dora"),
                                           pytest.param("int8", "ia3", marks=pytest.mark.slow),
                                           pytest.param("fp4-bf16", "lora", marks=pytest.mark.slow)])
def test_peft_adapter_on_a_quantized_model_loads_in_peftc(load, quant, method, tmp_path):
    """An adapter PEFT trained on a quantized model (saved with save_pretrained) loads with peftc.load_adapter onto
    the same quantized model: the same tensors and the same outputs."""
    torch.manual_seed(3)
    ref = keep_reference_kernels_(get_peft_model(load("llama", quant), METHODS[method][1]()))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if p.requires_grad:                 # trained-looking: B != 0, magnitudes off the norms, l off 1
                p.copy_(p * (1 + 0.3 * torch.randn_like(p)) if "magnitude" in n or "ia3" in n else
                        0.2 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(load("llama", quant), tmp_path)
    assert_same_weights(ours, ref)
    # train mode: the PEFT model that saved the adapter; eval mode: PEFT's own load of it
    assert_matches_peft(ours, references(lambda training: ref if training else keep_reference_kernels_(
        PeftModel.from_pretrained(load("llama", quant), tmp_path))), "llama", quant)


@pytest.mark.parametrize("quant, method", [("nf4-bf16", "lora"),
                                           pytest.param("int8", "ia3", marks=pytest.mark.slow),
                                           pytest.param("fp4-dq-fp32", "dora", marks=pytest.mark.slow)])
def test_peftc_adapter_on_a_quantized_model_loads_in_peft(load, quant, method, tmp_path):
    """peftc's save_adapter of an adapter on a quantized model: PeftModel.from_pretrained on the same quantized
    model gives the same outputs."""
    pm = peftc.compile(load("qwen2", quant), METHODS[method][0]())
    randomize_(pm)
    pm.save_adapter(tmp_path)

    def make(training: bool) -> PeftModel:
        ref = keep_reference_kernels_(PeftModel.from_pretrained(load("qwen2", quant), tmp_path))
        assert_same_weights(pm, ref)
        return ref
    assert_matches_peft(pm, references(make, one_call=quant == "int8" and method == "dora"), "qwen2", quant)


# --- QLoRA training -------------------------------------------------------------------------------------------------
def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor the model's bitsandbytes layers quantize with, by name: 4-bit packed codes, absmax, code table,
    nested absmax / code / offset (double quantization); 8-bit CB and SCB."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            s = m.weight.quant_state
            out.update({f"{path}.codes": m.weight.data, f"{path}.absmax": s.absmax, f"{path}.code": s.code})
            if s.nested:
                out.update({f"{path}.nested_absmax": s.state2.absmax, f"{path}.nested_code": s.state2.code,
                            f"{path}.offset": s.offset})
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            out.update({f"{path}.CB": m.weight.data, f"{path}.SCB": scb})
    assert out, "no bitsandbytes layer found"
    return out


def snapshot(model) -> dict:
    """What must not change: every parameter, buffer and quantized tensor (values and storage), each module's class
    and mode, each parameter's requires_grad, each 4-bit layer's quant_state object."""
    tensors = {**{f"param:{k}": v for k, v in model.named_parameters()},
               **{f"buffer:{k}": v for k, v in model.named_buffers()}, **quantized_tensors(model)}
    return {"values": {k: v.detach().clone() for k, v in tensors.items()},
            "ptrs": {k: v.data_ptr() for k, v in tensors.items()},
            "classes": {k: type(m) for k, m in model.named_modules()},
            "modes": {k: m.training for k, m in model.named_modules()},
            "grads": {k: p.requires_grad for k, p in model.named_parameters()},
            "states": {k: id(m.weight.quant_state) for k, m in model.named_modules()
                       if isinstance(m, bnb.nn.Linear4bit)}}


def assert_unchanged(model, before: dict) -> None:
    now = snapshot(model)
    for key in ("classes", "modes", "grads", "states", "ptrs"):
        assert now[key] == before[key], f"the model's {key} changed"
    changed = [k for k, v in before["values"].items() if not torch.equal(v, now["values"][k])]
    assert not changed, f"{len(changed)} tensors of the model changed, e.g. {changed[:3]}"
    assert any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def lm_batch(batch: int = 4, seq: int = 12, seed: int = 0) -> dict:
    """A learnable batch: each token is the previous one plus 3."""
    start = torch.randint(1, VOCAB, (batch, 1), generator=torch.Generator().manual_seed(seed))
    ids = (start + 3 * torch.arange(seq)) % VOCAB                        # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def peft_grads(ref) -> dict[str, torch.Tensor]:
    """PEFT's adapter gradients under peftc's (PEFT's checkpoint) key names."""
    return {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.requires_grad}


def dense_weights_saved(pm, model, x: dict) -> tuple[torch.Tensor, list[tuple]]:
    """Shapes of floating tensors autograd saves in a training forward that have an adapted layer's weight shape
    (out, in) and are not one of the model's own dense parameters (the LM head's weight is saved, legitimately);
    and the loss."""
    shapes = {(s.out_features, s.in_features) for s in pm.sites.values() if s.kind in ("linear4bit", "linear8bit")}
    assert len(shapes) == 4                                   # q / o, k / v, gate / up, down
    own = {p.data_ptr() for p in model.parameters() if p.is_floating_point()}
    found = []

    def pack(t):
        if t.is_floating_point() and tuple(t.shape) in shapes and t.data_ptr() not in own:
            found.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(**x).loss
    return loss, found


@pytest.mark.parametrize("quant, optimizer", [("nf4-dq-fp32", "adamw"), ("int8", "sgd"),
                                              pytest.param("fp4-bf16", "adamw", marks=pytest.mark.slow)])
def test_qlora_gradients_equal_peft_and_training_leaves_the_quantized_weights_alone(load, quant, optimizer):
    """One backward on the same batch: the loss and every LoRA gradient equal PEFT's, and no dense weight is saved
    for backward. Then a few optimizer steps: the loss falls, and the quantized tensors (shared with the user's
    model) stay bitwise unchanged, as does everything else of the user's model."""
    model = load("llama", quant)
    before = snapshot(model)
    pm = peftc.compile(model, METHODS["lora"][0]()).train()
    randomize_(pm)
    ref = peft_twin(load, "llama", quant, "lora", pm).train()
    x = lm_batch()
    loss, saved = dense_weights_saved(pm, model, x)
    assert not saved, f"dequantized weights saved for backward: {saved}"
    theirs = ref(**x).loss
    torch.testing.assert_close(loss, theirs, rtol=0, atol=tol(quant))
    loss.backward()
    theirs.backward()
    ref_grads, count = peft_grads(ref), 0
    for key, p in pm.store.peft_parameters("default"):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{key}: no gradient"
        err = ((p.grad - ref_grads[key]).abs().max() / ref_grads[key].abs().max()).item()
        # fp32: summation order; bf16 / fp16 compute: the fused backward adds the sites' bf16-rounded terms in its
        # own order (1.4e-4 seen on fp4-bf16)
        assert err <= tol(quant), f"{key}: gradient differs from PEFT's by {err:.3g} of its largest entry"
        count += 1
    assert count == 2 * len(pm.store["default"].targets) == 2 * 7

    params = pm.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.5)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = pm(**x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses                   # measured: 4.88 -> 4.30 (AdamW), 4.54 (SGD)
    assert_unchanged(model, before)


# --- torch.compile --------------------------------------------------------------------------------------------------
def compiled_step_matches_eager(pm, backend: str, atol: float) -> None:
    """torch.compile(pm, fullgraph=True) (a graph break raises): a training step's loss and adapter gradients, then
    an eval-mode forward, equal eager mode's."""
    x = lm_batch(batch=3, seq=10)
    pm.train()
    eager_loss = pm(**x).loss
    eager = torch.autograd.grad(eager_loss, pm.trainable_parameters())
    cpm = torch.compile(pm, fullgraph=True, backend=backend)
    loss = cpm(**x).loss
    grads = torch.autograd.grad(loss, pm.trainable_parameters())
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=atol)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)
    if backend == "inductor":                    # another graph (the mode is a guard): inductor only, under slow
        pm.eval()
        with torch.no_grad():
            torch.testing.assert_close(main_output(cpm(**x)), main_output(pm(**x)), rtol=0, atol=atol)


def test_torch_compile_fullgraph_training_step_equals_eager(load):
    """dynamo and AOT autograd (aot_eager: no code generation, seconds on a CPU) trace a QLoRA training step whole:
    peftc's quantized ops are opaque custom ops with fake kernels and their own backward."""
    pm = peftc.compile(load("llama", "nf4-dq-bf16"), peftc.LoRA(r=R, alpha=ALPHA, targets="all-linear", init=False))
    compiled_step_matches_eager(pm, "aot_eager", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4-dq-fp32", "int8"])
def test_torch_compile_inductor_equals_eager(load, quant):
    """Inductor (about a minute on a CPU): a training step and an eval forward equal eager mode's."""
    pm = peftc.compile(load("llama", quant), peftc.LoRA(r=R, alpha=ALPHA, targets="all-linear", init=False))
    compiled_step_matches_eager(pm, "inductor", 1e-4)


# --- refusals, and the user's model -----------------------------------------------------------------------------------
def repack_(layers, x: torch.Tensor) -> None:
    """What an eval-mode call without grad does to a Linear4bit on an AVX512-BF16 CPU: bitsandbytes repacks its
    weight in place for its CPU kernel (set here explicitly, so that it happens on any CPU)."""
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
        layer.eval()
        with torch.no_grad():
            layer(x)
        assert layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("repacked", ["model", "down_proj"])
def test_a_repacked_4bit_layer_is_refused_by_name_and_the_model_is_unchanged(load, repacked):
    """A model that already ran in eval mode (every layer repacked), or one repacked layer after six good ones
    (those are stood in first and must be put back): SpecError naming the first repacked layer and the way out;
    the model is left as it was (classes, tensors, modes)."""
    model = load("llama", "nf4-fp32")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if repacked == "down_proj":
        layers = [model.model.layers[0].mlp.down_proj]
    repack_(layers, torch.randn(2, 3, layers[0].in_features))
    model.train()                                     # as the user left it (mode flags are checked too)
    before = snapshot(model)
    first = "model.layers.0.self_attn.q_proj" if repacked == "model" else "model.layers.0.mlp.down_proj"
    with pytest.raises(SpecError, match=rf"4-bit layer {first} was repacked .*compile the model before running it"):
        peftc.compile(model, peftc.LoRA(targets="all-linear"))
    assert_unchanged(model, before)


def test_compile_and_running_the_peft_module_never_change_the_quantized_model(load):
    """compile reads the quantized model: after compiling and running the PeftModule in both modes (a backward
    included), the user's model has the same classes (bitsandbytes' layers), tensors (values and storage), quant
    states, modes and flags, and gives the same output; and once the user runs it in eval mode (bitsandbytes
    repacks its weights then), the PeftModule still gives its own outputs."""
    model = load("qwen2", "nf4-dq-bf16")
    x = parity_inputs("qwen2")[0]
    with torch.no_grad():
        own = main_output(model.train()(**x))   # train mode: bitsandbytes keeps its layout
    model.eval()
    before = snapshot(model)
    pm = peftc.compile(model, METHODS["dora"][0]())
    randomize_(pm)
    pm.train()
    pm(**x, labels=x["input_ids"]).loss.backward()
    pm.eval()
    with torch.no_grad():
        ours = main_output(pm(**x))
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(main_output(model.train()(**x)), own)
        assert_differs(ours, own)
        model.eval()(**x)                        # the user's eval-mode call: bitsandbytes repacks in place
        assert model.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu or \
            not model.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu
        assert torch.equal(main_output(pm(**x)), ours)
