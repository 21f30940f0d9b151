"""LoftQ on a base already quantized to 4 bits (peftc.replace_lora_weights_loftq) against PEFT 0.21.2's
peft.utils.loftq_utils.replace_lora_weights_loftq: a tiny Llama saved as safetensors, loaded nf4 (with and without
double quantization), LoRA compiled on it; A and B bit for bit, outputs, callbacks, every form, and bad input.

PEFT's function computes on "cuda"; tests/peft_cpu.py runs it on the CPU."""
from __future__ import annotations

import pickle
import re
import shutil
import warnings

import pytest
import torch
import torch._dynamo as dynamo
from safetensors.torch import load_file, save_file

import peftc
from peftc.errors import CheckpointError, InputError, SpecError
from tests.parity import assert_same_weights
from tests.peft_cpu import cuda_as_cpu
from tests.recompiles import no_recompiles

pytest.importorskip("bitsandbytes")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils.loftq_utils import replace_lora_weights_loftq as peft_replace  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

R = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=100, vocab_size=128)     # 100: rows that are not whole 64-blocks
    d = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def full_logits(base_dir):
    return logits(LlamaForCausalLM.from_pretrained(base_dir).eval())


def load(base_dir, kind: str = "nf4"):
    model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                             device_map="cpu")
    for m in model.modules():     # bitsandbytes' CPU bf16 eval path: off, so PEFT computes in the compute dtype
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def ours(base_dir, kind: str = "nf4", alpha: float = R, **kw):
    return peftc.compile(load(base_dir, kind), peftc.LoRA(r=R, alpha=alpha, targets=TARGETS, **kw)).eval()


def peft_model(base_dir, kind: str = "nf4", alpha: float = R):
    return get_peft_model(load(base_dir, kind), LoraConfig(r=R, lora_alpha=alpha, target_modules=TARGETS)).eval()


def logits(m, **kw):
    with torch.no_grad():
        return m(input_ids=IDS, **kw).logits


def lora_layers(ref):
    """PEFT's LoRA layers by the user model's module path."""
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in ref.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@torch.no_grad()
def copy_peft_init_(pm, ref) -> None:
    """Our adapter starts from PEFT's A, B (so layers a callback rejects compare too)."""
    for path, m in lora_layers(ref).items():
        w = pm.store["default"].sites[path.replace(".", "-")]
        w.A_r.copy_(m.lora_A["default"].weight)
        w.B_r.copy_(m.lora_B["default"].weight)


def snapshot(pm, name: str = "default") -> dict:
    return {k: v.clone() for k, v in pm.store.peft_state_dict(name).items()}


def assert_unchanged(pm, before: dict, name: str = "default") -> None:
    after = pm.store.peft_state_dict(name)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the adapter changed"


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", pytest.param("fp4", marks=pytest.mark.slow)])
def test_equals_peft(base_dir, kind):
    pm = ours(base_dir, kind)
    before = logits(pm)
    kept = peftc.replace_lora_weights_loftq(pm, model_path=base_dir)
    assert kept == pm.store["default"].targets and len(kept) == 2 * len(TARGETS)
    ref = peft_model(base_dir, kind)
    with cuda_as_cpu():
        peft_replace(ref, model_path=str(base_dir))
    assert_same_weights(pm, ref)                             # A, B bit for bit
    got, want = logits(pm), logits(ref, use_cache=False)
    assert (got - want).abs().max() < 1e-5
    assert (got - before).abs().max() > 1e-2                # LoftQ moved the outputs


def test_method_and_default_path(base_dir):
    """pm.replace_lora_weights_loftq() reads the model's own name_or_path (a local directory here; PEFT looks only in
    the Hugging Face cache and asks for model_path), the model.safetensors file itself gives the same."""
    a, b = ours(base_dir), ours(base_dir)
    assert a.replace_lora_weights_loftq() == b.replace_lora_weights_loftq(base_dir / "model.safetensors")
    for k, v in a.store.peft_state_dict("default").items():
        assert torch.equal(v, b.store.peft_state_dict("default")[k])


