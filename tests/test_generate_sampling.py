"""PeftModule.generate beyond greedy decoding: sampling draws what transformers draws under the same seed, streamers
see what transformers' streamers see, the decoder graphs are traced once per model, and threads generating at once
each get their own tokens."""
from __future__ import annotations

import threading

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

import peftc
from tests.generating import BASE, Counter, Recorder, build_twin, new_tokens, one_thread  # noqa: F401 - the module-scoped fixture
from tests.models import VOCAB, inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

X = inputs("llama", batch=3, seq=9)       # row 1 left-padded
NEW = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_twin("llama", tmp_path_factory.mktemp("llama"), extra=True)


def assert_tokens(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shapes differ: peftc {tuple(ours.shape)}, reference {tuple(ref.shape)}"
    assert torch.equal(ours, ref), f"{what}:\npeftc     {ours.tolist()}\nreference {ref.tolist()}"


# --- sampling ---------------------------------------------------------------------------------------------------------
SAMPLING = [dict(), dict(temperature=0.7), dict(top_k=10), dict(top_p=0.8), dict(temperature=1.3, top_k=20, top_p=0.9),
            dict(min_p=0.2), dict(typical_p=0.9), dict(top_k=0, repetition_penalty=1.3)]


@pytest.mark.parametrize("kw", SAMPLING, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_sampling_under_a_seed_draws_what_peft_draws(llama, kw):
    """do_sample=True with transformers' defaults (top_k=50) or the given warpers: under torch.manual_seed(s) the
    same tokens as PEFT's generate, per adapter and with per-row adapters."""
    for adapter, seed in (("c", 0), ("default", 1), (["c", BASE, "b"], 2)):
        torch.manual_seed(seed)
        ours = llama.ours(X, adapter, max_new_tokens=NEW, do_sample=True, **kw)
        torch.manual_seed(seed)
        ref = llama.peft(X, adapter, max_new_tokens=NEW, do_sample=True, **kw)
        assert_tokens(ours, ref, f"{adapter} {kw} seed {seed}")
    greedy = llama.ours(X, "c", max_new_tokens=NEW)
    torch.manual_seed(0)
    assert not torch.equal(llama.ours(X, "c", max_new_tokens=NEW, do_sample=True, **kw), greedy), "sampled = greedy"


def test_a_generator_makes_sampling_repeatable_and_leaves_the_global_rng_alone(llama):
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.9)
    state = torch.get_rng_state()
    a = llama.ours(X, "c", generator=torch.Generator().manual_seed(7), **kw)
    b = llama.ours(X, "c", generator=torch.Generator().manual_seed(7), **kw)
    c = llama.ours(X, "c", generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(torch.get_rng_state(), state), "sampling with a generator drew from the global RNG"
    assert torch.equal(a, b), "the same generator seed gave different tokens"
    assert not torch.equal(a, c), "different generator seeds gave the same tokens"
    torch.manual_seed(7)                  # a generator seeded s draws what the global RNG seeded s draws
    assert_tokens(a, llama.peft(X, "c", **kw), "generator vs PEFT under manual_seed")


def test_first_row_under_a_seed_relates_across_batch_sizes_as_in_transformers(llama):
    """transformers draws one multinomial over the batch per step: row 0's first token does not depend on the batch
    size, later ones do (the other rows' draws come in between). peftc gives the same tokens at both sizes, so the
    same relation."""
    x3 = inputs("llama", batch=3, seq=9, pad_row=False)
    x1 = {k: v[:1] for k, v in x3.items()}
    kw = dict(max_new_tokens=NEW, do_sample=True)
    got = {}
    for name, x in (("1", x1), ("3", x3)):
        torch.manual_seed(4)
        ours = llama.ours(x, "c", **kw)
        torch.manual_seed(4)
        ref = llama.peft(x, "c", **kw)
        assert_tokens(ours, ref, f"batch {name}")
        got[name] = new_tokens(ours, x)[0], new_tokens(ref, x)[0]
    (ours1, ref1), (ours3, ref3) = got["1"], got["3"]
    assert ours1[0] == ours3[0] and ref1[0] == ref3[0], "row 0's first token depends on the batch size"
    assert torch.equal(ours1, ours3) == torch.equal(ref1, ref3)


# --- streaming --------------------------------------------------------------------------------------------------------
def test_a_streamer_gets_the_prompt_then_one_token_per_step_then_end(llama):
    eos = int(new_tokens(llama.ours(X, "c", max_new_tokens=NEW, eos_token_id=None), X)[0, 3])
    for kw in (dict(max_new_tokens=NEW), dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)):
        ours, theirs = Recorder(), Recorder()
        out = llama.ours(X, "c", streamer=ours, **kw)
        ref = llama.peft(X, "c", streamer=theirs, **kw)
        assert_tokens(out, ref, f"{kw}")
        assert ours.ended == 1 and theirs.ended == 1
        assert torch.equal(ours.puts[0], X["input_ids"]), "the prompt comes first"
        steps = ours.puts[1:]
        assert len(steps) == out.shape[1] - X["input_ids"].shape[1] and all(s.shape == (3,) for s in steps)
        assert torch.equal(torch.cat([ours.puts[0], torch.stack(steps, 1)], 1), out)
        assert len(ours.puts) == len(theirs.puts) and all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))


