"""HF Trainer on a PeftModule (peftc.Trainer): PEFT's losses and eval loss, activation checkpointing, bf16, compile,
PEFT-format checkpoints and exact resume, refused options; a 2-process accelerate run (slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer as HFTrainer
from transformers import TrainerCallback, TrainingArguments

import peftc
from tests.models import inputs, make

ROOT = Path(__file__).resolve().parents[1]


def _rows(n=24, seq=12, seed=0):
    """n rows of a learnable rule (each token the previous plus 3), for the causal LM loss."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, 128, (n, 1), generator=g)
    ids = (start + 3 * torch.arange(seq)) % 128
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
                learning_rate=2e-2, save_strategy="no", report_to=[], logging_steps=1, use_cpu=True,
                disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def _pair(tmp):
    """(PEFT model, PeftModule) on equal copies of one tiny Llama with the same initial adapter (PEFT's)."""
    ref = get_peft_model(make("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0))
    ref.save_pretrained(tmp / "init")
    pm = peftc.load_adapter(make("llama"), tmp / "init", is_trainable=True)
    return ref, pm


def _fresh():
    return peftc.compile(make("llama"), peftc.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))


def _train(cls, model, args, **kw):
    t = cls(model=model, args=args, train_dataset=_rows(), **kw)
    t.train()
    return t


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


def _adapter(pm):
    return {k: v.detach().clone() for k, v in pm.store.peft_state_dict("default").items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_close(a, b, tol):
    assert len(a) == len(b) > 0 and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


@pytest.mark.slow
def test_losses_and_adapter_equal_peft_with_gradient_accumulation(tmp_path):
    """fp32, two accumulated micro-batches per step (Trainer's num_items_in_batch reaches peftc's loss): the logged
    losses and the trained adapter equal PEFT's under the same Trainer arguments."""
    ref, pm = _pair(tmp_path)
    args = _args(tmp_path / "o", gradient_accumulation_steps=2, per_device_train_batch_size=2)
    theirs = _train(HFTrainer, ref, args)
    ours = _train(peftc.Trainer, pm, args)
    _assert_close(_losses(ours), _losses(theirs), 1e-5)
    assert _max_diff(_adapter(pm), get_peft_model_state_dict(ref)) < 1e-5


@pytest.mark.slow
def test_label_smoothing_shifts_labels_as_for_peft(tmp_path):
    """Trainer smooths labels outside the model and shifts them only for a causal LM it recognizes by class name:
    peftc.Trainer applies PEFT's rule (plain transformers.Trainer would not shift and report a different loss)."""
    ref, pm = _pair(tmp_path)
    args = _args(tmp_path / "o", label_smoothing_factor=0.1, max_steps=2)
    theirs = _train(HFTrainer, ref, args)
    ours = _train(peftc.Trainer, pm, args)
    _assert_close(_losses(ours), _losses(theirs), 1e-5)


@pytest.mark.slow
def test_eval_loss_equals_peft(tmp_path):
    """eval_strategy="steps": eval_loss is reported at each evaluation and equals PEFT's on the same weights."""
    ref, pm = _pair(tmp_path)
    args = _args(tmp_path / "o", eval_strategy="steps", eval_steps=2)
    ev = _rows(8, seed=1)
    theirs = _train(HFTrainer, ref, args, eval_dataset=ev)
    ours = _train(peftc.Trainer, pm, args, eval_dataset=ev)
    assert len(_losses(ours, "eval_loss")) == 2
    _assert_close(_losses(ours, "eval_loss"), _losses(theirs, "eval_loss"), 1e-5)
    # identical weights: the trained PEFT adapter loaded into peftc, evaluated by both
    ref.save_pretrained(tmp_path / "trained")
    same = peftc.load_adapter(make("llama"), tmp_path / "trained")
    a = peftc.Trainer(model=same, args=args, eval_dataset=ev).evaluate()["eval_loss"]
    b = HFTrainer(model=ref, args=args, eval_dataset=ev).evaluate()["eval_loss"]
    assert abs(a - b) <= 1e-6, (a, b)


class _CountCalls:
    def __init__(self, pm):
        self.n = 0
        for block in pm.blocks().values():
            block.register_forward_pre_hook(self)      # a recompute may stop early: no forward hook then

    def __call__(self, *_):
        self.n += 1


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_keeps_losses(tmp_path):
    """gradient_checkpointing=True: Trainer switches it on through activation_checkpointing_enable; every block runs
    twice per step (forward, and again in backward) and the run equals the one without it."""
    runs = {}
    for gc in (False, True):
        pm = _fresh()
        calls = _CountCalls(pm)
        t = _train(peftc.Trainer, pm, _args(tmp_path / "o", gradient_checkpointing=gc, max_steps=3))
        runs[gc] = (_losses(t), _adapter(pm), calls.n, pm.is_gradient_checkpointing)
    layers = 2
    assert runs[False][2:] == (3 * layers, False)
    assert runs[True][2:] == (2 * 3 * layers, True)
    _assert_close(runs[True][0], runs[False][0], 1e-6)
    assert _max_diff(runs[True][1], runs[False][1]) <= 1e-6


@pytest.mark.parametrize("kw", [{"every_n_layers": 2}, {"offload": True},
                                {"gradient_checkpointing_kwargs": {"use_reentrant": True}}])
def test_checkpointing_options_keep_gradients_and_save_less(kw):
    """transformers' options (every_n_layers, offload, reentrant): gradients equal the plain run's; what autograd
    keeps in memory during the forward shrinks (offload: nothing kept but on the host; here all is host memory, so
    saved bytes are counted instead)."""
    x = {**inputs("llama"), "labels": inputs("llama")["input_ids"]}

    def grads_and_saved(pm):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        pm.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = pm(**x).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_trainable_parameters()}, sum(saved)

    pm = _fresh()
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B.normal_(std=0.1)
    plain, plain_bytes = grads_and_saved(pm)
    pm.zero_grad()
    gc_kwargs = kw.pop("gradient_checkpointing_kwargs", None)
    pm.gradient_checkpointing_enable(gc_kwargs, **kw)
    assert pm.is_gradient_checkpointing
    grads, bytes_ = grads_and_saved(pm)
    assert _max_diff(grads, plain) <= 1e-6
    if not kw.get("offload"):
        assert bytes_ < plain_bytes, (bytes_, plain_bytes)


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_peft(tmp_path):
    """bf16=True on CPU (autocast): the losses follow PEFT's within bf16 rounding, and differ from fp32's (the
    autocast is live, through peftc's LoRA backward too)."""
    ref, pm = _pair(tmp_path)
    args = _args(tmp_path / "o", bf16=True)
    theirs = _train(HFTrainer, ref, args)
    ours = _train(peftc.Trainer, pm, args)
    _assert_close(_losses(ours), _losses(theirs), 2e-2)
    fp32 = _train(peftc.Trainer, _pair(tmp_path)[1], _args(tmp_path / "o"))
    assert _losses(fp32) != _losses(ours)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{}, {"bf16": True}])
