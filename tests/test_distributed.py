"""torch.distributed on CPU (gloo, 2 processes under torchrun): a PeftModule in DistributedDataParallel learns the
adapter one process learns on the same global batches, and only the adapter's gradients are communicated."""
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

# examples/ddp_train.py under torchrun, with a DDP comm hook that records which tensors each all-reduce carries
DRIVER = r"""
import json, sys
sys.path.insert(0, %r)
import torch, torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
import ddp_train
SEEN, MODULES = set(), []
class Recorded(ddp_train.DistributedDataParallel):
    def __init__(self, module, **kw):
        super().__init__(module, **kw)
        MODULES.append(module)
        def hook(state, bucket):
            SEEN.update(p.data_ptr() for p in bucket.parameters())
            return default_hooks.allreduce_hook(state, bucket)
        self.register_comm_hook(dist.group.WORLD, hook)
ddp_train.DistributedDataParallel = Recorded
orig = ddp_train.train
def train(*a, **k):
    losses = orig(*a, **k)
    pm = MODULES[0]
    adapter = {p.data_ptr() for p in pm.trainable_parameters()}
    frozen = {p.data_ptr() for p in pm.parameters() if not p.requires_grad}
    if dist.get_rank() == 0:
        with open(sys.argv[-1] + ".sync.json", "w") as f:
            json.dump({"synced": len(SEEN), "adapter": len(adapter), "frozen_synced": len(SEEN & frozen),
                       "all_adapter": SEEN == adapter, "losses": losses}, f)
    return losses
ddp_train.train = train
sys.argv = [sys.argv[0], "--steps", "6", "--out", sys.argv[-1]]
ddp_train.main()
""" % (str(ROOT / "examples"),)


@pytest.mark.slow
def test_ddp_two_gloo_processes_learn_what_one_process_learns(tmp_path):
    import ddp_train

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(driver), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    sync = json.loads(Path(f"{out}.sync.json").read_text())
    # DDP all-reduced exactly the adapter's parameters: no frozen base weight was communicated
    assert sync["all_adapter"] and sync["frozen_synced"] == 0 and sync["synced"] == sync["adapter"] > 0

    torch.set_num_threads(1)
    single = ddp_train.train(6, tmp_path / "single")
    assert max(abs(a - b) for a, b in zip(sync["losses"], single)) <= 1e-5
    assert single[-1] < single[0]
    got, want = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst <= 1e-5, f"the adapters differ by {worst:.3g}"
    moved = max(want[k].abs().max().item() for k in want if "lora_B" in k)
    assert moved > 1e-3                                   # B started at zero: the adapter did train
