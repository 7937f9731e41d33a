"""cal_metric against slow references written from docs/METHOD.md §6, scikit-learn, and exact answers."""
import numpy as np
import pytest
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from util.metrics import cal_metric, format_table, results_table, write_results


# ---------------------------------------------------------------- slow references
def ref_fpr(known, novel):
    ks = sorted(known)
    thr = ks[round(0.05 * len(ks))]
    return sum(1 for s in novel if s > thr) / len(novel)


def ref_auroc(known, novel):
    total = 0.0
    for a in known:
        for b in novel:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(known) * len(novel))


def ref_authors_curve(known, novel):
    """(AUIN, AUOUT, DTERR) as docs/METHOD.md §6 describes the authors' (= knn-ood's) code, one
    Python loop: sweep a threshold down through the pooled sorted scores, one point per
    distinct score, from (tp, fp) = (n_ID, n_OOD) to (0, 0); AUIN = trapezoid of
    tp/(tp+fp) over tpr on the points with tp+fp > 0, closed by precision 0 at tpr 0;
    AUOUT = trapezoid of (n_OOD-fp)/((n_ID-tp)+(n_OOD-fp)) over 1-fpr, opened by precision 0
    at 1-fpr = 0; DTERR = min over the sweep of (n_ID - tp + fp)/(n_ID + n_OOD)."""
    n_in, n_out = len(known), len(novel)
    points = [(n_in, n_out)]
    for t in sorted(set(known) | set(novel)):          # threshold rises past each value
        points.append((sum(1 for s in known if s > t), sum(1 for s in novel if s > t)))
    auin_pts = [(tp / n_in, tp / (tp + fp)) for tp, fp in points if tp + fp > 0] + [(0.0, 0.0)]
    auout_pts = [(0.0, 0.0)] + [(1 - fp / n_out, (n_out - fp) / ((n_in - tp) + (n_out - fp)))
                                for tp, fp in points if (n_in - tp) + (n_out - fp) > 0]

    def trapezoid(pts):
        return abs(sum((pts[i + 1][0] - pts[i][0]) * (pts[i + 1][1] + pts[i][1]) / 2 for i in range(len(pts) - 1)))
    dterr = min((n_in - tp + fp) / (n_in + n_out) for tp, fp in points)
    return trapezoid(auin_pts), trapezoid(auout_pts), dterr


def arrays(seed, tie_heavy):
    rng = np.random.default_rng(seed)
    n1, n0 = rng.integers(1, 120, size=2)
    if tie_heavy:
        return rng.integers(0, 5, n1).astype(float), rng.integers(0, 4, n0).astype(float)
    return rng.normal(1, 1, n1), rng.normal(0, 1, n0)


@pytest.mark.parametrize('seed', range(20))
@pytest.mark.parametrize('tie_heavy', [False, True])
def test_cal_metric_matches_slow_reference(seed, tie_heavy):
    known, novel = arrays(seed, tie_heavy)
    m = cal_metric(known, novel)
    assert m['FPR'] == pytest.approx(ref_fpr(list(known), list(novel)), abs=1e-12)
    assert m['AUROC'] == pytest.approx(ref_auroc(known, novel), abs=1e-12)
    auin, auout, dterr = ref_authors_curve(list(known), list(novel))
    assert abs(m['AUIN'] - auin) < 1e-9 and abs(m['AUOUT'] - auout) < 1e-9 and abs(m['DTERR'] - dterr) < 1e-12


@pytest.mark.parametrize('seed', range(10))
@pytest.mark.parametrize('tie_heavy', [False, True])
def test_agrees_with_sklearn(seed, tie_heavy):
    known, novel = arrays(seed + 100, tie_heavy)
    y = np.r_[np.ones(len(known)), np.zeros(len(novel))]
    s = np.r_[known, novel]
    m = cal_metric(known, novel, ood_positive_fpr=True)
    assert abs(m['AUROC'] - roc_auc_score(y, s)) < 1e-9
    # OpenOOD convention: OOD positive, FPR over ID at the first TPR >= 0.95
    fpr, tpr, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    assert abs(m['FPR_OODpos'] - fpr[np.argmax(tpr >= 0.95)]) < 1e-12


def test_exact_small_case():
    known = np.arange(1, 21, dtype=float)        # 20 ID scores 1..20; round(0.05*20)=1 -> threshold 2
    novel = np.array([0.5, 1.5, 2.0, 2.5, 30.0])  # strictly above 2: 2.5 and 30
    m = cal_metric(known, novel)
    assert m['FPR'] == 2 / 5
    # pairs (a > b): 0.5 -> 20, 1.5 -> 19, 2.0 -> 18 + tie 0.5, 2.5 -> 18, 30 -> 0
    assert m['AUROC'] == pytest.approx((20 + 19 + 18.5 + 18 + 0) / 100)


