"""FSDP2 per layer (gloo on CPU, 2 processes under torchrun): `fully_shard` on each of a PeftModule's blocks, then on
the module, trains the adapter one process trains on the same global batches; rank 0 saves it whole in PEFT's format;
parameters are all-gathered one layer at a time, in the forward and in the backward."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = pytest.mark.slow       # two processes under torchrun: 20-40 s each on a 2-core CPU


def torchrun(tmp_path: Path, driver: str, *args: str) -> None:
    path = tmp_path / "driver.py"
    path.write_text(driver % {"examples": str(ROOT / "examples")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]


# examples/fsdp_train.py under torchrun; then, sharded, a frozen adapter loads (replicated) and a trainable one is refused
TRAIN = r"""
import json, sys
sys.path.insert(0, %(examples)r)
import torch, torch.distributed as dist
import fsdp_train, peftc
from torch.distributed.tensor import DTensor
out = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pm = fsdp_train.adapted(fsdp_train.model())
losses = fsdp_train.train(6, fsdp_train.Path(out), rank, world, distributed=True, pm=pm)
sharded = all(isinstance(p, DTensor) for p in pm.trainable_parameters())
dist.barrier()                                   # rank 0 has written: every rank may read
pm.eval()
pm.load_adapter(out, "loaded")                   # into the sharded module: plain tensors, the same on every rank
x = fsdp_train.global_batches(1)[0]
with torch.no_grad():
    pm.set_adapter("loaded")
    a = pm(input_ids=x).logits
    pm.set_adapter("default")
    b = pm(input_ids=x).logits
try:
    pm.load_adapter(out, "trainable", is_trainable=True)
    refused = ""
except peftc.SpecError as e:
    refused = str(e)
if rank == 0:
    json.dump({"losses": losses, "sharded": sharded, "loaded_diff": (a - b).abs().max().item(),
               "refused": refused, "adapters": pm.adapters}, open(out + ".json", "w"))
dist.destroy_process_group()
"""


def test_fsdp_two_gloo_processes_learn_what_one_process_learns(tmp_path):
    import fsdp_train
    from peft import PeftModel

    out = tmp_path / "fsdp"
    torchrun(tmp_path, TRAIN, str(out))
    r = json.loads(Path(f"{out}.json").read_text())
    assert r["sharded"]                                      # the adapter's parameters were DTensor shards
    torch.set_num_threads(1)
    single = fsdp_train.train(6, tmp_path / "single")
    assert max(abs(a - b) for a, b in zip(r["losses"], single)) <= 1e-5, (r["losses"], single)

    # rank 0 wrote the whole adapter (gathered), in PEFT's format: the same keys and shapes as one process's
    got, want = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and all(got[k].shape == want[k].shape for k in got)
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-5, f"the adapters differ by {worst:.3g}"
    assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3     # B started at zero: it trained
    assert (json.loads((out / "adapter_config.json").read_text())
            == json.loads((tmp_path / "single" / "adapter_config.json").read_text()))

    # PEFT loads it on the same base and computes what the single process's adapter computes
    x = fsdp_train.global_batches(1)[0]
    with torch.no_grad():
        ours = PeftModel.from_pretrained(fsdp_train.model(), str(out)).eval()(input_ids=x).logits
        ref = PeftModel.from_pretrained(fsdp_train.model(), str(tmp_path / "single")).eval()(input_ids=x).logits
    assert (ours - ref).abs().max().item() <= 1e-5

    # loaded into the sharded module, a frozen adapter computes what the sharded one does; a trainable one is refused
    assert r["loaded_diff"] <= 1e-6, r["loaded_diff"]
    assert "before fully_shard" in r["refused"] and r["adapters"] == ["default", "loaded"], r


# bytes of all-gathered (unsharded) parameters held per rank, sampled around every FSDP unshard and reshard
MEMORY = r"""
import json, sys
sys.path.insert(0, %(examples)r)
import torch, torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
import fsdp_train
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pm = fsdp_train.adapted(fsdp_train.model())
pm.train()
layer = sum(p.numel() * p.element_size() for p in pm.blocks()["model.layers.0"].parameters())
whole = sum(p.numel() * p.element_size() for p in pm.parameters())
root_own = whole - sum(p.numel() * p.element_size() for b in pm.blocks().values() for p in b.parameters())
fsdp_train.shard_(pm)
blocks = {id(b._get_fsdp_state()._fsdp_param_group) for b in pm.blocks().values()}

def gathered(group):   # bytes the group's all-gathered parameters hold now (their storage is freed on reshard)
    return sum(fp._unsharded_param.untyped_storage().nbytes() for fp in group.fsdp_params
               if hasattr(fp, "_unsharded_param"))

