"""torchrun / DDP helpers. Single-process runs pass through every function unchanged."""
import os

import torch
import torch.distributed as dist

from util.errors import UserError


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def rank_from_env():
    """This process's global rank from the launcher's ``RANK`` (0 without one); still valid
    after the process group is destroyed."""
    return int(os.environ.get('RANK', '0') or 0)


def is_main():
    return rank() == 0


def local_rank(env=None):
    """This process's index on its machine: torchrun's ``LOCAL_RANK``, else Slurm's
    ``SLURM_LOCALID``, else Open MPI's ``OMPI_COMM_WORLD_LOCAL_RANK``. A multi-process launch
    that sets none of them is refused: defaulting to 0 would put every rank on GPU 0."""
    env = os.environ if env is None else env
    for name in ('LOCAL_RANK', 'SLURM_LOCALID', 'OMPI_COMM_WORLD_LOCAL_RANK'):
        if env.get(name, '') != '':
            return int(env[name])
    if int(env.get('WORLD_SIZE', '1')) > 1:
        raise UserError("WORLD_SIZE > 1 but no LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK is set: "
                        "launch with torchrun --nproc_per_node=N (or set LOCAL_RANK per process)")
    return 0


def init_from_env(device_name=None):
    """Start the process group when launched with ``WORLD_SIZE`` > 1 (torchrun, srun, mpirun):
    NCCL on CUDA, gloo on CPU; each process takes GPU ``local_rank()``. -> this process's device."""
    from util.misc import pick_device
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not is_dist():
        local = local_rank()
        device = pick_device(device_name)
        if device.type == 'cuda':
            device = pick_device(f'cuda:{local}')
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
        return device
    return pick_device(device_name)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice, so a loss
    computed on the gathered global batch gets the same gradients as on one process."""

    @staticmethod
    def forward(ctx, x):
        # The receive buffers are allocated from the contiguous tensor that is sent: with
        # empty_like(x) a channels_last x would be received into a different layout.
        x = x.contiguous()
        out = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
        dist.all_gather(out, x)
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        # A fresh buffer: all_reduce works in place, and autograd's incoming gradient may be
        # shared with other consumers.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(x):
    """[n, ...] on each rank -> [world·n, ...] in rank order (identity without DDP).
    Every rank must hold the same n (the DDP loader drops the ragged last batch)."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def gather_nograd(x):
    if world_size() == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, 0)


def gather_objects(obj):
    """Every rank's ``obj`` as a list in rank order (``[obj]`` without DDP)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