def test_closer_to_full_precision(base_dir, full_logits):
    """The quantized model with a LoftQ adapter is closer to the full-precision model than with plain LoRA's init
    (B = 0: the quantized model itself), per layer and at the output."""
    pm = ours(base_dir)
    plain = (logits(pm) - full_logits).abs()
    pm.replace_lora_weights_loftq(base_dir)
    loftq = (logits(pm) - full_logits).abs()
    assert loftq.mean() < 0.9 * plain.mean() and loftq.max() < 0.75 * plain.max()   # r = 4 of 64: 0.85x, 0.62x
    full = load_file(base_dir / "model.safetensors")
    from peftc.passes.match import dense_weight
    for path in pm.store["default"].targets:
        w = pm.store["default"].sites[path.replace(".", "-")]
        q = dense_weight(pm.base_graph_module, pm.sites[path], torch.float32)
        W = full[f"{path}.weight"]
        assert (W - q - (w.B @ w.A).detach()).norm() < 0.95 * (W - q).norm()   # 0.82x to 0.91x here


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq"])
def test_callback_by_name_equals_peft(base_dir, kind):
    """A callback that keeps some layers: ours gets (the model passed in, module path), PEFT's (its PeftModel, the
    same path); the same layers keep LoftQ's A, B, the others their own."""
    def accept(calls):
        def cb(model, path):
            calls.append(path)
            return "q_proj" in path or "layers.1.mlp" in path
        return cb

    ref = peft_model(base_dir, kind)
    pm = ours(base_dir, kind)
    copy_peft_init_(pm, ref)
    start = snapshot(pm)
    ours_calls, peft_calls = [], []
    kept = pm.replace_lora_weights_loftq(base_dir, callback=accept(ours_calls))
    with cuda_as_cpu():
        peft_replace(ref, model_path=str(base_dir), callback=accept(peft_calls))
    assert ours_calls == peft_calls == pm.store["default"].targets
    assert kept == [p for p in ours_calls if "q_proj" in p or "layers.1.mlp" in p]
    assert_same_weights(pm, ref)
    now = pm.store.peft_state_dict("default")
    rejected = [k for k in now if not any(f"{p}." in k for p in kept)]
    assert rejected and all(torch.equal(now[k], start[k]) for k in rejected)
    assert (logits(pm) - logits(ref, use_cache=False)).abs().max() < 1e-5


def test_callback_sees_new_weights_equals_peft(base_dir, full_logits):
    """PEFT's documented use: keep a layer only if the model's logits got closer to the full-precision model's.
    The callback calls the model, which runs the new weights; greedy decisions equal PEFT's."""
    def greedy(best):
        def cb(model, path):
            err = (logits(model) - full_logits).abs().mean().item()
            if err < best[0]:
                best[0] = err
                return True
            return False
        return cb

    ref = peft_model(base_dir)
    pm = ours(base_dir)
    copy_peft_init_(pm, ref)
    b_ours = [(logits(pm) - full_logits).abs().mean().item()]
    b_peft = [(logits(ref) - full_logits).abs().mean().item()]
    kept = pm.replace_lora_weights_loftq(base_dir, callback=greedy(b_ours))
    with cuda_as_cpu():
        peft_replace(ref, model_path=str(base_dir), callback=greedy(b_peft))
    assert 0 < len(kept) and abs(b_ours[0] - b_peft[0]) < 1e-6
    assert_same_weights(pm, ref)


@pytest.mark.slow       # long: runs in CI's slow pass
def test_every_form_sees_new_weights(base_dir):
    """Written in place: the mixed (per-row) form, and a capacity's lanes, run the new A, B without a rebuild."""
    pm = ours(base_dir)
    pm.add_adapter("other", peftc.LoRA(r=2, alpha=2, targets=["q_proj"], init=False))
    pm.reserve(adapters=3, rank=R)
    graph = pm.graph_module.graph
    pm.replace_lora_weights_loftq(base_dir)
    assert pm.graph_module.graph is graph
    single = {a: logits(pm, adapter_names=[a, a]) for a in ("default", "other")}
    mixed = logits(pm, adapter_names=["default", "other"])
    assert (mixed[0] - single["default"][0]).abs().max() < 1e-5
    assert (mixed[1] - single["other"][1]).abs().max() < 1e-5
    ref = ours(base_dir)
    ref.replace_lora_weights_loftq(base_dir)
    assert (single["default"] - logits(ref)).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_sees_new_weights_without_recompile(base_dir):
    dynamo.reset()
    pm = ours(base_dir)
    cpm = peftc.CompiledPeftModule(pm)
    before = logits(cpm)
    with no_recompiles():
        kept = cpm.replace_lora_weights_loftq(base_dir)
        after = logits(cpm)
    assert kept and (after - before).abs().max() > 1e-2
    assert (after - logits(pm)).abs().max() < 1e-5
    dynamo.reset()


