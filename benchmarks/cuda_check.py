"""CUDA check (run where a GPU is present): compile, PEFT parity, a training step and save/load on the GPU.

    python benchmarks/cuda_check.py
"""
from __future__ import annotations

import copy
import tempfile

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import peftc


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).cuda().eval()
    ref_base = copy.deepcopy(model)   # PEFT changes the model it wraps
    pm = peftc.compile(model, peftc.LoRA(r=8, alpha=16, targets="all-linear"))
    assert all(p.is_cuda for p in pm.parameters())
    with torch.no_grad():
        for w in pm.store["default"].sites.values():
            w.B.normal_(std=0.05)
    ids = torch.randint(0, 512, (3, 37), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with tempfile.TemporaryDirectory() as d:
        pm.save_adapter(d)
        ref = PeftModel.from_pretrained(ref_base, d).eval()
        ours = pm(input_ids=ids, attention_mask=mask, labels=ids)
        theirs = ref(input_ids=ids, attention_mask=mask, labels=ids)
        diff = (ours.logits - theirs.logits).abs().max().item()
        print(f"cuda parity with PEFT: max |logit diff| {diff:.2e}, loss {ours.loss.item():.5f} vs {theirs.loss.item():.5f}")
        assert diff < 1e-4
        reloaded = peftc.load_adapter(model, d)
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits,
                           pm(input_ids=ids, attention_mask=mask).logits)
    pm.train()
    opt = torch.optim.AdamW(pm.trainable_parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print(f"cuda training step ok; device {torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
