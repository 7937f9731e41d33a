"""The CUDA-path decisions that can be checked without a GPU (issue 13): the search's memory
budget, the bf16 decision, per-rank RNG after a gloo resume, the LOCAL_RANK fallback, the
gather's memory layout, and the loud line for an NVIDIA GPU that torch cannot use."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from util import checkpoint as ckpt_lib
from util import distributed as dist_lib
from util import misc
from util.errors import UserError
from util.knn import ExactKNN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- 1. the search's memory budget
def test_block_rows_follow_the_budget():
    bank = np.random.default_rng(0).standard_normal((10_000, 8)).astype(np.float32)
    search = ExactKNN(bank, backend='torch', mem_budget=4 * 10_000 * 100)   # room for ~100 rows
    assert 95 <= search.block_rows(10) <= 100
    # Any budget gives the same distances as a float64 brute force.
    q = np.random.default_rng(1).standard_normal((257, 8)).astype(np.float32)
    d2 = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    expect = np.sort(d2, axis=1)[:, 4]
    for budget in (4 * 10_000, 4 * 10_000 * 7, None):
        got = ExactKNN(bank, backend='torch', mem_budget=budget).kth_distance(q, 5)
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_search_peak_memory_is_bounded():
    """200k x 256 bank, 8192 queries: peak RSS above the bank (measured by the kernel, VmHWM)
    stays within 1.5 GiB. The old code held three [4096, N] fp32 blocks: ~9.8 GB here."""
    script = textwrap.dedent('''
        import numpy as np, torch, sys
        sys.path.insert(0, %r)
        from CSD.scoring import knn_scores
        torch.set_num_threads(2)
        def hwm():
            for line in open('/proc/self/status'):
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        bank = np.random.default_rng(0).standard_normal((200_000, 256), dtype=np.float32)
        q = np.random.default_rng(1).standard_normal((8192, 256), dtype=np.float32)
        base = hwm()
        s = knn_scores(bank, q, 50, backend='torch')
        assert np.isfinite(s).all()
        print((hwm() - base) / 2**30)
    ''' % REPO)
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    above = float(proc.stdout.strip().splitlines()[-1])
    assert above < 1.5, f"{above:.2f} GiB above the bank"


# ---------------------------------------------------------------- 2. the bf16 decision
def test_amp_dtype_excludes_emulated_bf16(monkeypatch):
    calls = []

    def fake_bf16(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation   # a V100: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', fake_bf16)
    monkeypatch.setattr(torch.cuda, 'device', lambda d: __import__('contextlib').nullcontext())
    assert misc.autocast_dtype(torch.device('cuda', 0), True) == torch.float16
    assert calls == [False]
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # A100
    assert misc.autocast_dtype(torch.device('cuda', 0), True) == torch.bfloat16
    assert misc.autocast_dtype(torch.device('cuda', 0), False) is None


def test_cpu_amp_only_with_native_bf16(monkeypatch):
    monkeypatch.setattr(misc, 'cpu_has_native_bf16', lambda: False)
    assert misc.autocast_dtype(torch.device('cpu'), True) is None
    monkeypatch.setattr(misc, 'cpu_has_native_bf16', lambda: True)
    assert misc.autocast_dtype(torch.device('cpu'), True) == torch.bfloat16


def test_rng_state_saves_only_the_device_in_use(monkeypatch):
    state = ckpt_lib.rng_state(torch.device('cpu'))
    assert 'cuda' not in state            # nothing per visible GPU on a CPU run
    torch.manual_seed(3)
    ckpt_lib.set_rng_state(state, torch.device('cpu'))
    a = torch.rand(3)
    ckpt_lib.set_rng_state(state, torch.device('cpu'))
    assert torch.equal(a, torch.rand(3))
    # An old checkpoint with one state per GPU (8 GPUs) resumed on a machine with 1 GPU:
    # the state of the device in use is picked, no IndexError.
    seen = []
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, d: seen.append((int(s[0]), d)))
    old = dict(state, cuda=[torch.tensor([i], dtype=torch.uint8) for i in range(8)])
    ckpt_lib.set_rng_state(old, torch.device('cuda', 0))
    assert seen == [(0, torch.device('cuda', 0))]


# ---------------------------------------------------------------- 3. per-rank RNG after a gloo resume
def _rng_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    saved = ckpt_lib.rank_rng_states(torch.device('cpu'))        # what a checkpoint stores
    expect = (torch.rand(4), np.random.rand(2))                 # what this rank draws next
    torch.manual_seed(0)
    np.random.seed(0)                                           # a fresh process after a crash
    ckpt_lib.restore_rank_rng(saved, torch.device('cpu'))
    torch.save({'saved_len': len(saved), 'expect': expect, 'got': (torch.rand(4), np.random.rand(2))},
               out.format(rank))
    dist.destroy_process_group()


def test_each_rank_resumes_with_its_own_rng(tmp_path):
    out = str(tmp_path / 'rank{}.pt')
    mp.spawn(_rng_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r = [torch.load(out.format(i), weights_only=False) for i in range(2)]
    for x in r:
        assert x['saved_len'] == 2
        assert torch.equal(x['got'][0], x['expect'][0]) and np.array_equal(x['got'][1], x['expect'][1])
    assert not torch.equal(r[0]['got'][0], r[1]['got'][0])    # ranks differ after the resume


# ---------------------------------------------------------------- 4. LOCAL_RANK fallback
def test_local_rank_fallbacks():
    assert dist_lib.local_rank({'LOCAL_RANK': '3', 'SLURM_LOCALID': '1'}) == 3
    assert dist_lib.local_rank({'WORLD_SIZE': '8', 'SLURM_LOCALID': '5'}) == 5
    assert dist_lib.local_rank({'WORLD_SIZE': '8', 'OMPI_COMM_WORLD_LOCAL_RANK': '2'}) == 2
    assert dist_lib.local_rank({}) == 0
    with pytest.raises(UserError, match='torchrun'):
        dist_lib.local_rank({'WORLD_SIZE': '4'})


# ---------------------------------------------------------------- 5. gather contiguity
def _gather_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = dist_lib.gather_with_grad(x)
    upstream = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
    kept = upstream.clone()
    y.backward(upstream)
    torch.save({'x': x.detach().contiguous(), 'y': y.detach(), 'grad': x.grad, 'upstream_intact':
                torch.equal(upstream, kept)}, out.format(rank))
    dist.destroy_process_group()


def test_gather_of_channels_last_is_exact(tmp_path):
    out = str(tmp_path / 'g{}.pt')
    mp.spawn(_gather_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r = [torch.load(out.format(i), weights_only=False) for i in range(2)]
    expect = torch.cat([r[0]['x'], r[1]['x']])
    for i, x in enumerate(r):
        assert torch.equal(x['y'], expect)                      # not scrambled by the layout
        assert x['upstream_intact']                             # backward left the incoming gradient alone
        upstream = torch.arange(expect.numel(), dtype=torch.float32).reshape(expect.shape)
        assert torch.equal(x['grad'], (2 * upstream)[2 * i:2 * i + 2])   # summed over both ranks


# ---------------------------------------------------------------- 6. the loud line
def test_loud_line_when_nvidia_present_but_cuda_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(misc, 'nvidia_device_present', lambda: True)
    lines = []
    assert misc.pick_device(None, log=lines.append).type == 'cpu'
    assert len(lines) == 1 and 'NVIDIA GPU is present' in lines[0] and 'driver' in lines[0]
    with pytest.raises(UserError, match='driver is probably older'):
        misc.pick_device('cuda')
    monkeypatch.setattr(misc, 'nvidia_device_present', lambda: False)
    lines.clear()
    assert misc.pick_device(None, log=lines.append).type == 'cpu' and lines == []
    with pytest.raises(UserError, match='no NVIDIA GPU'):
        misc.pick_device('cuda:1')


def test_faiss_gpu_k_limit_routes_to_torch(monkeypatch):
    """k > 2048 on CUDA never reaches faiss-gpu (it raises there): the torch backend is used."""
    from util import knn
    monkeypatch.setattr(knn, '_faiss_gpu_available', lambda: True)
    bank = np.zeros((3000, 4), dtype=np.float32)
    moved = []
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *a, **k: moved.append(a) or self)
    s = knn.ExactKNN(bank, device='cuda:0', backend='faiss', k_max=2049)
    assert s.backend == 'torch' and moved == [(torch.device('cuda', 0),)]
