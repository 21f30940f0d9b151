"""TRL's trainers on a PeftModule (peftc.trl): SFTTrainer with a chat template whose new special tokens train as
embedding rows, SFTTrainer packing (wrapped and padding-free), DPOTrainer with the base or a frozen adapter copy as
the reference; each against the same TRL run on a PEFT model of the same base (per-step losses, rewards, final
adapter tensors), plus TRL's fused LM head field by field, the surface TRL reads, and bad input."""
from __future__ import annotations

import copy
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from trl.trainer.utils import add_fused_lm_head

import peftc
import peftc.trl
from peftc.errors import InputError

EX = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / "trl_sft_dpo.py"))
NEW = [EX["VOCAB"], EX["VOCAB"] + 1]       # the chat template's <|im_start|>, <|im_end|>
TOL_LOSS = 1e-4                            # relative, per step, fp32
TOL_ADAPTER = 1e-4                         # absolute, final adapter tensors (Adam at lr 1e-2 amplifies ulps)


@pytest.fixture(scope="module")
def chat_tok():
    return EX["chat_tokenizer"]()


@pytest.fixture(scope="module")
def base_tok():
    return EX["base_tokenizer"]()


def config(cls, tmp_path, **kw):
    kw = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "bf16": False, **kw}
    return cls(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True,
               dataloader_num_workers=0, save_strategy="no", logging_steps=1, seed=0, **kw)


def logged(trainer, keys=("loss",)) -> list[dict]:
    return [{k: h[k] for k in keys} for h in trainer.state.log_history if "loss" in h]


def saved(model, directory) -> dict[str, torch.Tensor]:
    model.save_pretrained(directory)
    return load_file(Path(directory) / "adapter_model.safetensors")


def twins(base, lora: LoraConfig, tmp_path):
    """(PEFT model, PeftModule) of `base` with the same adapter: PEFT's fresh one, loaded into peftc."""
    ref = get_peft_model(copy.deepcopy(base), lora)
    ref.save_pretrained(tmp_path / "init")
    return ref, peftc.load_adapter(base, tmp_path / "init", is_trainable=True)


def assert_same_run(ref_trainer, ours_trainer, ref_model, pm, tmp_path, keys=("loss",), tol=TOL_ADAPTER):
    theirs, mine = logged(ref_trainer, keys), logged(ours_trainer, keys)
    assert len(theirs) == len(mine) == ref_trainer.args.max_steps
    for a, b in zip(theirs, mine):
        assert abs(a["loss"] - b["loss"]) <= TOL_LOSS * abs(a["loss"]), (theirs, mine)
    A, B = saved(ref_model, tmp_path / "peft"), saved(pm, tmp_path / "ours")
    assert sorted(A) == sorted(B)
    for k in A:
        torch.testing.assert_close(B[k], A[k], atol=tol, rtol=0, msg=k)
    return theirs, mine


# --- SFT ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_chat_template_new_tokens_match_peft(chat_tok, tmp_path):
    """The template's new special tokens train as embedding rows (trainable_token_indices): per-step losses and the
    final adapter (LoRA and the token rows) equal PEFT's; only those rows moved; the base is bitwise unchanged."""
    base = EX["chat_model"](chat_tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], trainable_token_indices=NEW)
    ref, pm = twins(base, lora, tmp_path)
    data = EX["dataset"]("chat.jsonl")
    runs = [trl.SFTTrainer(model=m, args=config(trl.SFTConfig, tmp_path), train_dataset=data,
                           processing_class=chat_tok) for m in (ref, pm)]
    for t in runs:
        t.train()
    assert_same_run(*runs, ref, pm, tmp_path)

    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())       # base bitwise unchanged
    with torch.no_grad():
        seen = pm.store["default"].tokens
        (rows,) = seen.values()
        weight = base.model.embed_tokens.weight
        assert rows.index.tolist() == NEW
        assert (rows.delta - weight[NEW]).abs().min() > 0                             # every new row moved
        effective = rows.value(weight)                                                # what the graph embeds
        others = [i for i in range(len(chat_tok)) if i not in NEW]
        assert torch.equal(effective[others], weight[others])
        assert torch.equal(effective[NEW], rows.delta)


