"""Exact search over a bank streamed in chunks (issue 12): any chunking, a memory-mapped bank,
and the CLI, all equal to the in-memory search; --bank-fraction is a seeded subset."""
import numpy as np
import pytest

from CSD.scoring import build_score, csd_scores, knn_scores
from util.features import l2_normalize
from util.knn import Bank, ExactKNN


def brute_kth(bank, q, k):
    d = ((q[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize('chunk', [6, 7, 60, 61, 599, 10_000])
def test_streamed_equals_brute_force_for_any_chunking(tmp_path, chunk):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((100, 6, 16)).astype(np.float32)
    np.save(tmp_path / 'features.npy', feats)
    mm = np.load(tmp_path / 'features.npy', mmap_mode='r')           # memory-mapped, never loaded whole
    q = rng.standard_normal((33, 6, 16)).astype(np.float32)
    flat = l2_normalize(feats.reshape(-1, 16))
    search = ExactKNN(Bank(mm, range(6)), bank_chunk=chunk, mem_budget=4 * 16 * 50)   # tiny blocks too
    qn = l2_normalize(q.reshape(-1, 16))
    for k in (1, 5, 17):
        np.testing.assert_allclose(search.kth_distance(qn, k), brute_kth(flat, qn, k), rtol=1e-5, atol=1e-5)
    dist, idx = search.search(qn[:4], 5)
    np.testing.assert_allclose(((qn[:4, None] - flat[idx]) ** 2).sum(-1), dist, rtol=1e-4, atol=1e-5)
    # the score functions keep their signatures and take the memory-mapped bank
    np.testing.assert_allclose(csd_scores(mm, q, 5, bank_chunk=chunk), csd_scores(feats, q, 5), atol=1e-5)
    np.testing.assert_allclose(knn_scores(mm[:, 4], q[:, 4], 3, bank_chunk=chunk), knn_scores(feats[:, 4], q[:, 4], 3),
                               atol=1e-5)
    for method in ('knn', 'local', 'global+center'):
        a = build_score(method, 4, bank_chunk=chunk).fit(mm).score(q)
        b = build_score(method, 4).fit(feats).score(q)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cli_bank_chunk_and_bank_fraction(data_root, tmp_path):
    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ck.pth')
    base = ['--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ck.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', 'csd', '--k', '3', '--search', 'torch']
    whole = csd_cli.main(csd_cli.get_args_parser().parse_args(base))
    streamed = csd_cli.main(csd_cli.get_args_parser().parse_args(base + ['--bank-chunk', '18']))
    for m in ('knn', 'csd'):
        np.testing.assert_allclose(streamed['scores'][m][0], whole['scores'][m][0], atol=1e-5)
        assert streamed['results'][m]['SVHN']['AUROC'] == pytest.approx(whole['results'][m]['SVHN']['AUROC'])
    # --bank-fraction: a seeded subset of the 40 training images, the same on every run
    frac = [csd_cli.main(csd_cli.get_args_parser().parse_args(base + ['--bank-fraction', '0.25', '--cache-dir',
                                                                        str(tmp_path / f'c{i}')]))['splits']['train']
            for i in range(2)]
    assert len(frac[0]['features']) == 10 and np.array_equal(frac[0]['indices'], frac[1]['indices'])
    np.testing.assert_array_equal(frac[0]['features'], whole['splits']['train']['features'][frac[0]['indices']])


def test_cli_max_ood_scores_a_seeded_subset_of_each_ood_set(data_root, tmp_path, capsys):
    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ck.pth')
    base = ['--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ck.pth'), '--data-root', str(data_root),
            '--output-dir', str(tmp_path / 'res'), '--num-workers', '0', '--device', 'cpu',
            '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', '--k', '3', '--search', 'torch']
    whole = csd_cli.main(csd_cli.get_args_parser().parse_args(base + ['--cache-dir', str(tmp_path / 'c')]))
    n_svhn, n_dtd = (len(whole['splits'][n]['features']) for n in ('SVHN', 'dtd'))
    assert min(n_svhn, n_dtd) > 5
    capsys.readouterr()
    runs = [csd_cli.main(csd_cli.get_args_parser().parse_args(base + ['--max-ood', '5', '--cache-dir', str(tmp_path / c)]))
            for c in ('c', 'c2')]   # 'c': the full sets are cached there, the subsets must not be read from them
    out = capsys.readouterr().out
    assert '--max-ood 5: each OOD set is a seeded subset (SVHN 5, dtd 5 images)' in out
    for name in ('SVHN', 'dtd'):
        sub = [r['splits'][name] for r in runs]
        assert len(sub[0]['features']) == 5 and np.array_equal(sub[0]['indices'], sub[1]['indices'])
        np.testing.assert_array_equal(sub[0]['features'], whole['splits'][name]['features'][sub[0]['indices']])
        np.testing.assert_allclose(runs[0]['scores']['knn'][1][name],
                                   whole['scores']['knn'][1][name][sub[0]['indices']], atol=1e-6)
    np.testing.assert_allclose(runs[0]['scores']['knn'][0], whole['scores']['knn'][0], atol=1e-6)   # ID untouched


def test_distance_check_warns_only_when_id_looks_like_ood():
    from CSD.CSD import distance_check
    line, warning = distance_check(-np.full(10, 0.2), {'SVHN': -np.full(5, 0.9), 'dtd': -np.full(5, 1.1)})
    assert line == 'mean k-th distance: ID test 0.2000 | SVHN 0.9000 | dtd 1.1000' and warning is None
    _, warning = distance_check(-np.full(10, 0.98), {'SVHN': -np.full(5, 1.0)})
    assert warning.startswith('WARNING: the ID test images are as far') and 'random' in warning


def test_sanity_warning_fires_on_a_random_weights_model(data_root, tmp_path, capsys):
    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'random.pth')          # never trained: random weights
    csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'random.pth'), '--data-root', str(data_root),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', '--k', '3']))
    out = capsys.readouterr().out
    assert 'mean k-th distance: ID test' in out and 'WARNING: the ID test images are as far from the bank' in out


