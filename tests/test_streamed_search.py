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
    from tests.test_e2e_csd import authors_checkpoint
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


def test_distance_check_warns_only_when_id_looks_like_ood():
    from CSD.CSD import distance_check
    line, warning = distance_check(-np.full(10, 0.2), {'SVHN': -np.full(5, 0.9), 'dtd': -np.full(5, 1.1)})
    assert line == 'mean k-th distance: ID test 0.2000 | SVHN 0.9000 | dtd 1.1000' and warning is None
    _, warning = distance_check(-np.full(10, 0.98), {'SVHN': -np.full(5, 1.0)})
    assert warning.startswith('WARNING: the ID test images are as far') and 'random' in warning


def test_sanity_warning_fires_on_a_random_weights_model(data_root, tmp_path, capsys):
    from CSD import CSD as csd_cli
    from tests.test_e2e_csd import authors_checkpoint
    authors_checkpoint(tmp_path / 'random.pth')          # never trained: random weights
    csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'random.pth'), '--data-root', str(data_root),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', '--k', '3']))
    out = capsys.readouterr().out
    assert 'mean k-th distance: ID test' in out and 'WARNING: the ID test images are as far from the bank' in out