@pytest.mark.parametrize("strategy", [pytest.param("wrapped", marks=pytest.mark.slow), pytest.param("bfd", marks=pytest.mark.slow)])
def test_sft_packing_matches_peft(strategy, base_tok, tmp_path):
    """packing=True on the shipped corpus: "wrapped" (padded rows, the default graph) and "bfd" (TRL's default:
    padding-free rows with position_ids, a graph traced with packed_example_inputs)."""
    base = EX["base_model"]()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    ref = get_peft_model(copy.deepcopy(base), lora)
    ref.save_pretrained(tmp_path / "init")
    kw = {"example_inputs": peftc.trl.packed_example_inputs(base)} if strategy == "bfd" else {}
    pm = peftc.load_adapter(base, tmp_path / "init", is_trainable=True, **kw)
    args = dict(packing=True, packing_strategy=strategy, max_length=64, per_device_train_batch_size=2)
    runs = [trl.SFTTrainer(model=m, args=config(trl.SFTConfig, tmp_path, **args), train_dataset=EX["text_dataset"](),
                           processing_class=base_tok) for m in (ref, pm)]
    batch = next(iter(runs[1].get_train_dataloader()))
    assert ("position_ids" in batch) == (strategy == "bfd") and ("attention_mask" in batch) == (strategy != "bfd")
    for t in runs:
        t.train()
    assert_same_run(*runs, ref, pm, tmp_path)


@pytest.mark.slow
def test_padding_free_batch_on_default_graph_is_refused(base_tok, tmp_path):
    pm = peftc.compile(EX["base_model"](), peftc.LoRA(r=4))
    t = trl.SFTTrainer(model=pm, args=config(trl.SFTConfig, tmp_path, packing=True, max_length=64),
                       train_dataset=EX["text_dataset"](), processing_class=base_tok)
    with pytest.raises(InputError, match=r"position_ids.*packed_example_inputs\(model\).*packing_strategy='wrapped'"):
        t.train()


