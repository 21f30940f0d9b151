"""`peftc generate`: the streamed text is what pm.generate (and PEFT's generate) gives, token for token; batches with an
adapter per row; sampling under a seed; one-line errors on bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf

import peftc
from peftc import cli
from peftc.cli import completion_text

from .test_cli import assert_one_line_error, run

CHARS = [chr(c) for c in range(32, 127)]   # printable ASCII: one token per character


def char_tokenizer():
    """An offline tokenizer: <unk>, <s>, </s> (ids 0, 1, 2: LlamaConfig's bos and eos), then one token per printable
    ASCII character; decoding joins the characters (no merges, no added spaces)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                              max_position_embeddings=128)).eval()


def save_adapter(base: Path, path: Path, seed: int, targets) -> None:
    """A LoRA adapter for the model in `base`, written by PEFT (peftc reads PEFT's format), with random non-zero B."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)     # large enough that each adapter changes what is generated
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Path:
    """base (tiny Llama + tokenizer), adapter, adapter-b (another one), no-tokenizer (the base without its tokenizer),
    bert (a classifier, with the tokenizer), cls-adapter (made for SEQ_CLS)."""
    root = tmp_path_factory.mktemp("gen")
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    save_adapter(root / "base", root / "adapter", 1, "all-linear")
    save_adapter(root / "base", root / "adapter-b", 2, ["q_proj", "v_proj", "down_proj"])
    model.save_pretrained(root / "no-tokenizer")
    tf.BertForSequenceClassification(tf.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=128, vocab_size=len(tok))).save_pretrained(
        root / "bert")
    tok.save_pretrained(root / "bert")
    shutil.copytree(root / "adapter", root / "cls-adapter")
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    (root / "cls-adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "SEQ_CLS"}))
    return root


def encode(root: Path, *prompts: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of `prompts` (the tokenizer's own padding, with its EOS as the pad token)."""
    tok = tf.AutoTokenizer.from_pretrained(root / "base", padding_side="left")
    tok.pad_token = tok.eos_token
    enc = tok(list(prompts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def decoded(root: Path, new: torch.Tensor) -> str:
    return completion_text(tf.AutoTokenizer.from_pretrained(root / "base"), new, 2)


def base_model(root: Path):
    return tf.AutoModelForCausalLM.from_pretrained(root / "base")


@pytest.fixture(scope="module")
def pm(dirs):
    """The reference: the base with both adapters ("default" and "b"), loaded in process (its generation graphs
    traced once for every test)."""
    pm = peftc.load_adapter(base_model(dirs), dirs / "adapter")
    pm.load_adapter(dirs / "adapter-b", "b")
    return pm


@pytest.fixture(scope="module")
def peft_model(dirs):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(dirs), dirs / "adapter").eval()


@pytest.fixture
def puts(monkeypatch) -> list[torch.Tensor]:
    """What the command's streamer receives, call by call."""
    seen: list[torch.Tensor] = []
    make = cli._streamer_class

    def recording():
        cls = make()

        class Recording(cls):
            def put(self, value):
                seen.append(value.clone())
                super().put(value)
        return Recording
    monkeypatch.setattr(cli, "_streamer_class", recording)
    return seen


@pytest.mark.slow
def test_streams_what_pm_generate_and_peft_give(dirs, pm, peft_model, puts):
    """Greedy: the streamed text is the decoded tokens of pm.generate, which are PEFT's generate's token for token;
    the streamer gets the prompt, then one token per step."""
    prompt, n = "Hello there", 40
    r = run("generate", "--base", dirs / "base", "--adapter", dirs / "adapter", "--prompt", prompt,
            "--max-new-tokens", n)
    assert r.exit_code == 0, r.output
    ids, mask = encode(dirs, prompt)
    ours = pm.generate(ids, mask, max_new_tokens=n, adapter_names=["default"])
    theirs = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    assert torch.equal(ours, theirs)
    text = decoded(dirs, ours[0, ids.shape[1]:])
    assert len(text) >= 10 and r.stdout == text + "\n"
    assert r.stderr == ""
    assert torch.equal(puts[0], ids.cpu()) and all(p.shape == (1,) for p in puts[1:])
    assert torch.equal(torch.cat([puts[0][0], *puts[1:]]), ours[0])
    with torch.no_grad():   # the adapter matters: the base model continues otherwise
        assert not torch.equal(base_model(dirs).generate(ids, attention_mask=mask, max_new_tokens=n,
                                                         do_sample=False), ours)


@pytest.mark.slow
def test_base_model_alone_is_transformers_generate(dirs):
    """Without --adapter: the base model's own generation, token for token what transformers' generate gives (the
    tokenizer from --tokenizer, for a base directory without one)."""
    prompt = "The wind"
    r = run("generate", "--base", dirs / "no-tokenizer", "--tokenizer", dirs / "base", "--prompt", prompt,
            "--max-new-tokens", 25)
    assert r.exit_code == 0, r.output
    ids, mask = encode(dirs, prompt)
    with torch.no_grad():
        ref = base_model(dirs).generate(ids, attention_mask=mask, max_new_tokens=25, do_sample=False)
    assert r.stdout == decoded(dirs, ref[0, ids.shape[1]:]) + "\n"


@pytest.mark.slow
def test_sampling_under_a_seed(dirs, pm, peft_model):
    """--seed S draws what pm.generate draws with a generator seeded S, which is what PEFT's generate draws after
    torch.manual_seed(S); another seed draws another text."""
    prompt, n = "Once", 30
    r = run("generate", "--base", dirs / "base", "--adapter", dirs / "adapter", "--prompt", prompt, "--do-sample",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--max-new-tokens", n, "--seed", 3)
    assert r.exit_code == 0, r.output
    ids, mask = encode(dirs, prompt)
    kw = dict(max_new_tokens=n, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, adapter_names=["default"])
    ours = pm.generate(ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert r.stdout == decoded(dirs, ours[0, ids.shape[1]:]) + "\n"
    del kw["adapter_names"]
    torch.manual_seed(3)
    assert torch.equal(peft_model.generate(input_ids=ids, attention_mask=mask, **kw), ours)
    other = pm.generate(ids, mask, generator=torch.Generator().manual_seed(4), adapter_names=["default"], **kw)
    assert not torch.equal(other, ours)


@pytest.mark.slow
def test_batch_with_an_adapter_per_row(dirs, pm):
    """Several --prompt: one left-padded batch, each row on its own adapter (or the base), one JSON line per prompt,
    equal to pm.generate's rows."""
    prompts = ["Hello there", "Hi", "A longer prompt, padded least"]
    r = run("generate", "--base", dirs / "base", "--adapter", dirs / "adapter", "--adapter", f"b={dirs / 'adapter-b'}",
            *[x for p, a in zip(prompts, ["default", "b", "__base__"]) for x in ("--prompt", p, "--adapter-name", a)],
            "--max-new-tokens", 12)
    assert r.exit_code == 0, r.output
    ids, mask = encode(dirs, *prompts)
    out = pm.generate(ids, mask, max_new_tokens=12, adapter_names=["default", "b", "__base__"])
    want = [decoded(dirs, row) for row in out[:, ids.shape[1]:]]
    assert [json.loads(line) for line in r.stdout.splitlines()] == want
    assert len(set(want)) == 3


def test_adapter_options():
    """--adapter [NAME=]DIR names, and --adapter-name once (every prompt) or once per prompt."""
    assert cli._parse_adapters(("x/ad", "fr=y/french", "z/de-1/")) == [
        ("default", Path("x/ad")), ("fr", Path("y/french")), ("de-1", Path("z/de-1"))]
    assert cli._row_adapters((), ["default", "fr"], 2) == ["default", "default"]
    assert cli._row_adapters(("fr",), ["default", "fr"], 3) == ["fr"] * 3
    assert cli._row_adapters(("fr", "__base__"), ["default", "fr"], 2) == ["fr", "__base__"]
    assert cli._row_adapters((), [], 2) == ["__base__"] * 2


def test_completion_text_cuts_at_the_first_eos():
    tok = char_tokenizer()
    ids = torch.tensor([tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("i"), 2, 2, 2])
    assert completion_text(tok, ids, 2) == "hi" and completion_text(tok, ids, [7, 2]) == "hi"
    assert completion_text(tok, ids[:2], None) == "hi"


def test_bad_input(dirs):
    b, a = dirs / "base", dirs / "adapter"
    assert_one_line_error(run("generate", "--base", dirs / "nope", "--prompt", "x"), "--base", "nope",
                          "does not exist")
    assert_one_line_error(run("generate", "--base", b, "--adapter", dirs / "nope", "--prompt", "x"), "--adapter",
                          "nope", "does not exist")
    assert_one_line_error(run("generate", "--base", dirs / "no-tokenizer", "--prompt", "x"), "no-tokenizer",
                          "has no tokenizer", "tokenizer.json", "--tokenizer DIR")
    assert_one_line_error(run("generate", "--base", dirs / "bert", "--prompt", "x"), "--base", "cannot generate",
                          "BertForSequenceClassification is not a causal language model")
    assert_one_line_error(run("generate", "--base", b, "--adapter", dirs / "cls-adapter", "--prompt", "x"),
                          "cls-adapter", "SEQ_CLS", "CAUSAL_LM")
    assert_one_line_error(run("generate", "--base", b, "--adapter", a, "--prompt", "x" * 100,
                              "--max-new-tokens", 40), "100 tokens", "140 positions", "limit of 128",
                          "--max-new-tokens 28 or less")
    assert_one_line_error(run("generate", "--base", b, "--adapter", a, "--prompt", "x", "--prompt", "y",
                              "--adapter-name", "default", "--adapter-name", "default", "--adapter-name", "default"),
                          "--adapter-name is given 3 times for 2 --prompt")
    assert_one_line_error(run("generate", "--base", b, "--adapter", a, "--prompt", "x", "--adapter-name", "fr"),
                          "'fr' is no loaded adapter", "['default']", "__base__")
    assert_one_line_error(run("generate", "--base", b, "--prompt", "x", "--adapter-name", "default"),
                          "'default' is no loaded adapter", "[]")
    assert_one_line_error(run("generate", "--base", b, "--adapter", f"x={a}", "--adapter", f"x={a}", "--prompt", "x"),
                          "'x' is given already")
    assert_one_line_error(run("generate", "--base", b, "--prompt", "x", "--temperature", "0.5", "--seed", "1"),
                          "--temperature, --seed only apply when sampling", "--do-sample")
    assert_one_line_error(run("generate", "--base", b, "--prompt", ""), "--prompt ''", "no tokens")