GROUPS, PEAK, PHASE = [], {"forward": [0, 0], "backward": [0, 0]}, ["forward"]
def sample():
    in_blocks = sum(gathered(g) for g in GROUPS if id(g) in blocks)
    in_root = sum(gathered(g) for g in GROUPS if id(g) not in blocks)
    peak = PEAK[PHASE[0]]
    peak[0], peak[1] = max(peak[0], in_blocks), max(peak[1], in_blocks + in_root)
def watch(name):
    orig = getattr(FSDPParamGroup, name)
    def f(self, *a, **k):
        if self not in GROUPS:
            GROUPS.append(self)
        sample()
        out = orig(self, *a, **k)
        sample()
        return out
    setattr(FSDPParamGroup, name, f)
for name in ("unshard", "wait_for_unshard", "reshard"):
    watch(name)
shards = sum(p.to_local().numel() * p.element_size() for p in pm.parameters())
rows = fsdp_train.global_batches(1)[0][rank::world]
loss = pm(input_ids=rows, labels=rows).loss
PHASE[0] = "backward"
loss.backward()
if rank == 0:
    json.dump({"layer": layer, "whole": whole, "root_own": root_own, "shards": shards, "peak": PEAK,
               "groups": len(GROUPS)}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


def test_fsdp_gathers_one_layer_at_a_time(tmp_path):
    """Peak all-gathered parameter bytes per rank: one block in the forward, two in the backward (FSDP prefetches the
    next block's gather), plus the root's own parameters (embeddings, norm, head, adapters); gathering the whole
    model (4 blocks) would exceed both bounds."""
    torchrun(tmp_path, MEMORY, str(tmp_path / "memory.json"))
    r = json.loads((tmp_path / "memory.json").read_text())
    layer, root_own, whole, (fwd_blocks, fwd_all), (bwd_blocks, bwd_all) = (
        r["layer"], r["root_own"], r["whole"], r["peak"]["forward"], r["peak"]["backward"])
    assert r["groups"] == 5                                  # 4 blocks and the root each gathered their own
    assert layer <= fwd_blocks <= layer and layer <= bwd_blocks <= 2 * layer, (r, layer)
    assert fwd_all <= root_own + layer and bwd_all <= root_own + 2 * layer, r
    blocks = whole - root_own
    assert blocks == 4 * layer                               # a whole-model gather holds 4 layers: twice the bound
    assert r["shards"] <= whole / 2 + 64                     # every parameter sharded in two (up to padding)
    assert r["shards"] + bwd_all < r["shards"] + whole - layer   # held per rank at the peak, below a whole gather


# QLoRA: the same under torchrun on a bitsandbytes 4-bit base (nf4, fp32 compute), loaded from one saved tiny Llama
QLORA = r"""
import json, sys
sys.path.insert(0, %(examples)r)
import torch, torch.distributed as dist
import transformers as tf
from torch.distributed.tensor import DTensor
import fsdp_train
base, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pm = fsdp_train.adapted(tf.AutoModelForCausalLM.from_pretrained(base, device_map="cpu",
     quantization_config=tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)))
losses = fsdp_train.train(4, fsdp_train.Path(out), rank, world, distributed=True, pm=pm)
q = pm.blocks()["model.layers.0"].self_attn.q_proj
if rank == 0:
    json.dump({"losses": losses, "kinds": sorted({s.kind for k, s in pm.sites.items() if ".layers." in k}),
               "adapter_sharded": all(isinstance(p, DTensor) for p in pm.trainable_parameters()),
               "codes": [q.weight.dtype == torch.uint8, isinstance(q.weight, DTensor), "weight" in q._buffers]},
              open(out + ".json", "w"))
dist.destroy_process_group()
"""


def test_qlora_under_fsdp_learns_what_one_process_learns(tmp_path):
    """QLoRA trains under fully_shard as one process does; the 4-bit weights are not sharded: peftc holds them as
    buffers (peftc.quant.QuantLinear), and FSDP2 shards parameters only, so every rank keeps the whole 4-bit base
    (its norms, embeddings, head and the adapters are sharded)."""
    import fsdp_train
    import transformers as tf

    fsdp_train.model().save_pretrained(tmp_path / "base")
    out = tmp_path / "fsdp"
    torchrun(tmp_path, QLORA, str(tmp_path / "base"), str(out))
    r = json.loads(Path(f"{out}.json").read_text())
    assert r["kinds"] == ["linear4bit"] and r["adapter_sharded"], r      # every layer's linears are 4-bit
    assert r["codes"] == [True, False, True], r              # packed 4-bit codes: a whole buffer on every rank

    torch.set_num_threads(1)
    quantized = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu", quantization_config=tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    single = fsdp_train.train(4, tmp_path / "single", pm=fsdp_train.adapted(quantized))
    assert max(abs(a - b) for a, b in zip(r["losses"], single)) <= 1e-5, (r["losses"], single)
    got, want = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-5, f"the adapters differ by {worst:.3g}"
    assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3
