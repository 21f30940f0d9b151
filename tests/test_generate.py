"""PeftModule.generate against PEFT's and transformers' generate: greedy tokens equal token for token on tiny Llama,
Qwen2, Mistral and GPT-2 (left-padded batches, merged, DoRA, IA3, a 4-bit base), per-row adapters, EOS handling,
the generation options peftc honours, the ones it refuses, and bad input (each failure followed by a good call).
Sampling, streaming, cache reuse and threads: tests/test_generate_sampling.py."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import PeftModel

import peftc
from peftc import GenerationError, InputError
from tests.generating import BASE, Counter, build_twin, new_tokens, one_thread  # noqa: F401 - the module-scoped fixture
from tests.models import DECODERS, inputs, make
from tests.parity import randomize_ours_

# PEFT warns about GPT-2's Conv1D, transformers about pad_token_id / generation flags; neither says anything about
# the tokens
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

X = inputs("llama", batch=3, seq=9)       # row 1 left-padded (3 pad tokens)
NEW = 12


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """twins(arch): the arch's Twin (tests.generating), built once per module; llama's holds every adapter."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = build_twin(arch, tmp_path_factory.mktemp(arch), extra=arch == "llama")
        return made[arch]
    return get


@pytest.fixture(scope="module")
def llama(twins):
    return twins("llama")