def test_ivf_probing_every_list_is_exact_and_hnsw_finds_almost_all(tmp_path):
    from util.knn import ApproxKNN
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((400, 6, 8)).astype(np.float32)
    np.save(tmp_path / 'f.npy', feats)
    mm = np.load(tmp_path / 'f.npy', mmap_mode='r')
    flat = l2_normalize(feats.reshape(-1, 8))
    q = l2_normalize(rng.standard_normal((50, 8)).astype(np.float32))
    ivf = ApproxKNN(Bank(mm, range(6)), 'ivf', nlist=8, nprobe=8)          # all lists probed: exact
    np.testing.assert_allclose(ivf.kth_distance(q, 7), brute_kth(flat, q, 7), rtol=1e-4, atol=1e-5)
    assert 'nlist 8, nprobe 8' in ivf.describe
    hnsw = ApproxKNN(flat, 'hnsw', ef_search=256)
    _, got = hnsw.search(q, 10)
    want = np.argsort(((q[:, None] - flat[None]) ** 2).sum(-1), axis=1)[:, :10]
    assert np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, want)]) > 0.95
    # through the score objects, the in-memory and the streamed bank give the same index
    a = build_score('csd', 5, backend='ivf', approx={'nlist': 4, 'nprobe': 4}).fit(feats).score(feats[:9])
    b = build_score('csd', 5, backend='ivf', bank_chunk=60, approx={'nlist': 4, 'nprobe': 4}).fit(mm).score(feats[:9])
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, build_score('csd', 5).fit(feats).score(feats[:9]), atol=1e-5)


def test_ivf_queries_whose_lists_hold_fewer_than_k_vectors_are_probed_wider():
    """nprobe 1 over 40 lists of ~10 vectors with k = 30: faiss returns -1 neighbours for every
    query; those queries are searched again with more lists, so each k-th distance is a real
    one (found on a real bank: nprobe 1 gave -inf scores and the metrics refused them)."""
    from util.knn import ApproxKNN
    rng = np.random.default_rng(5)
    flat = l2_normalize(rng.standard_normal((400, 8)).astype(np.float32))
    q = l2_normalize(rng.standard_normal((25, 8)).astype(np.float32))
    ivf = ApproxKNN(flat, 'ivf', nlist=40, nprobe=1)
    raw_d, raw_i = ivf.index.search(q, 30)
    assert (raw_i < 0).any()                                   # the case: short lists
    d, i = ivf.search(q, 30)
    assert (i >= 0).all() and np.isfinite(d).all() and ivf.widened >= int((raw_i < 0).any(axis=1).sum())
    assert ivf.index.nprobe == 1                               # restored for the next call
    exact = brute_kth(flat, q, 30)
    assert (d[:, -1] >= exact - 1e-5).all()                    # never closer than the true k-th neighbour
    full = ApproxKNN(flat, 'ivf', nlist=40, nprobe=40)
    np.testing.assert_allclose(full.kth_distance(q, 30), exact, rtol=1e-4, atol=1e-5)