@pytest.mark.slow       # long: runs in CI's slow pass
def test_file_layouts(base_dir, tmp_path):
    """Sharded checkpoints (model.safetensors.index.json) and files saved from the bare base model (keys without
    the base_model_prefix "model."), as PEFT reads them, give the same A, B."""
    want = ours(base_dir)
    want.replace_lora_weights_loftq(base_dir)
    LlamaForCausalLM.from_pretrained(base_dir).save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    full = load_file(base_dir / "model.safetensors")
    save_file({k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}, bare / "model.safetensors")
    pm = ours(base_dir)
    for where in (tmp_path / "sharded", bare):       # each call writes every layer again
        pm.replace_lora_weights_loftq(where)
        for k, v in want.store.peft_state_dict("default").items():
            assert torch.equal(v, pm.store.peft_state_dict("default")[k]), (where, k)


def test_tied_and_prefixed_keys():
    """Where a layer's weight may sit in the file: its own key, without or with the model's base_model_prefix, and
    the same for the weight it is tied to (transformers' all_tied_weights_keys: target -> source)."""
    from peftc.loftq import _candidates

    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    assert _candidates("lm_head.weight", "model", tied) == ["lm_head.weight", "model.lm_head.weight",
                                                             "model.embed_tokens.weight", "embed_tokens.weight"]
    assert _candidates("model.layers.0.mlp.up_proj.weight", "model", tied) == [
        "model.layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"]
    assert _candidates("fc.weight", "", {}) == ["fc.weight"]


# --- bad input: a peftc error naming the culprit and the fix, the adapter unchanged -----------------------------------
@pytest.fixture(scope="module")
def qpm(base_dir):
    return ours(base_dir)


def _altered(base_dir, tmp_path, change) -> str:
    full = load_file(base_dir / "model.safetensors")
    change(full)
    save_file(full, tmp_path / "model.safetensors")
    return str(tmp_path)


