"""knn_scores / csd_scores / MultiScaleKNN against brute-force numpy from docs/METHOD.md §2-3."""
import numpy as np
import pytest
import torch

from CSD.scoring import SCALE_SETS, ExactKNN, build_score, csd_scores, knn_scores
from util.errors import UserError
from util.features import SCALES, center_slice, multi_scale_pool


def unit(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10)


def brute_kth(bank, queries, k):
    d = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1)   # [Q, N] squared L2
    return np.sort(d, axis=1)[:, k - 1]


def test_knn_scores_brute_force():
    rng = np.random.default_rng(0)
    bank, q = rng.normal(size=(300, 24)), rng.normal(size=(40, 24))
    for k in (1, 7, 300):
        expect = -brute_kth(unit(bank), unit(q), k)
        np.testing.assert_allclose(knn_scores(bank, q, k), expect, atol=1e-5)


def test_csd_scores_brute_force():
    rng = np.random.default_rng(1)
    bank, q = rng.normal(size=(80, 6, 16)), rng.normal(size=(25, 6, 16))
    flat = unit(bank).reshape(-1, 16)   # all M·N vectors pooled, no labels
    for k in (1, 10, 480):
        per_scale = np.stack([-brute_kth(flat, unit(q[:, s]), k) for s in range(6)], 1)
        np.testing.assert_allclose(csd_scores(bank, q, k), per_scale.max(1), atol=1e-5)


def test_methods_select_their_scales():
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(60, 6, 8)), rng.normal(size=(10, 6, 8))
    for method, scales in SCALE_SETS.items():
        idx = [SCALES.index(s) for s in scales]
        got = build_score(method, k=5).fit(train).score(test)
        flat = unit(train[:, idx]).reshape(-1, 8)
        expect = np.stack([-brute_kth(flat, unit(test[:, i]), 5) for i in idx], 1).max(1)
        np.testing.assert_allclose(got, expect, atol=1e-5)
    # knn is the global vector (index 4) only
    np.testing.assert_allclose(build_score('knn', k=5).fit(train).score(test),
                               knn_scores(train[:, 4], test[:, 4], 5), atol=1e-6)


def test_identical_point_scores_highest():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(50, 6, 8))
    s = csd_scores(bank, np.concatenate([bank[:1], -bank[:1]]), k=1)
    assert s[0] == pytest.approx(0.0, abs=1e-5) and s[0] > s[1]


def test_k_out_of_range_is_user_error():
    with pytest.raises(UserError, match='--k 11'):
        knn_scores(np.ones((10, 4)), np.ones((2, 4)), 11)


def test_torch_backend_matches_faiss():
    rng = np.random.default_rng(4)
    bank, q = unit(rng.normal(size=(200, 16))).astype(np.float32), unit(rng.normal(size=(30, 16))).astype(np.float32)
    search = ExactKNN(bank)
    t = ExactKNN(bank, backend='torch', query_chunk=7)   # also the CUDA-without-faiss-gpu path
    assert (search.backend, t.backend) == ('faiss-cpu', 'torch')
    np.testing.assert_allclose(t.kth_distance(q, 5), search.kth_distance(q, 5), atol=1e-5)
    tiny = ExactKNN(bank, backend='torch', mem_budget=4 * 200 * 4)   # 4-row distance blocks
    assert tiny.block_rows(5) == 3 or tiny.block_rows(5) == 4
    np.testing.assert_allclose(tiny.kth_distance(q, 5), search.kth_distance(q, 5), atol=1e-5)
    bank6, q6 = rng.normal(size=(40, 6, 8)), rng.normal(size=(9, 6, 8))
    np.testing.assert_allclose(csd_scores(bank6, q6, 4, backend='torch'), csd_scores(bank6, q6, 4), atol=1e-5)
    with pytest.raises(UserError, match='--search'):
        ExactKNN(bank, backend='annoy')


def test_multi_scale_pool_order_and_values():
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = multi_scale_pool(fmap)
    assert out.shape == (2, 6, 3)
    f = fmap.numpy()
    expect = [f[:, :, :2, :2], f[:, :, :2, 2:], f[:, :, 2:, :2], f[:, :, 2:, 2:], f, f[:, :, 1:3, 1:3]]
    for s, region in enumerate(expect):
        np.testing.assert_allclose(out[:, s].numpy(), region.mean(axis=(2, 3)), rtol=1e-6)


def test_center_slice():
    assert [center_slice(n) for n in (1, 2, 4, 7, 8)] == [slice(0, 1), slice(0, 2), slice(1, 3), slice(2, 5), slice(2, 6)]


@pytest.mark.parametrize('n', [4 * 256 * 10, 4 * 256 * 10 + 1, 70_001])
@pytest.mark.parametrize('k', [1, 10, 64])
def test_two_pass_smallest_k_equals_topk(n, k):
    """The CPU's two-pass k smallest (group minima first) gives topk's values exactly, with
    indices that point at them: random blocks, blocks full of ties, an inf, a short last group."""
    import torch

    from util.knn import smallest_k
    g = torch.Generator().manual_seed(n + k)
    for block in (torch.rand(37, n, generator=g), torch.randint(0, 50, (37, n), generator=g).float()):
        block[3, -1] = -1.0                                   # the minimum in the short last group
        block[5, :] = float('inf')
        block[5, 17] = 0.5
        if n < 4 * 256 * k:
            continue
        values, idx = smallest_k(block, k)
        ref = block.topk(k, dim=1, largest=False)
        assert torch.equal(values, ref.values)
        assert torch.equal(block.gather(1, idx), values) and (idx < n).all()
        assert len(set(idx[0].tolist())) == k                 # k distinct columns
    assert smallest_k(torch.rand(3, 100), 5)[0].shape == (3, 5)   # small blocks: topk itself
