"""FSDP2 per layer (gloo on CPU; the slow tests run 2 processes under torchrun): `fully_shard` on each of a PeftModule's
blocks, then on the module, trains the adapter one process trains on the same global batches (a 4-bit base too); every
rank saves, rank 0 writes the whole adapter in PEFT's format; parameters are all-gathered one layer at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftc
from tests.models import inputs, make

WEIGHTS = "adapter_model.safetensors"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture
def world_of_one():
    """A gloo process group of one process (FSDP2 runs, every DTensor holds the whole tensor as its shard)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded(pm, mesh):
    from torch.distributed.fsdp import fully_shard

    for block in pm.blocks().values():
        fully_shard(block, mesh=mesh)
    return fully_shard(pm, mesh=mesh)


def test_save_gathers_the_sharded_adapter(world_of_one, tmp_path):
    """save_adapter on a sharded module writes the whole adapter (DTensor.full_tensor) as the unsharded module does;
    is_main_process=False writes nothing. generate, which runs outside FSDP's hooks, says it is not served."""
    from torch.distributed.tensor import DTensor

    pm = peftc.compile(make("llama"), peftc.LoRA(r=4, targets="all-linear", init=False))
    pm.save_adapter(tmp_path / "plain")
    sharded(pm, world_of_one)
    assert all(isinstance(p, DTensor) for p in pm.trainable_parameters())
    pm.save_adapter(tmp_path / "sharded")
    pm.save_pretrained(tmp_path / "other", is_main_process=False)
    got, want = load_file(tmp_path / "sharded" / WEIGHTS), load_file(tmp_path / "plain" / WEIGHTS)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert not (tmp_path / "other").exists()
    with pytest.raises(peftc.GenerationError, match="sharded with fully_shard"):
        pm.eval().generate(inputs("llama")["input_ids"], max_new_tokens=2)


def test_a_call_before_sharding_does_not_pin_the_adapter(world_of_one):
    """A call before fully_shard, then a training step: the step reaches the sharded adapter (a route made before
    sharding would hold the replaced parameters) and equals the same step unsharded."""
    x = inputs("llama")
    pms = [peftc.compile(make("llama"), peftc.LoRA(r=4, targets=["q_proj", "v_proj"])) for _ in range(2)]
    for pm in pms:
        pm.train()
        pm(**x)                                           # before sharding
    sharded(pms[0], world_of_one)
    for pm in pms:
        opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.5)
        pm(**x, labels=x["input_ids"]).loss.backward()
        opt.step()
    got, want = (dict(pm.named_trainable_parameters()) for pm in pms)
    moved = max(want[k].abs().max().item() for k in want if k.endswith(".B"))
    assert moved > 1e-4                                   # B started at zero
    assert max((got[k].full_tensor() - want[k]).abs().max().item() for k in want) <= 1e-6


def torchrun(tmp_path: Path, driver: str, *args: str) -> None:
    path = tmp_path / "driver.py"
    path.write_text(driver % {"examples": str(ROOT / "examples")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(path), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]


# examples/fsdp_train.py under torchrun; then, sharded, a frozen adapter loads (replicated), a trainable one is
# refused
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


@pytest.mark.slow      # two processes under torchrun, 20-30 s on a 2-core CPU
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
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
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


# bytes of all-gathered (unsharded) parameters held per rank, sampled around every FSDP unshard and reshard; per layer
# (fully_shard on each block, then the root) and, as a control, the whole model as one group (fully_shard on the root)
MEMORY = r"""
import gc, json, sys
sys.path.insert(0, %(examples)r)
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
import fsdp_train
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
GROUPS, PEAK, NOW = [], {}, {}

def gathered(fp):   # bytes an FSDP parameter's all-gathered tensor holds now (its storage is freed on reshard)
    return fp._unsharded_param.untyped_storage().nbytes() if hasattr(fp, "_unsharded_param") else 0

def sample():
    fps = [fp for g in GROUPS for fp in g.fsdp_params]
    in_blocks = sum(gathered(fp) for fp in fps if id(fp._module_info.module) in NOW["block_modules"])
    peak = PEAK.setdefault(NOW["key"], [0, 0])
    peak[0], peak[1] = max(peak[0], in_blocks), max(peak[1], sum(gathered(fp) for fp in fps))

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

result = {}
for per_layer in (True, False):
    GROUPS.clear()
    pm = fsdp_train.adapted(fsdp_train.model())
    pm.train()
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    layout = {"layer": nbytes(pm.blocks()["model.layers.0"].parameters()), "whole": nbytes(pm.parameters()),
              "blocks": nbytes(p for b in pm.blocks().values() for p in b.parameters())}
    NOW["block_modules"] = {id(m) for b in pm.blocks().values() for m in b.modules()}
    if per_layer:
        fsdp_train.shard_(pm)
    else:
        fully_shard(pm, mesh=init_device_mesh("cpu", (world,)))
    layout["shards"] = nbytes(p.to_local() for p in pm.parameters())
    rows = fsdp_train.global_batches(1)[0][rank::world]
    NOW["key"] = f"{per_layer}-forward"
    loss = pm(input_ids=rows, labels=rows).loss
    NOW["key"] = f"{per_layer}-backward"
    loss.backward()
    result["per_layer" if per_layer else "whole"] = {**layout, "groups": len(GROUPS),
        "forward": PEAK[f"{per_layer}-forward"], "backward": PEAK[f"{per_layer}-backward"]}
    del pm, loss                  # FSDP's state and its pending work released while the process group lives
    gc.collect()
    dist.barrier()
if rank == 0:
    json.dump(result, open(sys.argv[1], "w"))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_gathers_one_layer_at_a_time(tmp_path):
    """Peak all-gathered parameter bytes per rank: at most one block in the forward, two in the backward (FSDP may
    prefetch the next block's gather), plus the root's own parameters (embeddings, norm, head, adapters). The same
    measurement of the root alone sharded (one group: the whole model gathered at once) holds all 4 blocks and fails
    that bound."""
    torchrun(tmp_path, MEMORY, str(tmp_path / "memory.json"))
    r = json.loads((tmp_path / "memory.json").read_text())
    per, whole = r["per_layer"], r["whole"]
    layer, root_own = per["layer"], per["whole"] - per["blocks"]
    assert per["blocks"] == 4 * layer and per["groups"] == 5, per          # 4 blocks and the root, each gathered alone
    (fwd_blocks, fwd_all), (bwd_blocks, bwd_all) = per["forward"], per["backward"]
    assert layer <= fwd_blocks <= layer and layer <= bwd_blocks <= 2 * layer, per
    assert fwd_all <= root_own + layer and bwd_all <= root_own + 2 * layer, per
    assert per["shards"] <= per["whole"] / 2 + 64, per      # every parameter sharded in two (up to padding)
    # the control: one group gathers every block at once, 4 layers, twice the per-layer bound
    assert whole["groups"] == 1 and whole["forward"][0] == whole["backward"][0] == 4 * layer, whole
    assert whole["forward"][1] == whole["whole"] and max(fwd_all, bwd_all) <= whole["whole"] - 2 * layer, (per, whole)


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


@pytest.mark.slow
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
    got = load_file(out / "adapter_model.safetensors")
    want = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-5, f"the adapters differ by {worst:.3g}"
    assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-3