def assert_tokens(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shapes differ: peftc {tuple(ours.shape)}, reference {tuple(ref.shape)}"
    rows = [i for i in range(ours.shape[0]) if not torch.equal(ours[i], ref[i])]
    assert not rows, f"{what}: rows {rows} differ:\npeftc     {ours[rows].tolist()}\nreference {ref[rows].tolist()}"


def assert_moved(ours: torch.Tensor, base: torch.Tensor, what: str) -> None:
    """The adapter changed every row's tokens (an adapter that did nothing would pass any parity test)."""
    n = min(ours.shape[1], base.shape[1])
    same = [i for i in range(ours.shape[0]) if torch.equal(ours[i, :n], base[i, :n])]
    assert not same, f"{what}: rows {same} generate what the base model does: the adapter does not matter here"


# --- greedy parity, per architecture ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_equals_peft_left_padded_merged_and_alone(twins, arch):
    """Greedy tokens equal PeftModel.generate's on a left-padded batch, from the unmerged module (active adapter)
    and from pm.merge()'s module; a row alone (batch 1, no padding) equals PEFT's too."""
    tw = twins(arch)
    x = inputs(arch, batch=3, seq=9)
    ours = tw.pm.generate(**x, max_new_tokens=NEW)
    ref = tw.peft(x, max_new_tokens=NEW)
    assert_tokens(ours, ref, f"{arch} unmerged")
    assert_moved(ours, tw.base.generate(**x, max_new_tokens=NEW), arch)
    assert (x["attention_mask"] == 0).any(), "the batch has a left-padded row"

    merged = tw.pm.merge()
    assert_tokens(merged.generate(**x, max_new_tokens=NEW), ref, f"{arch} merged")

    alone = {k: v[1:2, 3:] for k, v in x.items()}             # row 1 without its padding
    assert (alone["attention_mask"] == 1).all()
    assert_tokens(tw.pm.generate(**alone, max_new_tokens=NEW), tw.peft(alone, max_new_tokens=NEW),
                  f"{arch} batch of one")


@pytest.mark.parametrize("adapter", ["dora", "ia3"])
def test_dora_and_ia3_equal_peft(llama, adapter):
    ours = llama.ours(X, adapter, max_new_tokens=NEW)
    assert_tokens(ours, llama.peft(X, adapter, max_new_tokens=NEW), adapter)
    assert_moved(ours, llama.base.generate(**X, max_new_tokens=NEW), adapter)
    merged = llama.pm.merge(adapter)
    assert_tokens(merged.generate(**X, max_new_tokens=NEW), llama.peft(X, adapter, max_new_tokens=NEW),
                  f"{adapter} merged")


def test_set_adapter_picks_the_adapter_generate_uses(llama):
    pm = llama.pm
    try:
        pm.set_adapter("c")
        assert_tokens(pm.generate(**X, max_new_tokens=NEW), llama.peft(X, "c", max_new_tokens=NEW), "set_adapter c")
        with pm.disable_adapters():
            assert_tokens(pm.generate(**X, max_new_tokens=NEW), llama.base.generate(**X, max_new_tokens=NEW),
                          "adapters disabled")
    finally:
        pm.set_adapter("default")


# --- per-row adapters -------------------------------------------------------------------------------------------------
MIXES = [["default", BASE, "b", "c"], ["c", "c", BASE, "b"], ["b", "default", "default", BASE]]


@pytest.mark.parametrize("names", MIXES, ids=["-".join(n.strip("_") for n in m) for m in MIXES])
def test_mixed_rows_equal_peft_adapter_names(llama, names):
    x = inputs("llama", batch=4, seq=8, seed=3)
    ours = llama.ours(x, names, max_new_tokens=NEW)
    assert_tokens(ours, llama.peft(x, names, max_new_tokens=NEW), f"adapter_names={names}")
    assert len({tuple(r) for r in new_tokens(ours, x).tolist()}) == 4, "rows should differ"


def test_ia3_rows_mix_with_lora_rows(llama):
    """PEFT cannot hold IA3 and LoRA in one model; each row of peftc's mixed batch equals that row of PEFT's
    generate with the row's adapter on the whole batch (rows are independent)."""
    names = ["ia3", "c", BASE]
    kw = dict(max_new_tokens=NEW, eos_token_id=None)      # no row stops early: every run has the same length
    ours = llama.ours(X, names, **kw)
    want = torch.stack([llama.peft(X, n, **kw)[i] for i, n in enumerate(names)])
    assert_tokens(ours, want, f"adapter_names={names}")


def test_bad_adapter_names_are_refused_and_leave_nothing_behind(llama):
    pm = llama.pm
    want = llama.peft(X, ["c", BASE, "b"], max_new_tokens=NEW)
    for bad, says in ((["c", "b"], "3 rows"), (["c", "b", "c", "b"], "3 rows"), (["c", "nope", "b"], "nope"),
                      ("c", "list")):
        with pytest.raises(InputError, match=says):
            pm.generate(**X, max_new_tokens=NEW, adapter_names=bad)
        assert_tokens(llama.ours(X, ["c", BASE, "b"], max_new_tokens=NEW), want, f"after {bad!r}")
    with pytest.raises(InputError, match="dora"):       # DoRA has no per-row form (nor in PEFT)
        pm.generate(**X, max_new_tokens=NEW, adapter_names=["dora", "c", "b"])
    with pytest.raises(InputError, match="adapter_names"):
        pm.merge().generate(**X, max_new_tokens=NEW, adapter_names=["c", "c", "c"])
    assert_tokens(llama.ours(X, ["c", BASE, "b"], max_new_tokens=NEW), want, "after the refusals")


# --- EOS --------------------------------------------------------------------------------------------------------------
def greedy_without_eos(tw, adapter="c"):
    return new_tokens(tw.ours(X, adapter, max_new_tokens=NEW, eos_token_id=None), X)


def assert_padded_after_eos(out: torch.Tensor, eos: list[int], pad: int) -> list[int]:
    """Every row that emitted an EOS holds only `pad` after it; returns the step each row ended at (NEW if not)."""
    ends = []
    for row in new_tokens(out, X).tolist():
        at = next((i for i, t in enumerate(row) if t in eos), None)
        if at is not None:
            assert all(t == pad for t in row[at + 1:]), f"row {row} is not padded with {pad} after EOS at {at}"
        ends.append(NEW if at is None else at)
    return ends


def test_one_eos_ends_its_row_and_pads_it(llama):
    free = greedy_without_eos(llama)
    eos = int(free[0, 4])                          # row 0 emits it at step 4 at the latest
    pad = next(t for t in range(100, 128) if t not in free.tolist()[0] + free.tolist()[1] + free.tolist()[2])
    for kw in (dict(eos_token_id=eos, pad_token_id=pad), dict(eos_token_id=eos)):   # pad defaults to the EOS
        ours = llama.ours(X, "c", max_new_tokens=NEW, **kw)
        assert_tokens(ours, llama.peft(X, "c", max_new_tokens=NEW, **kw), f"{kw}")
        ends = assert_padded_after_eos(ours, [eos], kw.get("pad_token_id", eos))
        assert ends[0] <= 4 and max(ends) > ends[0], f"row 0 ends early, another goes on: {ends}"


def test_several_eos_ids_stop_generation_when_every_row_ended(llama):
    free = greedy_without_eos(llama)
    eos = [int(free[0, 2]), int(free[1, 4]), int(free[2, 5])]    # every row ends by step 5
    ours = llama.ours(X, "c", max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    ref = llama.peft(X, "c", max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert_tokens(ours, ref, f"eos_token_id={eos}")
    ends = assert_padded_after_eos(ours, eos, 0)
    assert max(ends) <= 5 and ours.shape[1] == X["input_ids"].shape[1] + max(ends) + 1 < X["input_ids"].shape[1] + NEW


# --- options ----------------------------------------------------------------------------------------------------------
def test_min_new_tokens_and_min_length_hold_eos_back(llama):
    free = greedy_without_eos(llama)
    eos = int(free[0, 0])                          # row 0 would end at once
    P = X["input_ids"].shape[1]
    for kw in (dict(min_new_tokens=4), dict(min_length=P + 3)):
        ours = llama.ours(X, "c", max_new_tokens=NEW, eos_token_id=eos, **kw)
        assert_tokens(ours, llama.peft(X, "c", max_new_tokens=NEW, eos_token_id=eos, **kw), f"{kw}")
        held = 4 if "min_new_tokens" in kw else 3
        assert eos not in new_tokens(ours, X)[0, :held].tolist(), f"{kw}: EOS came before {held} new tokens"
    plain = llama.ours(X, "c", max_new_tokens=NEW, eos_token_id=eos)
    assert new_tokens(plain, X)[0, 1:].eq(eos).all(), "without a minimum, row 0 ends at its first token"


def test_max_length_and_repetition_penalty_equal_hf(llama):
    P = X["input_ids"].shape[1]
    ours = llama.ours(X, "c", max_length=P + 5)
    assert ours.shape == (3, P + 5)
    assert_tokens(ours, llama.peft(X, "c", max_length=P + 5), "max_length")
    for penalty in (1.5, 0.7):
        ours = llama.ours(X, "b", max_new_tokens=NEW, repetition_penalty=penalty)
        assert_tokens(ours, llama.peft(X, "b", max_new_tokens=NEW, repetition_penalty=penalty), f"penalty {penalty}")
        assert not torch.equal(ours, llama.ours(X, "b", max_new_tokens=NEW)), "the penalty changed nothing"


def test_generation_config_and_the_models_own_defaults(llama, monkeypatch):
    """As transformers: a generation_config's unset fields come from the model's generation_config (here its
    eos_token_id=2, which row 1 emits), with no length anywhere 20 new tokens; the model's own config is the
    default of every call."""
    free = greedy_without_eos(llama)
    assert 2 in free[1].tolist() and llama.base.generation_config.eos_token_id == 2
    for kw in (dict(), dict(generation_config=tf.GenerationConfig(max_new_tokens=7, repetition_penalty=1.3)),
               dict(generation_config=tf.GenerationConfig(max_new_tokens=9, eos_token_id=int(free[0, 1]),
                                                          pad_token_id=5))):
        ours = llama.ours(X, "c", **kw)
        assert_tokens(ours, llama.peft(X, "c", **kw), f"{kw}")
    assert llama.ours(X, "c").shape[1] == X["input_ids"].shape[1] + 20
    assert_padded_after_eos(llama.ours(X, "c"), [2], 2)

    # the model's generation_config (copied at compile time) is every call's default
    mine = tf.GenerationConfig(max_new_tokens=6, eos_token_id=[int(free[2, 1]), 2], pad_token_id=7,
                               repetition_penalty=1.2)
    monkeypatch.setattr(llama.pm, "generation_config", mine)
    monkeypatch.setattr(llama.ref.base_model.model, "generation_config", mine)
    ours = llama.ours(X, "c")
    assert_tokens(ours, llama.peft(X, "c"), "the model's generation_config")
    assert ours.shape[1] <= X["input_ids"].shape[1] + 6


@pytest.mark.parametrize("kw,name", [
    (dict(num_beams=2), "num_beams"), (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(output_scores=True), "output_scores"), (dict(foo=1), "foo"),
    (dict(generation_config=tf.GenerationConfig(num_beams=2)), "num_beams"),
    (dict(generation_config=tf.GenerationConfig(num_return_sequences=2, do_sample=True)), "num_return_sequences"),
    (dict(generation_config={"max_new_tokens": 3}), "GenerationConfig"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_or_bad_options_raise_generation_error_naming_them(llama, kw, name):
    want = llama.peft(X, "c", max_new_tokens=4)
    with pytest.raises(GenerationError, match=name):
        llama.ours(X, "c", **{"max_new_tokens": 4, **kw})
    assert_tokens(llama.ours(X, "c", max_new_tokens=4), want, f"after {kw}")


# --- bad input --------------------------------------------------------------------------------------------------------
def test_prompt_past_the_position_limit_is_refused(llama):
    limit = llama.base.config.max_position_embeddings
    P = X["input_ids"].shape[1]
    want = llama.peft(X, "c", max_new_tokens=limit - P)       # exactly fits
    for kw in (dict(max_new_tokens=limit - P + 1), dict(max_length=limit + 50)):
        with pytest.raises(GenerationError, match=f"limit of {limit}"):
            llama.ours(X, "c", **kw)
    assert_tokens(llama.ours(X, "c", max_new_tokens=limit - P), want, "a prompt that fits")
    long = inputs("llama", batch=2, seq=limit - 6, seed=4)       # the default 20 new tokens stop at the limit
    assert_tokens(llama.ours(long, "c"), llama.peft(long, "c"), "a long prompt, default length")


def test_bad_prompts_raise_input_error_and_the_next_call_works(llama):
    want = llama.peft(X, "c", max_new_tokens=5)
    ids, mask = X["input_ids"], X["attention_mask"]
    zero_row = mask.clone()
    zero_row[2] = 0
    for bad, says in ((dict(input_ids=ids[:, :0]), "empty"), (dict(input_ids=ids, attention_mask=mask[:, 1:]), "shape"),
                      (dict(input_ids=ids, attention_mask=zero_row), "no token"),
                      (dict(input_ids=ids.float()), "integer"), (dict(input_ids=ids[0]), "integer"),
                      (dict(), "input_ids")):
        with pytest.raises(InputError, match=says):
            llama.pm.generate(**bad, max_new_tokens=5)
        assert_tokens(llama.ours(X, "c", max_new_tokens=5), want, f"after {says}")


def test_a_model_that_is_no_causal_lm_cannot_generate():
    pm = peftc.compile(make("bert"), peftc.LoRA(r=4))
    assert not pm.can_generate()
    x = inputs("bert", batch=2, seq=6)
    for module in (pm, pm.merge()):
        with pytest.raises(GenerationError, match="not a causal language model"):
            module.generate(**x, max_new_tokens=3)
    out = pm(**x).logits                                  # the module still serves its forward
    assert out.shape == (2, 3)


# --- a 4-bit base -----------------------------------------------------------------------------------------------------
def test_4bit_llama_generates_as_peft_on_the_same_quantized_model(tmp_path):
    """On a bitsandbytes nf4 tiny Llama (tests/test_quantized.py's), unmerged and merged; generating leaves the
    user's quantized layers as they were (bitsandbytes never repacks them), so the forward still equals PEFT's."""
    from tests.test_quantized import bnb_config, keep_reference_kernels_, tiny

    tiny("llama").save_pretrained(tmp_path / "model")

    def load():
        return tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model", quantization_config=bnb_config("nf4-fp32"),
                                                       device_map="cpu")

    model = load()
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"], init="gaussian"))
    randomize_ours_(pm, seed=3)
    pm.save_adapter(tmp_path / "adapter")
    ref = keep_reference_kernels_(PeftModel.from_pretrained(load(), tmp_path / "adapter")).eval()
    ours = pm.generate(**X, max_new_tokens=NEW)
    want = ref.generate(**X, max_new_tokens=NEW)
    assert_tokens(ours, want, "nf4")
    assert_moved(ours, keep_reference_kernels_(load()).generate(**X, max_new_tokens=NEW), "nf4")
    assert_tokens(pm.merge().generate(**X, max_new_tokens=NEW), want, "nf4 merged")
    with torch.no_grad():
        diff = (pm(**X).logits - ref(**X).logits).abs().max().item()
    assert diff < 1e-4, f"after generate, the forward differs from PEFT's by {diff}"


# --- under torch.compile ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_module_generates_the_same_tokens_without_recompiling(llama):
    """CompiledPeftModule(pm).generate equals pm.generate; switching adapters, or the adapters of a mixed batch,
    recompiles nothing (about a minute: inductor compiles the single and mixed prefill and decode graphs)."""
    from tests.recompiles import no_recompiles

    cm = peftc.CompiledPeftModule(llama.pm)
    want = {n: llama.ours(X, n, max_new_tokens=6) for n in ("default", "b", "c")}
    mixes = (["c", BASE, "b"], ["b", "c", "default"])
    want_mixed = [llama.ours(X, m, max_new_tokens=6) for m in mixes]
    trace = Counter(torch.export.export)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.export, "export", trace)
        assert_tokens(cm.generate(**X, max_new_tokens=6, adapter_names=["default"] * 3), want["default"], "compiled")
        with no_recompiles():
            for n in ("b", "c", "default"):
                assert_tokens(cm.generate(**X, max_new_tokens=6, adapter_names=[n] * 3), want[n], f"compiled {n}")
        assert_tokens(cm.generate(**X, max_new_tokens=6, adapter_names=mixes[0]), want_mixed[0], "compiled mixed")
        with no_recompiles():
            assert_tokens(cm.generate(**X, max_new_tokens=6, adapter_names=mixes[1]), want_mixed[1], "mixed 2")
            assert_tokens(cm.generate(**X, max_new_tokens=6, adapter_names=mixes[0]), want_mixed[0], "mixed 1")
    assert trace.calls == 0, "generate under torch.compile traced the model again"
