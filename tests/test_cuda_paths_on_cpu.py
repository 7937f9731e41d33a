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


# ---------------------------------------------------------------- 7. a GPU this torch has no kernels for
CU130 = ['sm_75', 'sm_80', 'sm_86', 'sm_90', 'sm_100', 'sm_120']   # torch 2.14.1's PyPI build


def test_arch_list_decides_whether_a_gpu_has_kernels():
    assert not misc.arch_supported((7, 0), CU130)            # V100
    assert not misc.arch_supported((6, 0), CU130)            # P100
    assert misc.arch_supported((7, 5), CU130)                # T4
    assert misc.arch_supported((8, 9), CU130)                # L4: sm_86 cubins run on 8.9
    assert misc.arch_supported((9, 0), CU130) and misc.arch_supported((12, 1), CU130)
    assert misc.arch_supported((7, 0), ['sm_50', 'sm_60', 'sm_70', 'sm_75'])
    assert misc.arch_supported((10, 3), ['sm_80', 'compute_90'])    # PTX JIT-compiles forward
    assert not misc.arch_supported((8, 0), ['compute_90'])
    assert not misc.arch_supported((9, 1), ['sm_90a']) and misc.arch_supported((9, 0), ['sm_90a'])
    assert misc.arch_supported((7, 0), [])                   # a CPU build has nothing to say


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: None)
    monkeypatch.setattr(torch.cuda, 'get_arch_list', lambda: CU130)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'Tesla V100-SXM2-32GB')


def test_pick_device_refuses_a_gpu_without_kernels(monkeypatch):
    _fake_gpu(monkeypatch, (7, 0))
    lines = []
    assert misc.pick_device(None, log=lines.append).type == 'cpu'
    assert len(lines) == 1 and 'sm_70' in lines[0] and 'no kernels' in lines[0] and 'cu126' in lines[0]
    with pytest.raises(UserError, match=r'--device cuda:0: Tesla V100.*sm_70.*pip install torch'):
        misc.pick_device('cuda:0')
    _fake_gpu(monkeypatch, (8, 0))
    lines.clear()
    assert misc.pick_device(None, log=lines.append) == torch.device('cuda', 0) and lines == []
    assert misc.pick_device('cuda') == torch.device('cuda', 0)


# ---------------------------------------------------------------- 8. TF32 never reaches the "exact" paths
@pytest.mark.parametrize('caller', ['legacy', 'high', 'new', 'none'])
def test_exact_fp32_turns_tf32_off_and_restores_every_api(tf32_flags, caller):
    """Whatever API the caller used to allow TF32, the guard runs in IEEE fp32 and gives the
    caller's setting back; the flags are process-wide, so the test restores them itself."""
    from util.features import exact_fp32
    matmul, conv = tf32_flags
    if caller == 'legacy':
        matmul.allow_tf32 = True
    elif caller == 'high':
        torch.set_float32_matmul_precision('high')
    elif caller == 'new':
        matmul.fp32_precision = conv.fp32_precision = 'tf32'
    before = matmul.fp32_precision, conv.fp32_precision
    with exact_fp32('cuda'):
        assert (matmul.fp32_precision, conv.fp32_precision) == ('ieee', 'ieee')
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    if caller in ('legacy', 'high'):
        assert matmul.allow_tf32 and torch.get_float32_matmul_precision() == 'high'   # legacy reads still work


def test_exact_search_runs_under_the_fp32_guard(monkeypatch):
    from util import knn
    entered = []

    @__import__('contextlib').contextmanager
    def guard(device):
        entered.append(str(device))
        yield
    monkeypatch.setattr(knn, 'exact_fp32', guard)
    bank = np.random.default_rng(0).standard_normal((200, 6, 8)).astype(np.float32)
    knn.ExactKNN(bank.reshape(-1, 8), backend='torch').kth_distance(bank[:5, 0], 3)
    knn.ExactKNN(knn.Bank(bank, range(6)), bank_chunk=60).kth_distance(bank[:5, 0], 3)
    assert entered == ['cpu', 'cpu']


