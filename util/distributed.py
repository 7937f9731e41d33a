"""torchrun / DDP helpers. Single-process runs pass through every function unchanged."""
import datetime
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


# Each launcher's names for (world size, global rank, local rank), in the order they are read.
# Slurm's world is the srun step's task count, not SLURM_NTASKS: a plain `python ...` in an
# sbatch script with --ntasks=4 is one process, not rank 0 of 4.
LAUNCHER_ENV = (('WORLD_SIZE', 'RANK', 'LOCAL_RANK'),                                          # torchrun
                ('SLURM_STEP_NUM_TASKS', 'SLURM_PROCID', 'SLURM_LOCALID'),                     # srun
                ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK'))  # mpirun
# Collectives wait this long before a rank is declared dead. NCCL's default is 10 minutes,
# but rank 0 alone may spend longer on one step (waiting for another job's feature store,
# renaming a finished store) while the others wait in a barrier. MODE_DIST_TIMEOUT_MIN sets it.
DEFAULT_TIMEOUT_MIN = 120


def _env_int(env, name):
    value = env.get(name, '')
    return int(value) if value.strip() != '' else None


def launch_from_env(env=None):
    """(world size, global rank, local rank) from the launcher's variables: torchrun's, else
    Slurm's (``srun``), else Open MPI's (``mpirun``); (1, 0, 0) for a plain process. A
    multi-process launch without a local rank is refused: defaulting to 0 would put every rank
    on GPU 0."""
    env = os.environ if env is None else env
    for world_name, rank_name, local_name in LAUNCHER_ENV:
        world = _env_int(env, world_name)
        if world is None:
            continue
        rank_ = _env_int(env, rank_name) or 0
        local = local_rank(env)
        return world, rank_, local
    return 1, 0, local_rank(env)


def rank_from_env():
    """This process's global rank from the launcher (0 without one); still valid after the
    process group is destroyed."""
    return launch_from_env()[1]


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
    if any((_env_int(env, world) or 1) > 1 for world, _, _ in LAUNCHER_ENV):
        raise UserError("a multi-process launch (WORLD_SIZE, SLURM_STEP_NUM_TASKS or OMPI_COMM_WORLD_SIZE > 1) without "
                        "LOCAL_RANK, SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK: launch with torchrun "
                        "--nproc_per_node=N (or set LOCAL_RANK per process)")
    return 0


def gpu_for(local, visible):
    """The GPU index of local rank ``local`` when ``visible`` GPUs are visible: the local rank
    itself, or modulo ``visible`` when the launcher gives each task its own GPUs
    (``srun --gpus-per-task=1``: every task sees one GPU, index 0)."""
    if visible < 1:
        raise UserError("no CUDA GPU visible to this process")
    return local % visible


def timeout_from_env(env=None):
    """The collectives' timeout (``datetime.timedelta``): ``MODE_DIST_TIMEOUT_MIN`` minutes,
    default ``DEFAULT_TIMEOUT_MIN``."""
    env = os.environ if env is None else env
    minutes = env.get('MODE_DIST_TIMEOUT_MIN', '') or DEFAULT_TIMEOUT_MIN
    try:
        minutes = float(minutes)
    except ValueError:
        raise UserError(f"MODE_DIST_TIMEOUT_MIN={minutes!r}: give a number of minutes") from None
    return datetime.timedelta(minutes=minutes)


def init_from_env(device_name=None):
    """Start the process group when launched with more than one process (torchrun, srun,
    mpirun; ``launch_from_env``): NCCL on CUDA, gloo on CPU, the collectives' timeout from
    ``timeout_from_env``; each process takes GPU ``gpu_for(local rank)``. srun and mpirun set
    no rendezvous address: MASTER_ADDR and MASTER_PORT must be exported. -> this process's device."""
    from util.misc import pick_device
    world, rank_, local = launch_from_env()
    if world > 1 and not is_dist():
        missing = [v for v in ('MASTER_ADDR', 'MASTER_PORT') if not os.environ.get(v)]
        if missing:
            raise UserError(f"{world} processes but {' and '.join(missing)} not set: torchrun sets them; under srun "
                            f"or mpirun export MASTER_ADDR=<first node> MASTER_PORT=<free port>")
        device = pick_device(device_name)
        if device.type == 'cuda':
            device = pick_device(f'cuda:{gpu_for(local, torch.cuda.device_count())}')
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', rank=rank_, world_size=world,
                                timeout=timeout_from_env(), device_id=device if device.type == 'cuda' else None)
        return device
    return pick_device(device_name)


def shutdown():
    """End the process group, if any (NCCL warns about a group left open at exit)."""
    if is_dist():
        dist.destroy_process_group()


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