def test_round_half_to_even_threshold():
    # n=10 -> round(0.5) = 0 (Python's round), threshold is the minimum ID score
    known = np.arange(10, dtype=float)
    assert cal_metric(known, np.array([0.0, 0.5]))['FPR'] == 0.5
    # n=30 -> round(1.5) = 2 -> threshold 2
    known = np.arange(30, dtype=float)
    assert cal_metric(known, np.array([1.5, 2.0, 2.5]))['FPR'] == pytest.approx(1 / 3)


def test_inputs_not_mutated():
    rng = np.random.default_rng(0)
    known, novel = rng.normal(size=50), rng.normal(size=40)
    k0, n0 = known.copy(), novel.copy()
    cal_metric(known, novel, ood_positive_fpr=True)
    assert np.array_equal(known, k0) and np.array_equal(novel, n0)


def test_authors_pr_convention_exact_answers():
    """A perfect detector: precision 1 from tpr 1 down to 1/n, then the authors' closing
    point (tpr 0, precision 0) costs a triangle of 1/(2n). AUOUT likewise, mirrored."""
    for n_in, n_out in ((1, 1), (2, 2), (5, 3), (40, 7)):
        known, novel = np.arange(n_in) + 100.0, np.arange(n_out, dtype=float)
        m = cal_metric(known, novel)
        assert m['AUIN'] == pytest.approx(1 - 1 / (2 * n_in), abs=1e-15)
        assert m['AUOUT'] == pytest.approx(1 - 1 / (2 * n_out), abs=1e-15)
        assert m['DTERR'] == 0.0
    # All scores tied: one operating point (1, 1) besides (0, 0); precision there n_in/(n_in+n_out).
    m = cal_metric(np.zeros(3), np.zeros(1))
    assert m['AUIN'] == pytest.approx(0.75 / 2) and m['AUOUT'] == pytest.approx(0.25 / 2)
    assert m['AUROC'] == 0.5 and m['DTERR'] == pytest.approx(1 / 4)


def test_authors_pr_differs_from_sklearn_trapezoid():
    """The convention matters: sklearn's curve starts at precision 1, so its trapezoid area is
    larger by about 1/(2 n_ID) on a perfect detector -- the gap issue 8 measured."""
    known, novel = np.arange(4) + 10.0, np.arange(4, dtype=float)
    y, s = np.r_[np.ones(4), np.zeros(4)], np.r_[known, novel]
    p, r, _ = precision_recall_curve(y, s)
    assert auc(r, p) == pytest.approx(1.0) and cal_metric(known, novel)['AUIN'] == pytest.approx(1 - 1 / 8)


def test_perfect_and_inverted():
    m = cal_metric(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert (m['FPR'], m['AUROC'], m['AUIN'], m['AUOUT']) == (0.0, 1.0, 0.75, 0.75)
    m = cal_metric(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    assert m['FPR'] == 1.0 and m['AUROC'] == 0.0


def test_rejects_nan_and_empty():
    with pytest.raises(ValueError):
        cal_metric(np.array([np.nan, 1.0]), np.array([0.0]))
    with pytest.raises(ValueError):
        cal_metric(np.array([]), np.array([0.0]))


def test_table_avg_is_recomputed_and_files_written(tmp_path):
    res = {'A': {'FPR': 0.1, 'AUROC': 0.9, 'AUIN': 0.8, 'AUOUT': 0.7},
           'B': {'FPR': 0.2, 'AUROC': 0.95, 'AUIN': 0.85, 'AUOUT': 0.75}}
    rows = dict(results_table(res))
    assert rows['AVG']['FPR'] == pytest.approx(15.0) and rows['AVG']['AUROC'] == pytest.approx(92.5)
    text = format_table(res, 'title')
    assert text.splitlines()[-1].split() == ['AVG', '15.00', '92.50', '82.50']
    for r, d in zip(res.values(), (0.05, 0.1)):
        r['DTERR'] = d
    files = write_results(res, str(tmp_path / 'knn'))
    assert (tmp_path / 'knn.csv').read_text().splitlines() == [
        'OOD,FPR,AUROC,AUIN,AUOUT,DTERR', 'A,10.00,90.00,80.00,70.00,5.00', 'B,20.00,95.00,85.00,75.00,10.00',
        'AVG,15.00,92.50,82.50,72.50,7.50']
    import json
    assert json.loads((tmp_path / 'knn.json').read_text())['table_x100']['AVG']['DTERR'] == pytest.approx(7.5)
    assert len(files) == 3 and '| AVG | 15.00 | 92.50 | 82.50 |' in (tmp_path / 'knn.md').read_text()
