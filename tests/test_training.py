"""Training through a PeftModule: a plain optimizer loop and HF Trainer; base weights never move."""
import tempfile

import pytest
import torch

import peftc
from tests.compare import assert_differs
from tests.models import inputs, make


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lm_batches(n=8, batch=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, 128, (4, 1), generator=g)
    base = (start + 3 * torch.arange(seq)) % 128  # a learnable rule: each token is the previous one plus 3
    return [{"input_ids": base, "attention_mask": torch.ones_like(base), "labels": base} for _ in range(n)]


def test_optimizer_loop_lowers_loss_and_leaves_base_bitwise_unchanged():
    model = make("llama")
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = peftc.compile(model, peftc.LoRA(r=8, alpha=16, dropout=0.05, targets="all-linear"))
    pm.train()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=2e-2)
    losses = []
    for batch in _lm_batches(n=30):
        loss = pm(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # PEFT on the same task: 4.89 -> 3.95 in 30 steps
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    # only adapter parameters are trainable, and they got gradients
    names = [n for n, _ in pm.named_trainable_parameters()]
    assert names and all("peftc_store" in n for n in names)


def test_gradients_reach_only_adapter_and_saved_copies():
    model = make("bert")
    pm = peftc.compile(model, peftc.LoRA(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B.normal_(std=0.1)
    out = pm(**inputs("bert"), labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters()}
    assert all(g is None for n, g in grads.items() if "peftc_store" not in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "peftc_store" in n)
    assert model.classifier.weight.grad is None


def test_train_and_eval_modes_follow_dropout():
    model = make("bert")  # hidden and attention dropout 0.1
    pm = peftc.compile(model, peftc.LoRA(r=4, dropout=0.2))
    x = inputs("bert")
    pm.eval()
    assert torch.equal(pm(**x).logits, pm(**x).logits)
    assert torch.equal(pm(**x).logits, model(**x).logits), "a fresh adapter in eval mode is not exactly the model"
    pm.train()
    assert_differs(pm(**x).logits, pm(**x).logits)
    assert all(m.training for m in pm.modules())
    pm.eval()
    assert not any(m.training for m in pm.modules())


@pytest.mark.slow
def test_hf_trainer_trains_the_adapter():
    from transformers import Trainer, TrainingArguments

    model = make("llama")
    before = _snapshot(model)
    pm = peftc.compile(model, peftc.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    start = {k: v.clone() for k, v in pm.store.peft_state_dict("default").items()}
    rows = [{k: v[i] for k, v in b.items()} for b in _lm_batches(n=4) for i in range(4)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=3,
                                 learning_rate=2e-2, save_strategy="no", report_to=[], logging_steps=1,
                                 use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=pm, args=args, train_dataset=rows)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    end = pm.store.peft_state_dict("default")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_loss_equals_the_models_own(arch):
    model = make(arch)
    pm = peftc.compile(model, peftc.LoRA(r=4)).eval()
    x = inputs(arch)
    labels = x["input_ids"] if arch == "llama" else torch.tensor([2, 0, 1])
    assert torch.equal(pm(**x, labels=labels).loss, model(**x, labels=labels).loss), "the loss is not the model's own"