def word_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("w0" .. "w127"), built here (nothing downloaded)."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def test_text_iterator_streamer_yields_the_generated_text(llama):
    tok = word_tokenizer()
    x = tok(["w5 w17 w99 w3 w64 w8"], return_tensors="pt")
    x = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}

    def stream(generate):
        streamer = tf.TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("out", generate(streamer)))
        t.start()
        text = "".join(streamer)
        t.join()
        return text, result["out"]

    text, out = stream(lambda s: llama.ours(x, "c", max_new_tokens=NEW, streamer=s))
    ref_text, ref = stream(lambda s: llama.peft(x, "c", max_new_tokens=NEW, streamer=s))
    assert_tokens(out, ref, "streamed")
    assert text == ref_text == tok.decode(new_tokens(out, x)[0])
    assert len(text.split()) == out.shape[1] - x["input_ids"].shape[1]


# --- tracing happens once ---------------------------------------------------------------------------------------------
def test_later_calls_and_new_adapters_trace_nothing(llama, monkeypatch):
    """The decoder graphs (traced in the fixture) serve any batch size, prompt length and new-token count; adding an
    adapter emits the generation forms again from them, without tracing."""
    import peftc.pipeline as pipeline

    # pipeline._decoder: once per emission of generation forms (Compiler.decoder_forms), a trace or not
    trace, export, emit = Counter(pipeline.trace_decoder), Counter(torch.export.export), Counter(pipeline._decoder)
    monkeypatch.setattr(pipeline, "trace_decoder", trace)
    monkeypatch.setattr(torch.export, "export", export)
    monkeypatch.setattr(pipeline, "_decoder", emit)
    before = llama.ours(X, "c", max_new_tokens=NEW)
    for batch, seq, new in ((1, 5, 3), (5, 17, 9), (2, 2, 30)):
        x = inputs("llama", batch=batch, seq=seq, seed=batch)
        out = llama.ours(x, "c", max_new_tokens=new)
        assert out.shape[0] == batch and out.shape[1] <= seq + new
        assert_tokens(out, llama.peft(x, "c", max_new_tokens=new), f"batch {batch}, prompt {seq}, {new} new")
    assert (trace.calls, export.calls, emit.calls) == (0, 0, 0)

    pm = llama.pm
    pm.add_adapter("late", peftc.LoRA(r=3, targets=["v_proj"], init=False))     # random A and B: it matters
    try:
        late = llama.ours(X, "late", max_new_tokens=NEW)
        assert not torch.equal(late, llama.ours(X, BASE, max_new_tokens=NEW)), "the new adapter changed nothing"
        assert_tokens(llama.ours(X, "c", max_new_tokens=NEW), before, "an old adapter after add_adapter")
        assert (trace.calls, export.calls, emit.calls) == (0, 0, 1)
    finally:
        pm.delete_adapter("late")
    assert_tokens(llama.ours(X, "c", max_new_tokens=NEW), before, "after delete_adapter")
    assert (trace.calls, export.calls) == (0, 0)


# --- threads ----------------------------------------------------------------------------------------------------------
def test_threads_generating_at_once_each_get_their_own_tokens(llama):
    """Four threads, each calling generate several times with its own adapters, per-row mixes, shapes and a seeded
    generator, get exactly what each call gives alone."""
    xs = [inputs("llama", batch=b, seq=s, seed=s) for b, s in ((3, 9), (3, 6), (2, 11))]
    plans = [[(0, ["c"] * 3, {}), (1, ["b", BASE, "c"], {}), (2, ["ia3", "default"], {})],
             [(1, ["default"] * 3, {}), (0, ["c", "b", "default"], dict(do_sample=True, gen=3)), (2, [BASE] * 2, {})],
             [(2, ["c", "b"], {}), (0, ["dora"] * 3, {}), (1, ["ia3", "ia3", BASE], dict(do_sample=True, gen=5))],
             [(0, [BASE, "c", "c"], dict(repetition_penalty=1.3)), (2, ["b"] * 2, {}), (1, ["c"] * 3, {})]]

    def run(i, names, kw):
        kw = dict(kw)
        gen = kw.pop("gen", None)
        if gen is not None:
            kw["generator"] = torch.Generator().manual_seed(gen)
        return llama.ours(xs[i], names, max_new_tokens=NEW, **kw)

    want = [[run(*call) for call in plan] for plan in plans]
    got: list[list] = [[None] * len(p) for p in plans]
    errors: list[BaseException] = []
    start = threading.Barrier(len(plans))

    def worker(k):
        try:
            start.wait()
            for _ in range(3):
                for j, call in enumerate(plans[k]):
                    out = run(*call)
                    if got[k][j] is None or not torch.equal(out, want[k][j]):
                        got[k][j] = out
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = [(k, j) for k in range(len(plans)) for j in range(len(plans[k])) if not torch.equal(got[k][j], want[k][j])]
    assert not wrong, f"calls {wrong} got another call's tokens"
