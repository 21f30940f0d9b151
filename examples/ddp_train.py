"""Example: a PeftModule in DistributedDataParallel, on the shipped corpus (byte-level tiny Llama, random weights).

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 8] [--out DIR]      # gloo on CPU, nccl on a GPU
    python examples/ddp_train.py --single [--steps 8] [--out DIR]                   # the same global batches, one process

Every rank builds the same model and adapter (a fixed seed; DDP also broadcasts rank 0's parameters), takes its rows
of each global batch (rank r: rows r, r + world, ...), and DDP averages the gradients. Only the adapter's parameters
require grad, so only they are synchronised: the base weights are frozen and never communicated after the start. Each
row has the same number of tokens, so the mean over ranks of each rank's mean loss is the global batch's mean loss, and
the adapter learned equals the one a single process learns on the whole global batches (--single), up to the rounding
of summing the gradient in two halves. Plain SGD keeps that rounding at its size (about 1e-7); Adam divides each
update by the root of its second moment and magnifies it where a gradient is near zero (2.6e-5 after 6 steps here).
Rank 0 alone saves the adapter, in PEFT's format. Prints the loss per step on rank 0.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peftc  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"
SEQ, GLOBAL_BATCH = 32, 8


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config).eval()


def global_batches(steps: int) -> list[torch.Tensor]:
    """`steps` batches of GLOBAL_BATCH windows of the corpus (bytes), the same on every rank."""
    data = torch.tensor(list(CORPUS.read_bytes()))
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data) - SEQ, (steps, GLOBAL_BATCH), generator=g)
    return [torch.stack([data[i:i + SEQ] for i in row]) for row in starts]


def train(steps: int, out: Path | None, rank: int = 0, world: int = 1, distributed: bool = False,
          device: str = "cpu") -> list[float]:
    torch.manual_seed(0)
    pm = peftc.compile(model().to(device), peftc.LoRA(r=8, alpha=16, targets="all-linear"))
    pm.train()
    net = DistributedDataParallel(pm, device_ids=None if device == "cpu" else [device]) if distributed else pm
    opt = torch.optim.SGD(pm.trainable_parameters(), lr=0.5)
    losses = []
    for batch in global_batches(steps):
        rows = batch[rank::world].to(device)            # this rank's share of the global batch
        loss = net(input_ids=rows, labels=rows).loss
        loss.backward()                                 # DDP: all-reduces (averages) the adapter's gradients
        opt.step()
        opt.zero_grad()
        if distributed:                                 # the global batch's loss, for the log
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    if out is not None and rank == 0:
        pm.save_adapter(out)                            # rank 0 only: one writer
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="where rank 0 saves the adapter")
    ap.add_argument("--single", action="store_true", help="one process on the same global batches")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
