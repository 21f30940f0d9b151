"""Example: a PeftModule sharded per layer with FSDP2 (`fully_shard`), on the shipped corpus (byte-level tiny Llama).

    torchrun --nproc_per_node=2 examples/fsdp_train.py [--steps 8] [--out DIR]    # gloo on CPU, nccl on a GPU
    python examples/fsdp_train.py --single [--steps 8] [--out DIR]     # the same global batches, one process

The PeftModule calls the model's repeated blocks as modules at their own paths (`pm.blocks()`: "model.layers.0", ...),
so `fully_shard` on each block, then on the PeftModule itself, shards the model as FSDP2 shards a transformers model:
each block's base weights are all-gathered just before the block runs (forward and backward) and freed after it; the
root's own parameters (embeddings, final norm, head and the adapter store, whose weights enter each block's call as
its inputs) are gathered once per step. Every rank builds the same model and adapter (a fixed seed), takes its rows of
each global batch (rank r: rows r, r + world, ...), and FSDP reduce-scatters (averages) the gradients, so the adapter
learned equals the one a single process learns on the whole global batches (--single), up to the rounding of summing
the gradient in two halves; plain SGD keeps that rounding at its size (about 1e-7, see examples/ddp_train.py).

Saving: every rank calls `pm.save_adapter(out)`, since gathering the sharded adapter (`DTensor.full_tensor()`) is a
collective; rank 0 alone writes PEFT's format. Prints the loss per step on rank 0.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
SEQ, GLOBAL_BATCH, LAYERS = 32, 8, 4


def model(layers: int = LAYERS, intermediate: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config).eval()


def global_batches(steps: int) -> list[torch.Tensor]:
    """`steps` batches of GLOBAL_BATCH windows of the corpus (bytes), the same on every rank."""
    data = torch.tensor(list(CORPUS.read_bytes()))
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data) - SEQ, (steps, GLOBAL_BATCH), generator=g)
    return [torch.stack([data[i:i + SEQ] for i in row]) for row in starts]


def adapted(base: torch.nn.Module) -> peftc.PeftModule:
    torch.manual_seed(0)
    return peftc.compile(base, peftc.LoRA(r=8, alpha=16, targets="all-linear"))


def shard_(pm: peftc.PeftModule, device: str = "cpu") -> peftc.PeftModule:
    """FSDP2 per layer: each block the forward calls, then the root (its own parameters: embeddings, norm, head,
    the adapters). Changes `pm` in place (its parameters become DTensor shards), and returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device != "cpu" else "cpu", (dist.get_world_size(),))
    for block in pm.blocks().values():
        fully_shard(block, mesh=mesh)
    fully_shard(pm, mesh=mesh)
    return pm


def train(steps: int, out: Path | None, rank: int = 0, world: int = 1, distributed: bool = False,
          device: str = "cpu", pm: peftc.PeftModule | None = None) -> list[float]:
    pm = adapted(model().to(device)) if pm is None else pm
    pm.train()
    if distributed:
        shard_(pm, device)
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.5)   # after sharding: the optimizer holds the shards
    losses = []
    for batch in global_batches(steps):
        rows = batch[rank::world].to(device)            # this rank's share of the global batch
        loss = pm(input_ids=rows, labels=rows).loss
        loss.backward()                                 # FSDP: reduce-scatters (averages) the gradients
        opt.step()
        opt.zero_grad()
        if distributed:                                 # the global batch's loss, for the log
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if out is not None:
        pm.save_adapter(out)                            # every rank: gathers the shards; rank 0 writes
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="where rank 0 saves the adapter")
    ap.add_argument("--single", action="store_true", help="one process on the same global batches")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.single:
        losses, rank = train(args.steps, args.out), 0
    else:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if GLOBAL_BATCH % world:
            raise SystemExit(f"the global batch ({GLOBAL_BATCH}) must divide among {world} processes")
        try:
            losses = train(args.steps, args.out, rank, world, distributed=True, device=device)
        finally:
            dist.destroy_process_group()
    if rank == 0:
        print(" ".join(f"{x:.4f}" for x in losses))
        if args.out is not None:
            print(f"adapter saved to {args.out}")
    return losses


if __name__ == "__main__":
    main()
