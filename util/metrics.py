"""OOD metrics in the convention of the paper's tables (PAPER §6), and the table printer.

Convention: ID is the positive class and a higher score means "more ID".
- ``FPR``: the threshold is the ID score at index ``round(0.05 * n_id)`` (Python's round,
  halves to even) of the ascending ID scores, i.e. ~95% of ID scores are kept; FPR is the
  fraction of OOD scores strictly above it.
- ``AUROC``: probability that a random ID score beats a random OOD score, ties counting
  one half (= ``sklearn.metrics.roc_auc_score`` with ID = 1).
- ``AUIN`` / ``AUOUT``: area under the precision-recall curve with ID (resp. OOD, score
  negated) as the positive class, integrated with the trapezoid rule as the authors do
  (not scikit-learn's step-wise average precision). Tied scores form one operating point;
  the curve starts at (recall 0, precision 1), as scikit-learn's ``precision_recall_curve``.
- ``FPR_OODpos``: OpenOOD / pytorch-ood's FPR@95TPR with **OOD as positive** (fraction of ID
  flagged as OOD when 95% of OOD is caught). A different number from ``FPR``; printed only
  when asked for and always labelled.
All values are fractions in [0, 1]; tables print them ×100. Inputs are never modified.
"""
import csv
import json
import math
import os

import numpy as np
from scipy.stats import rankdata


def _as_scores(x, name):
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} scores are empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} scores contain NaN or inf")
    return x


def fpr_at_95(known, novel):
    """Paper convention: ID positive, threshold at the 5th percentile of ID scores."""
    known_sorted = np.sort(known)  # np.sort copies: the caller's array is left alone
    threshold = known_sorted[min(round(0.05 * len(known_sorted)), len(known_sorted) - 1)]
    return float(np.mean(novel > threshold))


def auroc(known, novel):
    """Mann–Whitney U with average ranks for ties."""
    ranks = rankdata(np.concatenate([known, novel]))
    n1, n0 = len(known), len(novel)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def aupr(pos, neg):
    """Trapezoid area under precision(recall) with ``pos`` the positive class."""
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind='mergesort')
    scores, labels = scores[order], labels[order]
    # One operating point per distinct score: the last index of each run of ties. Compared,
    # not subtracted: np.diff overflows on scores a full float range apart (±1.8e308).
    last = np.r_[np.nonzero(scores[1:] != scores[:-1])[0], len(scores) - 1]
    tp = np.cumsum(labels)[last]
    fp = (last + 1) - tp
    recall = np.r_[0.0, tp / len(pos)]
    precision = np.r_[1.0, tp / (tp + fp)]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def fpr_at_95_tpr_ood_positive(known, novel):
    """OpenOOD convention: OOD positive (score negated); FPR over ID at the first threshold
    whose TPR over OOD reaches 0.95."""
    neg_novel = np.sort(-novel)[::-1]  # OOD-ness, descending
    n_catch = math.ceil(0.95 * len(neg_novel) - 1e-12)
    threshold = neg_novel[max(n_catch, 1) - 1]
    return float(np.mean(-known >= threshold))


def cal_metric(known, novel, ood_positive_fpr=False):
    """Scores of ID (``known``) and OOD (``novel``) samples, higher = more ID ->
    ``{'FPR', 'AUROC', 'AUIN', 'AUOUT'}`` as fractions (plus ``'FPR_OODpos'`` if asked)."""
    known = _as_scores(known, 'ID')
    novel = _as_scores(novel, 'OOD')
    out = {
        'FPR': fpr_at_95(known, novel),
        'AUROC': auroc(known, novel),
        'AUIN': aupr(known, novel),
        'AUOUT': aupr(-novel, -known),
    }
    if ood_positive_fpr:
        out['FPR_OODpos'] = fpr_at_95_tpr_ood_positive(known, novel)
    return out


TABLE_COLUMNS = ('FPR', 'AUROC', 'AUIN')
COLUMN_LABELS = {'FPR': 'FPR', 'AUROC': 'AUROC', 'AUIN': 'AUIN', 'AUOUT': 'AUOUT',
                 'FPR_OODpos': 'FPR(OOD+,OpenOOD)'}


def results_table(results, columns=TABLE_COLUMNS):
    """``{ood_name: metrics}`` -> list of (row_name, {col: value×100}) with an ``AVG`` row
    that is the mean of the rows (recomputed, never copied)."""
    rows = [(name, {c: 100.0 * m[c] for c in columns}) for name, m in results.items()]
    if rows:
        rows.append(('AVG', {c: float(np.mean([r[c] for _, r in rows])) for c in columns}))
    return rows


def format_table(results, title='', columns=TABLE_COLUMNS):
    rows = results_table(results, columns)
    labels = [COLUMN_LABELS[c] for c in columns]
    w0 = max([len('OOD'), *(len(n) for n, _ in rows)])
    widths = [max(len(label), 7) for label in labels]
    lines = [title] if title else []
    lines.append(f"{'OOD':<{w0}}  " + '  '.join(f"{label:>{w}}" for label, w in zip(labels, widths)))
    for name, r in rows:
        lines.append(f"{name:<{w0}}  " + '  '.join(f"{r[c]:>{w}.2f}" for c, w in zip(columns, widths)))
    return '\n'.join(lines)


def markdown_table(results, columns=TABLE_COLUMNS):
    rows = results_table(results, columns)
    labels = [COLUMN_LABELS[c] for c in columns]
    lines = ['| OOD | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(labels)]
    for name, r in rows:
        lines.append(f"| {name} | " + ' | '.join(f"{r[c]:.2f}" for c in columns) + ' |')
    return '\n'.join(lines) + '\n'


def write_results(results, prefix, columns=TABLE_COLUMNS, meta=None):
    """Write ``prefix.csv``, ``prefix.json`` and ``prefix.md`` (atomically each)."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    rows = results_table(results, columns)

    def atomic(path, text):
        tmp = path + '.tmp'
        with open(tmp, 'w', newline='') as f:
            f.write(text)
        os.replace(tmp, path)

    import io
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['OOD', *[COLUMN_LABELS[c] for c in columns]])
    for name, r in rows:
        writer.writerow([name, *[f"{r[c]:.2f}" for c in columns]])
    atomic(prefix + '.csv', buf.getvalue())
    atomic(prefix + '.md', markdown_table(results, columns))
    payload = {'metrics': results, 'table_x100': {n: r for n, r in rows}, 'meta': meta or {}}
    atomic(prefix + '.json', json.dumps(payload, indent=2, sort_keys=True) + '\n')
    return [prefix + ext for ext in ('.csv', '.json', '.md')]
