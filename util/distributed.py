"""torchrun / DDP helpers. Single-process runs pass through every function unchanged."""
import os

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return rank() == 0


def init_from_env(device_name=None):
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL on CUDA,
    gloo on CPU. -> the device this process uses."""
    from util.misc import pick_device
    device = pick_device(device_name)
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not is_dist():
        local = int(os.environ.get('LOCAL_RANK', '0'))
        if device.type == 'cuda':
            torch.cuda.set_device(local)
            device = torch.device('cuda', local)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice, so a loss
    computed on the gathered global batch gets the same gradients as on one process."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x):
    """[n, ...] on each rank -> [world·n, ...] in rank order (identity without DDP).
    Every rank must hold the same n (use drop_last in the sampler)."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def gather_nograd(x):
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_mean(value):
    if world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world_size()
