"""Every CUDA path our users run first, on a real GPU (issue 13). Skipped without CUDA.

``bench/gpu_check.sh`` runs this module and prints one PASS/FAIL line per test; the
tolerances are stated in each test. On CPU these checks have CPU twins in
``tests/test_cuda_paths_on_cpu.py``.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

from tests.fixtures import find_last, tiny_train_argv, train_cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(data_root, save, *extra, script='supcon', epochs=1):
    proc = train_cli(script, tiny_train_argv(data_root, save, *extra, width=8, batch=16, epochs=epochs))
    return find_last(save), proc.stdout


def test_train_amp_bf16(data_root, tmp_path):
    last, out = train(data_root, tmp_path, '--amp', '--device', 'cuda')
    raw = torch.load(last, weights_only=False)
    assert 'cuda' in raw['rng'][0] and torch.is_tensor(raw['rng'][0]['cuda'])   # one state: the device in use


def test_train_fp16_gradscaler_saved_and_resumed(data_root, tmp_path):
    # bf16 forced off: the fp16 + GradScaler path of pre-Ampere GPUs, run here.
    argv = ['--dataset', 'cifar10', '--data-root', str(data_root), '--model', 'resnet18', '--width', '8',
            '--batch-size', '16', '--learning-rate', '0.05', '--num-workers', '0', '--save-folder', str(tmp_path),
            '--eval', 'none', '--amp', '--amp-dtype', 'fp16', '--device', 'cuda', '--resume', 'auto']
    for epochs in ('1', '2'):
        proc = subprocess.run([sys.executable, os.path.join(REPO, 'ALPA', 'main_supcon.py'), *argv, '--epochs', epochs],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = [os.path.join(d, 'last.pth') for d, _, fs in os.walk(tmp_path) if 'last.pth' in fs][0]
    raw = torch.load(last, weights_only=False)
    assert raw['epoch'] == 2 and raw['scaler'] and raw['scaler']['scale'] > 0 and 'resumed from' in proc.stdout


def test_alpa_train_with_dropout_then_finetune(data_root, tmp_path):
    last, _ = train(data_root, tmp_path / 'a', '--alpa-train', '--drop-prob', '0.1', '--device', 'cuda')
    ft, _ = train(data_root, tmp_path / 'b', '--alpa-finetune', '--ckp', last, '--device', 'cuda:0')
    assert torch.load(ft, weights_only=False)['attention']


def test_resume_with_more_saved_cuda_states_than_gpus(data_root, tmp_path):
    last, _ = train(data_root, tmp_path, '--device', 'cuda')
    raw = torch.load(last, weights_only=False)
    state = raw['rng'][0]
    state['cuda'] = [state['cuda']] * (torch.cuda.device_count() + 3)   # saved on a bigger machine
    torch.save(raw, last)
    _, out = train(data_root, tmp_path, '--device', 'cuda', '--resume', 'auto', epochs=2)
    assert 'resumed from' in out


def test_alpa_gradcheck_float64_and_reference_on_cuda():
    from ALPA.attention import AttentionSimilarity
    from ALPA.reference import reference_similarity
    torch.manual_seed(0)
    att = AttentionSimilarity(6, 4).double().cuda()
    x = torch.randn(4, 6, 2, 2, dtype=torch.float64, device='cuda', requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: att(t), (x,), atol=1e-6)
    np.testing.assert_allclose(att(x).detach().cpu().numpy(), reference_similarity(att, x, x).detach().cpu().numpy(),
                               rtol=1e-9, atol=1e-9)


def test_nccl_world_size_one(tmp_path):
    code = f'''
import os, torch, torch.distributed as dist, sys
sys.path.insert(0, {REPO!r})
os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29533', RANK='0', WORLD_SIZE='1', LOCAL_RANK='0')
dist.init_process_group('nccl', device_id=torch.device('cuda', 0))
from util.distributed import _GatherWithGrad
x = torch.randn(3, 4, 2, 2, device='cuda').contiguous(memory_format=torch.channels_last).requires_grad_()
y = _GatherWithGrad.apply(x)
assert torch.equal(y, x)
y.sum().backward()
assert torch.equal(x.grad, torch.ones_like(x))
m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).cuda()
ddp = torch.nn.parallel.DistributedDataParallel(m, device_ids=[0], find_unused_parameters=True)
ddp.module[0](torch.randn(2, 4, device='cuda')).sum().backward()   # second layer unused
dist.destroy_process_group()
print('ok')
'''
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize('tf32', [False, True])
def test_features_and_scores_cuda_equal_cpu(data_root, tmp_path, tf32, tf32_flags):
    """feature_collect + CSD.py on cuda (torch and faiss search) against CPU, fp32 stores (an
    fp16 store's rounding step is far above the tolerance). Features and the exact search run
    with TF32 off whatever the global setting, so they agree to 1e-4 (relative)."""
    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    matmul, conv = tf32_flags
    matmul.fp32_precision = conv.fp32_precision = 'tf32' if tf32 else 'ieee'
    authors_checkpoint(tmp_path / 'ckpt.pth')
    out = {}
    for device, search in (('cpu', 'torch'), ('cuda', 'torch'), ('cuda', 'faiss')):
        out[device, search] = csd_cli.main(csd_cli.get_args_parser().parse_args([
            '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ckpt.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', device, '--search', search, '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', 'csd',
            '--k', '5', '3', '--dtype', 'fp32']))
    ref = out['cpu', 'torch']
    for key, got in out.items():
        np.testing.assert_allclose(got['splits']['test']['features'], ref['splits']['test']['features'],
                                   rtol=1e-4, atol=1e-5)
        for m in ('knn', 'csd'):
            np.testing.assert_allclose(got['scores'][m][0], ref['scores'][m][0], rtol=1e-4, atol=1e-5)


def test_exact_search_ignores_tf32_high_precision(tf32_flags):
    """set_float32_matmul_precision('high') (TF32) must not reach the exact torch search: its
    distances equal a float64 reference to fp32 rounding, not TF32's ~1e-3."""
    from util.knn import Bank, ExactKNN
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((2000, 256)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)    # the streamed bank normalises its rows itself
    q = 2 * rng.standard_normal((500, 256)).astype(np.float32)
    torch.set_float32_matmul_precision('high')
    d = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    for search in (ExactKNN(bank, device='cuda', backend='torch'),
                   ExactKNN(Bank(bank[:, None], [0]), device='cuda', bank_chunk=700)):
        np.testing.assert_allclose(search.kth_distance(q, 10), np.sort(d, axis=1)[:, 9], rtol=2e-5)
    assert torch.get_float32_matmul_precision() == 'high'   # the caller's setting is left as it was


def test_this_gpu_has_kernels_in_this_torch():
    from util.misc import arch_supported
    cap = torch.cuda.get_device_capability(0)
    print(f"sm_{cap[0]}{cap[1]} against {' '.join(torch.cuda.get_arch_list())}")
    assert arch_supported(cap, torch.cuda.get_arch_list())


def test_alpa_step_peak_memory_is_tiled():
    """A 512-view step of 7x7 maps (one whole [Nb, m, X] fp32 buffer: 2.4 GiB): with the GPU's
    tiles the peak of forward + backward stays under P + 3 GiB, where whole-tensor buffers held 3-5."""
    from ALPA.attention import AttentionSimilarity
    att = AttentionSimilarity(512, 80).cuda()
    x = torch.randn(512, 512, 7, 7, device='cuda', requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    att(x).sum().backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    whole = 512 * 49 * 512 * 49 * 4 / 2**30
    print(f"ALPA 512 views of 7x7: peak {peak:.2f} GiB above the inputs, one whole buffer {whole:.2f} GiB")
    assert peak < whole + 3


def test_odin_on_cuda_equals_cpu():
    from CSD.baselines import odin_scores
    from util.networks import build_model
    torch.manual_seed(0)
    model = build_model('resnet18-ce', width=8, num_classes=5).eval()
    x = torch.randn(10, 3, 32, 32)
    loader = [(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))]
    cpu = odin_scores(model, loader, torch.device('cpu'), (0.2, 0.3, 0.4))
    gpu = odin_scores(model.cuda(), loader, torch.device('cuda'), (0.2, 0.3, 0.4), batch_size=3)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-6)


