"""cal_metric against slow references written from PAPER §6, scikit-learn, and exact answers."""
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


def ref_aupr(pos, neg):
    """Trapezoid over one point per distinct threshold, starting at (recall 0, precision 1)."""
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    recall, precision = [0.0], [1.0]
    for t in thresholds:
        tp = sum(1 for s in pos if s >= t)
        fp = sum(1 for s in neg if s >= t)
        recall.append(tp / len(pos))
        precision.append(tp / (tp + fp))
    return sum((recall[i + 1] - recall[i]) * (precision[i + 1] + precision[i]) / 2 for i in range(len(recall) - 1))


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
    assert m['AUIN'] == pytest.approx(ref_aupr(list(known), list(novel)), abs=1e-12)
    assert m['AUOUT'] == pytest.approx(ref_aupr(list(-novel), list(-known)), abs=1e-12)


@pytest.mark.parametrize('seed', range(10))
@pytest.mark.parametrize('tie_heavy', [False, True])
def test_agrees_with_sklearn(seed, tie_heavy):
    known, novel = arrays(seed + 100, tie_heavy)
    y = np.r_[np.ones(len(known)), np.zeros(len(novel))]
    s = np.r_[known, novel]
    m = cal_metric(known, novel, ood_positive_fpr=True)
    assert abs(m['AUROC'] - roc_auc_score(y, s)) < 1e-9
    p, r, _ = precision_recall_curve(y, s)
    assert abs(m['AUIN'] - auc(r, p)) < 1e-9
    p, r, _ = precision_recall_curve(1 - y, -s)
    assert abs(m['AUOUT'] - auc(r, p)) < 1e-9
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


def test_perfect_and_inverted():
    m = cal_metric(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert (m['FPR'], m['AUROC'], m['AUIN'], m['AUOUT']) == (0.0, 1.0, 1.0, 1.0)
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
    files = write_results(res, str(tmp_path / 'knn'))
    assert (tmp_path / 'knn.csv').read_text().splitlines() == [
        'OOD,FPR,AUROC,AUIN', 'A,10.00,90.00,80.00', 'B,20.00,95.00,85.00', 'AVG,15.00,92.50,82.50']
    assert len(files) == 3 and '| AVG | 15.00 | 92.50 | 82.50 |' in (tmp_path / 'knn.md').read_text()