# --- TRL's fused LM head --------------------------------------------------------------------------------------------
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("temperature", [1.0, pytest.param(0.7, marks=pytest.mark.slow)])
def test_fused_lm_head_fields_equal_trls(temperature):
    """add_fused_lm_head on a PeftModule (adapter off) gives TRL's fields on the same model, -100 labels included."""
    model = EX["base_model"]()
    pm = peftc.compile(model, peftc.LoRA(r=4))
    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs, temperature=temperature, outputs=OUTPUTS)
    add_fused_lm_head(pm, temperature=temperature, outputs=OUTPUTS)
    assert getattr(pm.forward, "peftc_fused_lm_head", False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, EX["VOCAB"], (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 5:7] = -100
    a = theirs(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    with pm.disable_adapter():
        b = pm(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    for f in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(b[f], a[f], atol=2e-5, rtol=1e-5, msg=f)
    assert torch.equal(b.is_top1, a.is_top1) and torch.equal(b.label_mask, a.label_mask)
    plain = pm(input_ids=ids, attention_mask=mask)                  # without fused_lm_head: the model's own call
    assert plain.logits.shape == (3, 12, EX["VOCAB"])


def test_fused_lm_head_refusals():
    model = EX["base_model"]().to(torch.bfloat16)
    pm = peftc.compile(model, peftc.LoRA(r=4))
    add_fused_lm_head(pm, cast_lm_head_to_fp32=True)
    ids = torch.randint(0, EX["VOCAB"], (2, 6))
    with pytest.raises(InputError, match="cast_lm_head_to_fp32"):
        pm(input_ids=ids, labels=ids, fused_lm_head=True)
    with pytest.raises(InputError, match="router_aux_loss_coef=0"):
        pm(input_ids=ids, labels=ids, fused_lm_head=True, output_router_logits=True)
    with pytest.raises(InputError, match="needs labels"):
        pm(input_ids=ids, fused_lm_head=True)


# --- DPO -----------------------------------------------------------------------------------------------------------
DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected")


def assert_rewards_close(theirs, mine):
    for a, b in zip(theirs, mine):
        for k in DPO_KEYS[1:]:
            assert abs(a[k] - b[k]) <= 1e-5 + 1e-3 * abs(a[k]), (k, theirs, mine)


@pytest.mark.slow
def test_dpo_base_reference_matches_peft(base_tok, tmp_path):
    """reference_model(pm): the base (rows routed to "__base__"), as TRL's reference for a PEFT model it made from a
    peft_config (disable_adapter()); same losses, rewards and adapter as that run. The reference holds no weights
    and every tensor the trainer's models read is the base model's or the adapter's own (no copy)."""
    base = EX["base_model"]()
    data = EX["dataset"]("preference.jsonl")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ref_t = trl.DPOTrainer(model=copy.deepcopy(base), args=config(trl.DPOConfig, tmp_path), train_dataset=data,
                           processing_class=base_tok, peft_config=lora)
    ref_t.model.save_pretrained(tmp_path / "init")
    pm = peftc.load_adapter(base, tmp_path / "init", is_trainable=True)
    reference = peftc.trl.reference_model(pm)
    ours_t = trl.DPOTrainer(model=pm, ref_model=reference, args=config(trl.DPOConfig, tmp_path), train_dataset=data,
                            processing_class=base_tok)
    assert list(reference.parameters()) == [] and list(reference.buffers()) == []
    base_ptrs = {t.data_ptr() for t in (*base.parameters(), *base.buffers())}
    adapter_ptrs = {t.data_ptr() for t in (*pm.store.parameters(), *pm.store.buffers())}
    graph_ptrs = {t.data_ptr() for t in (*pm.parameters(), *pm.buffers())}
    assert graph_ptrs <= base_ptrs | adapter_ptrs | {t.data_ptr() for t in pm.graph_module.buffers()}
    assert {p.data_ptr() for p in pm.base_graph_module.parameters()} <= base_ptrs      # base weights: the model's
    for t in (ref_t, ours_t):
        t.train()
    theirs, mine = assert_same_run(ref_t, ours_t, ref_t.model, pm, tmp_path, DPO_KEYS)
    assert_rewards_close(theirs, mine)


def test_reference_log_probs_are_the_base_models(base_tok):
    """The reference's fused log-probs equal the base model's own (TRL's fused head on the untouched HF model) while
    the policy's, with a non-zero adapter, differ."""
    model = EX["base_model"]()
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.normal_(0, 0.1)
    theirs = copy.deepcopy(model)
    add_fused_lm_head(theirs)
    reference = peftc.trl.reference_model(pm)
    add_fused_lm_head(reference)
    add_fused_lm_head(pm)
    ids = torch.randint(0, EX["VOCAB"], (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        got = reference(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        policy = pm(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (policy - want).abs().max() > 1e-3
    assert pm.training == model.training and pm.active_adapter == "default"


@pytest.mark.slow
def test_dpo_trainer_class_copies_the_adapter_as_trl_does(base_tok, tmp_path):
    """peftc.trl.DPOTrainer with no ref_model, on an adapter with trained weights: TRL's rule for a PeftModel it is
    given (a frozen "ref" copy of the adapter as the reference), so the run equals TRL's on that PeftModel."""
    base = EX["base_model"]()
    ref, _ = twins(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), tmp_path)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ref.save_pretrained(tmp_path / "trained")
    pm = peftc.load_adapter(base, tmp_path / "trained", is_trainable=True)
    data = EX["dataset"]("preference.jsonl")
    ref_t = trl.DPOTrainer(model=ref, args=config(trl.DPOConfig, tmp_path), train_dataset=data,
                           processing_class=base_tok)
    ours_t = peftc.trl.DPOTrainer(model=pm, args=config(trl.DPOConfig, tmp_path), train_dataset=data,
                                  processing_class=base_tok)
    assert isinstance(ours_t, trl.DPOTrainer) and type(ours_t).__name__ == "PeftcDPOTrainer"
    assert pm.adapters == ["default", "ref"] and ours_t.ref_model.adapter_name == "ref"
    assert not any(p.requires_grad for p in pm.store["ref"].parameters())
    base_ptrs = {t.data_ptr() for t in base.parameters()}
    assert {p.data_ptr() for p in pm.base_graph_module.parameters()} <= base_ptrs     # the copy is the adapter's only
    assert not {p.data_ptr() for p in pm.store["ref"].parameters()} & base_ptrs
    for t in (ref_t, ours_t):
        t.train()
    theirs, mine = assert_same_run(ref_t, ours_t, ref_t.model, pm, tmp_path, DPO_KEYS)
    assert_rewards_close(theirs, mine)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_reference_and_trainer_refusals(base_tok, tmp_path):
    model = EX["base_model"]()
    pm = peftc.compile(model, peftc.LoRA(r=4))
    with pytest.raises(InputError, match="takes a peftc.PeftModule, got LlamaForCausalLM"):
        peftc.trl.reference_model(model)
    with pytest.raises(InputError, match=r"'default' has trainable weights.*frozen_copy_"):
        peftc.trl.reference_model(pm, "default")
    with pytest.raises(InputError, match="unknown adapter 'nope'"):
        peftc.trl.reference_model(pm, "nope")
    with pytest.raises(InputError, match="takes no adapter_names"):
        peftc.trl.reference_model(pm)(input_ids=torch.ones(2, 3, dtype=torch.long), adapter_names=["default"] * 2)
    with pytest.raises(InputError, match="peft_config was given with a peftc.PeftModule"):
        peftc.trl.SFTTrainer(model=pm, args=config(trl.SFTConfig, tmp_path), train_dataset=EX["text_dataset"](),
                             processing_class=base_tok, peft_config=LoraConfig(r=4))
    assert pm.adapters == ["default"]
    with pytest.raises(AttributeError, match="no attribute 'NotATrainer'"):
        peftc.trl.NotATrainer


def test_disable_dropout_zeroes_the_adapters_rates():
    pm = peftc.compile(EX["base_model"](), peftc.LoRA(r=4, dropout=0.25, targets=["q_proj"]))
    pm.train()
    ids = torch.randint(0, EX["VOCAB"], (2, 8))
    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.normal_(0, 0.1)
        torch.manual_seed(0)
        a = pm(input_ids=ids).logits
        torch.manual_seed(1)
        assert not torch.equal(a, pm(input_ids=ids).logits)               # dropout draws differ
        assert peftc.trl.disable_dropout_(pm) == 2                        # two layers' q_proj
        a, b = pm(input_ids=ids).logits, pm(input_ids=ids).logits
        assert torch.equal(a, b)
        pm.eval()
        torch.testing.assert_close(pm(input_ids=ids).logits, a, atol=1e-6, rtol=0)
    assert pm.peft_config["default"]["lora_dropout"] == 0.25              # the config keeps it, as PEFT's


@pytest.mark.parametrize("trainer", [pytest.param("trl", marks=pytest.mark.slow), pytest.param("peftc", marks=pytest.mark.slow)])
def test_dpo_disables_lora_dropout_as_trl_does_for_peft(trainer, base_tok, tmp_path):
    """DPOConfig(disable_dropout=True), TRL's default: TRL sets p = 0 on the model's nn.Dropout modules, PEFT's
    lora_dropout and, on a PeftModule, each site's DropoutRate; so the runs agree although the adapters say
    lora_dropout=0.3 (plain trl.DPOTrainer with an explicit reference, and peftc.trl.DPOTrainer)."""
    base = EX["base_model"]()
    ref, pm = twins(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.3),
                    tmp_path)
    data = EX["dataset"]("preference.jsonl")
    ours = dict(model=pm) if trainer == "peftc" else \
        dict(model=pm, ref_model=peftc.trl.reference_model(pm, peftc.trl.frozen_copy_(pm)))
    cls = peftc.trl.DPOTrainer if trainer == "peftc" else trl.DPOTrainer
    runs = [c(**kw, args=config(trl.DPOConfig, tmp_path, max_steps=2), train_dataset=data, processing_class=base_tok)
            for c, kw in ((trl.DPOTrainer, dict(model=ref)), (cls, ours))]
    assert all(w.p == 0 and w.p_t.item() == 0 for a in pm.adapters for w in pm.store[a].modules()
               if hasattr(w, "p_t"))
    for t in runs:
        t.train()
    assert_same_run(*runs, ref, pm, tmp_path, DPO_KEYS)
    assert pm.peft_config["default"]["lora_dropout"] == 0.3              # the config keeps it, as PEFT's


def test_lora_backward_under_bf16_autocast():
    """HF Trainer's bf16=True (TRL's default) runs forward and backward under CPU autocast: LoRA's custom backward
    runs under the forward's autocast, so its matmuls meet the bf16 gradients (it raised a dtype mismatch before)."""
    pm = peftc.compile(EX["base_model"](), peftc.LoRA(r=4))
    pm.train()
    ids = torch.randint(0, EX["VOCAB"], (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in pm.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


# --- the surface TRL reads ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_surface_trl_reads():
    model = EX["base_model"]()
    pm = peftc.compile(model, peftc.LoRA(r=4))
    pm.add_model_tags(["trl", "sft"])
    pm.add_model_tags("trl")
    assert pm.model_tags == ["trl", "sft"] and getattr(model, "model_tags", None) is None
    assert pm.dtype == torch.float32
    assert peftc.compile(copy.deepcopy(model).to(torch.bfloat16), peftc.LoRA(r=4)).dtype == torch.bfloat16

    ids = torch.randint(0, EX["VOCAB"], (2, 8))
    pm.train()

    def grads():
        for p in pm.trainable_parameters():
            p.grad = None
        pm(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in pm.trainable_parameters()]

    with torch.no_grad():
        for p in pm.trainable_parameters():
            p.normal_(0, 0.1)
    want = grads()
    pm.activation_checkpointing_enable(every_n_layers=2, offload=True)     # transformers 5's call from HF Trainer
    assert pm.is_activation_checkpointing
    wrapped = {path: type(pm.graph_module.get_submodule(path)).__name__ for path in pm.blocks()}
    assert wrapped == {"model.layers.0": "CheckpointWrapper", "model.layers.1": "Block"}
    for g, w in zip(grads(), want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    pm.activation_checkpointing_disable()
    assert not pm.is_activation_checkpointing
    with pytest.raises(InputError, match="every_n_layers must be a positive integer"):
        pm.activation_checkpointing_enable(every_n_layers=0)


def test_import_peftc_does_not_import_trl():
    code = "import sys, peftc, peftc.trl; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# --- heavier -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_bf16_autocast_follows_peft(chat_tok, tmp_path):
    """HF Trainer's bf16=True (CPU autocast): LoRA's backward runs under the forward's autocast; losses follow PEFT's
    within bf16 noise."""
    base = EX["chat_model"](chat_tok)
    ref, pm = twins(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                     trainable_token_indices=NEW), tmp_path)
    runs = [trl.SFTTrainer(model=m, args=config(trl.SFTConfig, tmp_path, bf16=True),
                           train_dataset=EX["dataset"]("chat.jsonl"), processing_class=chat_tok) for m in (ref, pm)]
    for t in runs:
        t.train()
    for a, b in zip(logged(runs[0]), logged(runs[1])):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"])


@pytest.mark.slow
def test_example_runs(capsys):
    r = EX["main"](["--seed", "0"])
    assert EX["failures"](r) == [], r
    out = capsys.readouterr().out
    assert "SFT loss" in out and "DPO loss" in out