def test_tf32_override_env_is_said_once(monkeypatch, tf32_flags):
    from util import features
    monkeypatch.setenv('TORCH_ALLOW_TF32_CUBLAS_OVERRIDE', '1')
    monkeypatch.setattr(features, '_warned_override', [])
    with pytest.warns(UserWarning, match='TORCH_ALLOW_TF32_CUBLAS_OVERRIDE'):
        with features.exact_fp32('cuda'):
            pass
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with features.exact_fp32('cuda'):
            pass


# ---------------------------------------------------------------- 9. launchers, timeouts, shutdown
def test_world_and_ranks_from_every_launcher():
    assert dist_lib.launch_from_env({}) == (1, 0, 0)
    assert dist_lib.launch_from_env({'WORLD_SIZE': '8', 'RANK': '5', 'LOCAL_RANK': '1'}) == (8, 5, 1)
    srun = {'SLURM_STEP_NUM_TASKS': '16', 'SLURM_PROCID': '9', 'SLURM_LOCALID': '1', 'SLURM_NTASKS': '16'}
    assert dist_lib.launch_from_env(srun) == (16, 9, 1)
    mpi = {'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '3', 'OMPI_COMM_WORLD_LOCAL_RANK': '3'}
    assert dist_lib.launch_from_env(mpi) == (4, 3, 3)
    # A plain `python ...` inside an sbatch allocation of 4 tasks is one process, not rank 0 of 4.
    assert dist_lib.launch_from_env({'SLURM_NTASKS': '4', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}) == (1, 0, 0)
    with pytest.raises(UserError, match='LOCAL_RANK'):
        dist_lib.launch_from_env({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '3'})


def test_gpu_for_each_local_rank():
    assert [dist_lib.gpu_for(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [dist_lib.gpu_for(r, 1) for r in range(4)] == [0, 0, 0, 0]   # srun --gpus-per-task=1
    with pytest.raises(UserError, match='no CUDA GPU'):
        dist_lib.gpu_for(0, 0)


def test_process_group_gets_rank_world_and_a_long_timeout(monkeypatch):
    import datetime
    seen = {}
    monkeypatch.setattr(dist, 'init_process_group', lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(dist_lib, 'is_dist', lambda: False)
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'MODE_DIST_TIMEOUT_MIN'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
    monkeypatch.setenv('SLURM_PROCID', '1')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    with pytest.raises(UserError, match='MASTER_ADDR and MASTER_PORT'):
        dist_lib.init_from_env('cpu')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', '29500')
    assert dist_lib.init_from_env('cpu').type == 'cpu'
    assert seen == {'backend': 'gloo', 'rank': 1, 'world_size': 2, 'device_id': None,
                    'timeout': datetime.timedelta(minutes=dist_lib.DEFAULT_TIMEOUT_MIN)}
    assert dist_lib.DEFAULT_TIMEOUT_MIN >= 60   # far past NCCL's 10 minutes
    monkeypatch.setenv('MODE_DIST_TIMEOUT_MIN', '5')
    assert dist_lib.timeout_from_env() == datetime.timedelta(minutes=5)
    monkeypatch.setenv('MODE_DIST_TIMEOUT_MIN', 'soon')
    with pytest.raises(UserError, match='MODE_DIST_TIMEOUT_MIN'):
        dist_lib.timeout_from_env()


def test_every_entry_script_ends_its_process_group():
    """destroy_process_group at the end of training and of both test-time scripts (through
    util.distributed.shutdown), so NCCL does not warn about a group left open at exit."""
    import inspect

    from ALPA import main_supcon
    from CSD import CSD as csd_cli
    from CSD import feature_collect
    for fn in (main_supcon.main, csd_cli.main, feature_collect.main):
        assert 'dist_lib.shutdown()' in inspect.getsource(fn), fn.__module__


# ---------------------------------------------------------------- 10. faiss on a GPU: limits and resources
def test_gpu_ivf_past_2048_lists_or_k_runs_on_a_cpu_copy(monkeypatch):
    """faiss-gpu's IVF refuses nprobe or k above 2048; such searches (a widening past 2048
    lists, k = 3000) go to a CPU copy of the index, made once, with the same answers."""
    from util import knn
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((4000, 8)).astype(np.float32)
    ivf = knn.ApproxKNN(bank, 'ivf', nlist=50, nprobe=4)
    plain = ivf.search(bank[:20], 3000)

    class GpuLimited:   # what faiss-gpu's IVF does past its limits
        def __init__(self, index):
            self.index, self.nprobe, self.calls = index, index.nprobe, []

        def search(self, q, k):
            assert k <= 2048 and self.nprobe <= 2048, 'faiss-gpu would raise here'
            self.index.nprobe = self.nprobe
            self.calls.append(k)
            return self.index.search(q, k)
    copies = []
    monkeypatch.setattr(knn.faiss, 'index_gpu_to_cpu', lambda index: copies.append(1) or index.index, raising=False)
    monkeypatch.setattr(knn, 'FAISS_GPU_MAX_K', 2048)
    ivf.index, ivf.on_gpu = GpuLimited(ivf.index), True
    small = ivf.search(bank[:20], 5)
    assert ivf.index.calls == [5]
    np.testing.assert_array_equal(ivf.search(bank[:20], 3000)[1], plain[1])
    np.testing.assert_array_equal(ivf.search(bank[:20], 3000)[1], plain[1])
    assert copies == [1] and ivf.index.calls == [5]
    np.testing.assert_array_equal(ivf.search(bank[:20], 5)[1], small[1])   # back on the GPU index
    assert ivf.index.calls == [5, 5]
    # a widening that passes 2048 lists goes to the copy as well
    ivf._search(bank[:3], 5, 4000)
    assert ivf.index.calls == [5, 5] and copies == [1]


def test_one_faiss_gpu_resource_per_process(monkeypatch):
    from util import knn
    made = []
    monkeypatch.setattr(knn, '_GPU_RESOURCES', [])
    monkeypatch.setattr(knn.faiss, 'StandardGpuResources', lambda: made.append(object()) or made[-1], raising=False)
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: None)
    assert knn.gpu_resources() is knn.gpu_resources() is made[0] and len(made) == 1


def test_bank_norms_without_a_second_bank():
    """‖b‖² block by block: the same numbers as (b*b).sum(1), never an [N, D] temporary."""
    from util.knn import squared_norms
    bank = torch.from_numpy(np.random.default_rng(0).standard_normal((70_001, 24)).astype(np.float32))
    assert torch.equal(squared_norms(bank), (bank * bank).sum(1))
    assert torch.equal(squared_norms(bank, rows=7), (bank * bank).sum(1))
    assert squared_norms(bank[:0]).shape == (0,)
    seen = []
    real_split = torch.Tensor.split
    torch.Tensor.split = lambda self, rows: seen.append(rows) or real_split(self, rows)
    try:
        from util.knn import ExactKNN
        search = ExactKNN(bank.numpy(), backend='torch')
    finally:
        torch.Tensor.split = real_split
    assert seen == [1 << 16] and torch.equal(search.bank_sq, (bank * bank).sum(1))   # the bank goes block by block


def test_fused_sgd_on_gpu_loop_sgd_on_cpu():
    from argparse import Namespace

    from ALPA.main_supcon import make_sgd
    args = Namespace(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_sgd(params, args, torch.device('cuda', 0)).defaults['fused'] is True
    assert not make_sgd(params, args, torch.device('cpu')).defaults['fused']


def test_data_workers_on_a_gpu_box(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert misc.default_workers({}) == 4
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    assert misc.default_workers({}) == 8                          # 64 cores among 8 GPU processes
    assert misc.default_workers({'LOCAL_WORLD_SIZE': '2'}) == 16  # at most 16
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    assert misc.default_workers({}) == 1


def test_each_methods_index_is_gone_before_the_next_is_built(data_root, tmp_path, monkeypatch):
    """CSD.py frees one method's search index (on a GPU: faiss memory outside torch) before it
    builds the next one's."""
    import gc
    import weakref

    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ckpt.pth')
    real, alive = csd_cli.evaluate, []

    def evaluate(*a, **kw):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        out = real(*a, **kw)
        refs.append(weakref.ref(out[2]))
        return out
    refs = []
    monkeypatch.setattr(csd_cli, 'evaluate', evaluate)
    csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ckpt.pth'), '--data-root', str(data_root),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--out-datasets', 'SVHN', '--method', 'knn', 'csd', 'local', '--k', '3', '--search', 'torch']))
    assert alive == [0, 0, 0]