def test_search_peak_gpu_memory_under_budget():
    from util.knn import ExactKNN
    bank = np.random.default_rng(0).standard_normal((300_000, 512)).astype(np.float32)
    q = np.random.default_rng(1).standard_normal((8192, 512)).astype(np.float32)
    budget = 512 << 20
    search = ExactKNN(bank, device='cuda', backend='torch', mem_budget=budget)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    search.kth_distance(q, 10)
    peak = torch.cuda.max_memory_allocated() - base
    print(f'peak above the bank: {peak / 2**20:.0f} MiB (budget {budget / 2**20:.0f} MiB)')
    assert peak <= budget * 1.25


def test_faiss_gpu_k_2049():
    from util.knn import ExactKNN, _faiss_gpu_available
    bank = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32)
    q = bank[:7]
    s = ExactKNN(bank, device='cuda', backend='faiss', k_max=2049)
    if _faiss_gpu_available():
        assert s.backend == 'torch'
    cpu = ExactKNN(bank, backend='torch').kth_distance(q, 2049)
    np.testing.assert_allclose(s.kth_distance(q, 2049), cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('bench', [['bench/bench_csd.py', '--repeats', '1', '--device', 'cuda'],
                                   ['bench/bench_alpa.py', '--repeats', '1', '--device', 'cuda'],
                                   ['bench/bench_train_step.py', '--repeats', '1', '--device', 'cuda']])
def test_benchmarks_run_on_cuda(bench):
    proc = subprocess.run([sys.executable, *bench], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout[-1500:])


def test_streamed_search_on_gpu_equals_cpu_exact():
    """The streamed bank on the GPU (faiss.knn_gpu per chunk when faiss has GPU support, else
    the torch blocks) gives the CPU's exact k-th distances."""
    from util.knn import Bank, ExactKNN, _faiss_gpu_available
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((20_000, 6, 128)).astype(np.float16)
    q = rng.standard_normal((3000, 128)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gpu = ExactKNN(Bank(feats, range(6)), device='cuda', bank_chunk=30_000)
    cpu = ExactKNN(Bank(feats, range(6)), device='cpu', bank_chunk=30_000)
    print(f"streamed GPU search through {'faiss.knn_gpu' if _faiss_gpu_available() else 'torch blocks'}")
    np.testing.assert_allclose(gpu.kth_distance(q, 50), cpu.kth_distance(q, 50), rtol=1e-4, atol=1e-4)


def test_ivf_on_gpu_k_above_2048_runs_on_the_cpu_copy():
    from util.knn import ApproxKNN
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((20_000, 32)).astype(np.float32)
    ivf = ApproxKNN(bank, 'ivf', device='cuda', nlist=64, nprobe=64)
    d, i = ivf.search(bank[:50], 3000)                      # k > 2048: faiss-gpu would raise
    assert (i >= 0).all() and d.shape == (50, 3000)
    print(f"ivf on {'the GPU' if ivf.on_gpu else 'the CPU'}: k 3000 through "
          f"{'the CPU copy' if ivf.cpu_index is not None else 'the index itself'}")


def test_ivf_on_gpu_recall():
    from util.knn import ApproxKNN, ExactKNN
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 64)).astype(np.float32)
    bank = centers[rng.integers(0, 50, 50_000)] + 0.3 * rng.standard_normal((50_000, 64)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    ivf = ApproxKNN(bank, 'ivf', device='cuda', nprobe=16)
    _, got = ivf.search(bank[:500], 10)
    _, want = ExactKNN(bank, backend='torch').search(bank[:500], 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, want)])
    print(f"{ivf.describe} on {'the GPU' if ivf.on_gpu else 'the CPU (faiss without GPU support)'}: "
          f"recall@10 {recall:.3f}")
    assert recall > 0.9


def test_torchrun_nccl_extraction_equals_one_process(data_root, tmp_path):
    """torchrun on every visible GPU (NCCL; one process when there is one GPU) writes the
    same fp32 store as one process on GPU 0, to float tolerance."""
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ck.pth')
    argv = ['CSD/feature_collect.py', '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ck.pth'), '--name', 'r',
            '--data-root', str(data_root), '--num-workers', '0', '--batch-size', '8', '--out-datasets', 'SVHN',
            '--dtype', 'fp32']
    env = {**os.environ, 'PYTHONPATH': REPO}
    n = torch.cuda.device_count()
    one = subprocess.run([sys.executable, *argv, '--cache-dir', str(tmp_path / 'one')], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    many = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
                           *argv, '--cache-dir', str(tmp_path / 'many')], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert many.returncode == 0, (many.stderr + many.stdout)[-3000:]
    print(f"torchrun with {n} process(es): " + ' | '.join(l for l in many.stdout.splitlines() if l.startswith('rank ')))
    for f in sorted((tmp_path / 'one').rglob('features.npy')):
        other = tmp_path / 'many' / f.relative_to(tmp_path / 'one')
        np.testing.assert_allclose(np.load(other), np.load(f), rtol=1e-4, atol=1e-5)
