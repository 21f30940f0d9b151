"""Run PEFT's LoftQ code (peft/utils/loftq_utils.py), which moves tensors to "cuda", on this CPU-only machine: inside
`cuda_as_cpu()` every Tensor.to / Tensor.cuda aimed at a CUDA device stays on the CPU, and so does bitsandbytes'
Params4bit.to (a Python method of the tensor subclass, which torch function modes do not see). PEFT's own functions
then compute the reference numbers; nothing of PEFT is re-implemented here."""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and str(device).split(":")[0] in ("cuda", "xpu")


def _cpu(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple("cpu" if _is_cuda(a) else a for a in args)
    if _is_cuda(kwargs.get("device")):
        kwargs = {**kwargs, "device": "cpu"}
    return args, kwargs


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args, kwargs = _cpu(args, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_as_cpu():
    """Within: "cuda" means the CPU for Tensor.to, Tensor.cuda and bitsandbytes' Params4bit.to; bitsandbytes' own
    torch.compile of its pure-torch 4-bit fallback is off (eager gives the same numbers, without a compile per
    shape)."""
    import bitsandbytes as bnb

    params4bit_to = bnb.nn.Params4bit.to

    def to(self, *args, **kwargs):
        return params4bit_to(self, *_cpu(args, kwargs)[0], **_cpu(args, kwargs)[1])

    bnb.nn.Params4bit.to = to
    try:
        with _CudaAsCpu(), torch._dynamo.config.patch(disable=True):
            yield
    finally:
        bnb.nn.Params4bit.to = params4bit_to