def test_cli_search_ivf_prints_recall_and_metric_change(data_root, tmp_path, capsys):
    import json

    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ck.pth')
    argv = ['--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ck.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'csd', '--k', '3', '--search', 'ivf',
            '--ivf-nlist', '2', '--ivf-nprobe', '1']
    out = csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    text = capsys.readouterr().out
    assert 'ivf (IndexIVFFlat, nlist 2, nprobe 1): recall@3 ' in text and 'SVHN FPR ' in text, text
    meta = json.loads(next((tmp_path / 'res').rglob('csd_k3.json')).read_text())['meta']
    check = meta['approximation']
    assert meta['search'] == 'ivf' and 0 < check['recall'] <= 1 and set(check['delta']) == {'SVHN', 'dtd'}
    exact = csd_cli.main(csd_cli.get_args_parser().parse_args(argv[:-6] + ['--search', 'torch']))
    # the reported change is exactly approximate minus exact on the (here: whole) sample
    for n in ('SVHN', 'dtd'):
        assert check['delta'][n]['AUROC'] == pytest.approx(
            100 * (out['results']['csd'][n]['AUROC'] - exact['results']['csd'][n]['AUROC']), abs=1e-9)


def test_streamed_search_through_faiss_knn_gpu_merges_exactly(monkeypatch):
    """The CUDA path of the streamed search (faiss.knn_gpu per chunk, merged in torch), with a
    brute-force stand-in for knn_gpu: the merge equals the exact search for any chunking."""
    from util import knn as knn_lib
    calls = []

    def fake_knn_gpu(res, xq, xb, k, device=0):
        calls.append(len(xb))
        d = ((xq[:, None].astype(np.float64) - xb[None]) ** 2).sum(-1)
        i = np.argsort(d, axis=1, kind='stable')[:, :k]
        return np.take_along_axis(d, i, 1).astype(np.float32), i.astype(np.int64)
    monkeypatch.setattr(knn_lib.faiss, 'knn_gpu', fake_knn_gpu, raising=False)
    monkeypatch.setattr(knn_lib.ExactKNN, '_use_knn_gpu', lambda self, k: True)
    monkeypatch.setattr(knn_lib, 'gpu_resources', lambda: None)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((50, 6, 8)).astype(np.float32)
    q = l2_normalize(rng.standard_normal((20, 8)).astype(np.float32))
    flat = l2_normalize(feats.reshape(-1, 8))
    for chunk in (6, 54, 300):
        d, i = ExactKNN(Bank(feats, range(6)), bank_chunk=chunk).search(q, 9)
        np.testing.assert_allclose(d[:, -1], brute_kth(flat, q, 9), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(((q[:, None] - flat[i]) ** 2).sum(-1), d, rtol=1e-4, atol=1e-5)
    assert calls and max(calls) <= 300


class CountingArray:
    """A read-only [N, 6, C] array that counts what is read from it (calls and numbers)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.reads, self.numbers = a, a.shape, a.dtype, 0, 0

    def __getitem__(self, key):
        out = np.asarray(self.a[key])
        self.reads += 1
        self.numbers += out.size
        return out


@pytest.mark.parametrize('method, scales', [('csd', 6), ('knn', 1), ('global+center', 2)])
def test_streamed_search_reads_each_bank_chunk_once_per_split(method, scales):
    """More queries than one query chunk (16,384 rows), and the bank is still read once: one
    read per bank chunk, of this method's scales only (the KNN bank: 1 of the 6)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((240, 6, 8)).astype(np.float16)
    q = rng.standard_normal((3000, 6, 8)).astype(np.float32)   # 18,000 CSD query vectors
    bank = CountingArray(feats)
    scorer = build_score(method, 5, bank_chunk=60 * scales).fit(bank)
    reads_to_fit = bank.reads, bank.numbers
    got = scorer.score(q)
    assert bank.reads - reads_to_fit[0] == 240 * scales // (60 * scales)         # 4 chunks, each read once
    assert bank.numbers - reads_to_fit[1] == 240 * scales * 8                    # only the method's scales
    np.testing.assert_allclose(got, build_score(method, 5).fit(feats.astype(np.float32)).score(q), atol=1e-5)
    # a group of queries limited by memory reads the bank once per group, and gives the same answers
    few = build_score(method, 5, bank_chunk=60 * scales).fit(bank)
    few.search.query_rows = lambda k: 1000
    before = bank.reads
    np.testing.assert_array_equal(few.score(q), got)
    assert bank.reads - before == 4 * -(-3000 * scales // 1000)