def test_torch_compile_matches_eager(tmp_path, kw):
    """torch_compile=True (inductor), in fp32 and under bf16 autocast: the same losses and adapter as eager (bf16:
    inductor rounds its fused kernels otherwise, and AdamW's sign-like first steps carry that into single entries,
    so the adapter is compared by norm there)."""
    runs = []
    for compiled in (False, True):
        pm = _fresh()
        t = _train(peftc.Trainer, pm, _args(tmp_path / "o", torch_compile=compiled, **kw))
        runs.append((_losses(t), _adapter(pm)))
    (compiled_losses, a), (eager_losses, b) = runs[1], runs[0]
    if not kw:
        _assert_close(compiled_losses, eager_losses, 1e-4)
        assert _max_diff(a, b) < 1e-4
    else:
        _assert_close(compiled_losses, eager_losses, 1e-3)
        diff = sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(b[k].norm() ** 2 for k in b) ** 0.5
        assert diff < 5e-2, diff


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_checkpoints_are_peft_adapters_and_resume_is_exact(tmp_path):
    """save_strategy="steps": each checkpoint-N holds the adapter in PEFT's format (no base weights), which
    PeftModel.from_pretrained loads with equal outputs; a run stopped at checkpoint-4 and resumed (onto a fresh
    adapter) equals the uninterrupted run: same adapter, same logged losses."""
    args = dict(max_steps=6, save_strategy="steps", save_steps=2)
    pm = _fresh()
    full = _train(peftc.Trainer, pm, _args(tmp_path / "full", **args))
    for step in (2, 4, 6):
        files = sorted(os.listdir(tmp_path / "full" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
        assert not any(f.startswith("model") for f in files), files
    last = tmp_path / "full" / "checkpoint-6"
    ref = PeftModel.from_pretrained(make("llama"), last)
    x = inputs("llama")
    with torch.no_grad():
        assert (ref(**x).logits - pm.eval()(**x).logits).abs().max().item() < 1e-5

    stopped = _fresh()
    _train(peftc.Trainer, stopped, _args(tmp_path / "part", **args), callbacks=[_StopAt(4)])
    assert sorted(os.listdir(tmp_path / "part")) == ["checkpoint-2", "checkpoint-4"]
    resumed = _fresh()
    params = list(resumed.trainable_parameters())
    t = peftc.Trainer(model=resumed, args=_args(tmp_path / "part", **args), train_dataset=_rows())
    t.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))
    assert all(a is b for a, b in zip(params, resumed.trainable_parameters())), "loaded in place"
    assert _max_diff(_adapter(resumed), _adapter(pm)) <= 1e-6
    _assert_close(_losses(t), _losses(full), 1e-6)      # steps 1-4 read back from checkpoint-4, 5-6 trained