class Boom:
    """Unpickling this touches a file: a pickle that is loaded leaves a trace."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_dir(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(tmp_path / "LOADED")))
    return tmp_path


BAD_PATHS = {
    "missing": (lambda b, t: t / "nope", "does not exist"),
    "no-safetensors": (lambda b, t: t, "has no model.safetensors"),
    "not-safetensors": (lambda b, t: (t / "w.txt").write_text("x") and t / "w.txt", "not a safetensors file"),
    "corrupt": (lambda b, t: (t / "model.safetensors").write_bytes(b"\x00" * 40) and t, "not a readable safetensors"),
    "pickle-dir": (lambda b, t: _pickle_dir(t), "never loads pickles"),
    "pickle-file": (lambda b, t: _pickle_dir(t) / "pytorch_model.bin", "never loads pickles"),
    "weight-missing": (lambda b, t: _altered(b, t, lambda f: f.pop("model.layers.1.self_attn.v_proj.weight")),
                       "no weight for 4-bit layer model.layers.1.self_attn.v_proj"),
    "shape": (lambda b, t: _altered(b, t, lambda f: f.update({"model.layers.0.mlp.up_proj.weight":
                                                               torch.zeros(100, 32)})),
              "4-bit layer model.layers.0.mlp.up_proj is [100, 64]"),
    "quantized-file": (lambda b, t: _altered(b, t, lambda f: f.update(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2048, 1, dtype=torch.uint8)})), "not floating point"),
    "non-finite": (lambda b, t: _altered(b, t, lambda f: f["model.layers.1.mlp.down_proj.weight"].__setitem__(
        (0, 0), float("nan"))), "non-finite"),
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_bad_model_path(qpm, base_dir, tmp_path, case):
    make, words = BAD_PATHS[case]
    path = make(base_dir, tmp_path)
    before = snapshot(qpm)
    with pytest.raises(CheckpointError, match=re.escape(words)) as e:
        qpm.replace_lora_weights_loftq(path)
    assert "model_path" in str(e.value) or "pickle" in str(e.value)   # the fix
    assert_unchanged(qpm, before)
    assert not (tmp_path / "LOADED").exists()


def test_default_path_not_found(base_dir, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(base_dir, copy)
    pm = peftc.compile(LlamaForCausalLM.from_pretrained(copy, quantization_config=BitsAndBytesConfig(**KINDS["nf4"]),
                                                        device_map="cpu"), peftc.LoRA(r=R, alpha=R, targets=TARGETS))
    shutil.rmtree(copy)
    before = snapshot(pm)
    with pytest.raises(CheckpointError, match="neither a local directory nor a model in the local Hugging Face cache"):
        pm.replace_lora_weights_loftq()
    assert_unchanged(pm, before)


def test_bad_adapter_and_callback(qpm, base_dir):
    before = snapshot(qpm)
    with pytest.raises(InputError, match=r"unknown adapter 'nope'; adapters: \['default'\]"):
        qpm.replace_lora_weights_loftq(base_dir, adapter_name="nope")
    with pytest.raises(InputError, match="callback must be a function"):
        qpm.replace_lora_weights_loftq(base_dir, callback=True)
    with pytest.raises(InputError, match="takes a PeftModule"):
        peftc.replace_lora_weights_loftq(qpm.base_model, base_dir)
    calls = []

    def fails_late(model, path):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("callback failed")
        return True

    with pytest.raises(RuntimeError, match="callback failed"):     # the layers written before it go back too
        qpm.replace_lora_weights_loftq(base_dir, callback=fails_late)
    assert len(calls) == 5
    assert_unchanged(qpm, before)


@pytest.mark.parametrize("kind", ["full", "int8"])
def test_base_not_4bit(base_dir, kind):
    model = LlamaForCausalLM.from_pretrained(base_dir) if kind == "full" else load(base_dir, "int8")
    pm = peftc.compile(model, peftc.LoRA(r=R, alpha=R, targets=TARGETS))
    before = snapshot(pm)
    found = "linear: 14" if kind == "full" else "linear8bit: 14"
    with pytest.raises(SpecError, match=f"needs LoRA on bitsandbytes 4-bit layers .* adapts none \\({found}\\); "
                                        "load the model with .*load_in_4bit=True"):
        pm.replace_lora_weights_loftq(base_dir)
    assert_unchanged(pm, before)


def test_dora_and_ia3_refused(base_dir):
    pm = ours(base_dir, use_dora=True)
    pm.add_adapter("ia3", peftc.IA3())
    before = snapshot(pm)
    with pytest.raises(SpecError, match="adapter 'default' uses DoRA .* use a LoRA adapter without DoRA"):
        pm.replace_lora_weights_loftq(base_dir)
    assert_unchanged(pm, before)
    with pytest.raises(SpecError, match="adapter 'ia3' is a IA3 adapter"):
        pm.replace_lora_weights_loftq(base_dir, adapter_name="ia3")


def test_scale_warning_and_mixed_kinds(base_dir, caplog):
    """alpha != r: as in PEFT, B A is W - Q's top part without the scale (warned); a full-precision layer in the
    same adapter (lm_head, left unquantized by transformers) keeps its A, B (logged), as PEFT leaves it."""
    pm = peftc.compile(load(base_dir), peftc.LoRA(r=R, alpha=2 * R, targets=["q_proj", "lm_head"]))
    head = pm.store["default"].sites["lm_head"]
    a, b = head.A.clone(), head.B.clone()
    with caplog.at_level("WARNING", logger="peftc.loftq"):
        kept = pm.replace_lora_weights_loftq(base_dir)
    assert kept == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert torch.equal(head.A, a) and torch.equal(head.B, b)
    text = caplog.text
    assert "scale(s) [2.0]" in text and "not 4-bit (lm_head)" in text
    ref = get_peft_model(load(base_dir), LoraConfig(r=R, lora_alpha=2 * R, target_modules=["q_proj"])).eval()
    with cuda_as_cpu():
        peft_replace(ref, model_path=str(base_dir))
    for path, m in lora_layers(ref).items():
        w = pm.store["default"].sites[path.replace(".", "-")]
        assert torch.equal(w.A, m.lora_A["default"].weight) and torch.equal(w.B, m.lora_B["default"].weight)