@pytest.mark.slow
def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    """load_best_model_at_end: the adapter at the end is the one saved in the best checkpoint."""
    pm = _fresh()
    t = _train(peftc.Trainer, pm, _args(tmp_path / "o", max_steps=4, save_strategy="steps", save_steps=2,
                                        eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                        learning_rate=0.3), eval_dataset=_rows(8, seed=1))
    best = t.state.best_model_checkpoint
    other = peftc.load_adapter(make("llama"), best)
    assert _max_diff(_adapter(pm), _adapter(other)) == 0.0


@pytest.mark.slow
def test_resume_from_another_adapters_checkpoint_is_refused(tmp_path):
    pm = _fresh()
    pm.save_pretrained(tmp_path / "ckpt")
    other = peftc.compile(make("llama"), peftc.LoRA(r=4, alpha=16, targets=["q_proj", "v_proj"]))
    before = _adapter(other)
    t = peftc.Trainer(model=other, args=_args(tmp_path / "o"), train_dataset=_rows())
    with pytest.raises(peftc.CheckpointError, match="lora_alpha"):
        t._load_from_checkpoint(str(tmp_path / "ckpt"))
    assert _max_diff(_adapter(other), before) == 0.0


def test_checkpoint_holds_every_adapter_and_loads_them_in_place(tmp_path):
    """Two adapters (the trained one and a frozen one): the checkpoint holds both in PEFT's layout (the second in
    its own directory), and resuming copies both back into the same Parameter objects."""
    pm = _fresh()
    pm.add_adapter("other", peftc.LoRA(r=2, targets=["k_proj"]))
    t = _train(peftc.Trainer, pm, _args(tmp_path / "o", max_steps=2, save_strategy="steps", save_steps=2))
    ckpt = tmp_path / "o" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "other" / "adapter_model.safetensors").is_file()
    saved = {a: {k: v.clone() for k, v in pm.store.peft_state_dict(a).items()} for a in pm.adapters}
    params = list(pm.parameters())
    with torch.no_grad():
        for p in pm.store.parameters():
            p.add_(1.0)
    t._load_from_checkpoint(str(ckpt))
    assert all(a is b for a, b in zip(params, pm.parameters()))
    for a in pm.adapters:
        assert _max_diff(pm.store.peft_state_dict(a), saved[a]) == 0.0


def test_trainer_class_composes_with_subclasses_and_leaves_other_models_alone(tmp_path):
    class MyTrainer(HFTrainer):
        pass

    cls = peftc.trainer_class(MyTrainer)
    assert issubclass(cls, MyTrainer) and peftc.trainer_class(MyTrainer) is cls and peftc.trainer_class(cls) is cls
    with pytest.raises(peftc.InputError, match="subclass"):
        peftc.trainer_class(dict)
    model = make("llama")                      # no PeftModule: Trainer's own checkpoint (the model's state dict)
    cls(model=model, args=_args(tmp_path / "o"))._save(str(tmp_path / "plain"))
    assert "model.safetensors" in os.listdir(tmp_path / "plain")


def test_import_peftc_does_not_import_trainer():
    code = "import sys, peftc; print('transformers.trainer' in sys.modules, 'accelerate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout


def test_neftune_is_refused_before_anything_changes(tmp_path):
    """NEFTune hooks the input embedding module, which the traced graph never calls: refused by name, up front."""
    pm = _fresh()
    before = _adapter(pm)
    with pytest.raises(peftc.InputError, match="neftune_noise_alpha=5.0"):
        peftc.Trainer(model=pm, args=_args(tmp_path / "o", neftune_noise_alpha=5.0), train_dataset=_rows())
    assert _max_diff(_adapter(pm), before) == 0.0 and not pm.is_gradient_checkpointing
    # what plain transformers.Trainer does instead: an AttributeError from inside train()
    with pytest.raises(AttributeError, match="get_input_embeddings"):
        _train(HFTrainer, pm, _args(tmp_path / "o", neftune_noise_alpha=5.0))


def _example(out, launcher, *extra):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*launcher, str(ROOT / "examples" / "trainer_llama.py"), "--out", str(out), "--batch", "8", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_accelerate_two_cpu_processes_equal_one(tmp_path):
    """examples/trainer_llama.py under `accelerate launch` with 2 processes (gloo on CPU; accelerate 1.16's `--cpu`
    flag alone starts one process, so `--multi_gpu` with no GPU visible starts the two) against one process on the
    same global batches: the same logged losses (the mean over both processes) within 1e-5, both processes hold
    bit-identical adapters, and the adapter equals the single process's within 1e-4, not 1e-5: DDP averages two
    half-batch gradients where one process reduces the whole batch at once; the float order differs by ~1e-7, which
    AdamW's normalized steps carry to ~2e-5 after 12 steps. Trainer's fsdp="full_shard" on the same 2 processes
    gives the data-parallel run's adapter, saved in PEFT's format."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    one = _example(tmp_path / "one", [sys.executable])
    two = _example(tmp_path / "two", launch)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    _assert_close(two["losses"], one["losses"], 1e-5)
    assert two["losses"][-1] < two["losses"][0]
    r0, r1 = (load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "the two processes' adapters differ"
    assert _max_diff(r0, load_file(tmp_path / "one" / "rank0.safetensors")) < 1e-4
    saved = load_file(tmp_path / "two" / "adapter_model.safetensors")     # trainer.save_model: PEFT's format
    assert saved.keys() == r0.keys() and all(torch.equal(saved[k], r0[k]) for k in r0)
    assert not (tmp_path / "two" / "model.safetensors").exists()
    # Trainer's fsdp="full_shard" on the same 2 processes: the same adapter as data-parallel, saved as PEFT's
    fsdp = _example(tmp_path / "fsdp", launch, "--fsdp")
    _assert_close(fsdp["losses"], two["losses"], 1e-6)
    assert _max_diff(load_file(tmp_path / "fsdp" / "checkpoint-12" / "adapter_model.safetensors"), r0) <= 1e-6
    assert not (tmp_path / "fsdp" / "checkpoint-12" / "model.safetensors").exists()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.slow
def test_bf16_autocast_on_a_quantized_base_trains_as_peft(tmp_path, bits):
    """bf16 autocast over bitsandbytes layers (peftc's fused LoRA op: the update in the autocast dtype added into the
    base output, the backward under the forward's autocast): loss and adapter gradients as PEFT's; Trainer trains."""
    import transformers as tf

    make("llama").save_pretrained(tmp_path / "base")
    q = tf.BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    load = lambda: tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",  # noqa: E731
                                                           quantization_config=q)
    pm = peftc.compile(load(), peftc.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], init=False)).train()
    ref = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).train()
    theirs = get_peft_model_state_dict(ref)
    with torch.no_grad():
        for k, t in pm.store.peft_state_dict("default").items():
            t.copy_(theirs[k])
    row = {k: v[None] for k, v in _rows(1)[0].items()}                # (1, 12) each
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = pm(**row).loss, ref(**row).loss
    a.backward(), b.backward()
    assert abs(a.item() - b.item()) <= 1e-3 * abs(b.item())
    grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    mine = dict(pm.store["default"].named_parameters())
    for key, t in pm.store.peft_state_dict("default").items():
        g = next(p.grad for p in mine.values() if p.data_ptr() == t.data_ptr())
        want = grads[key]
        assert (g - want).norm() <= 0.05 * want.norm(), key
    before = _adapter(pm)
    t = _train(peftc.Trainer, pm, _args(tmp_path / "o", max_steps=2, bf16=True))
    assert len(_losses(t)) == 2 and _max_diff(_adapter(pm), before) > 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_backward_under_autocast_follows_peft(tmp_path, dropout):
    """bf16 autocast on every linear layer (LoRA's own backward, the gated MLP, dropout's per-site path): the
    adapter gradients follow PEFT's within bf16 rounding (5 % of their norm; one of 2.3 % was seen), and are float32
    as PEFT's are."""
    ref = get_peft_model(make("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   lora_dropout=dropout))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    ref.save_pretrained(tmp_path / "a")
    pm = peftc.load_adapter(make("llama"), tmp_path / "a", is_trainable=True)
    x = {**inputs("llama"), "labels": inputs("llama")["input_ids"]}
    losses = []
    for model in (pm, ref):
        model.train()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**x).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2, losses
    theirs = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    ours = {k: p.grad for k, p in pm.store.peft_parameters("default")}
    assert ours.keys() == theirs.keys()
    for k, g in ours.items():
        t = theirs[k]
        rel = ((g - t).norm() / t.norm()).item()
        assert g.dtype == torch.float32 and rel <= 5e-2, (k, rel)
