"""OOD metrics in the convention of the paper's tables (docs/METHOD.md §6), and the table printer.

Convention: ID is the positive class and a higher score means "more ID".
- ``FPR``: the threshold is the ID score at index ``round(0.05 * n_id)`` (Python's round,
  halves to even) of the ascending ID scores, i.e. ~95% of ID scores are kept; FPR is the
  fraction of OOD scores strictly above it.
- ``AUROC``: probability that a random ID score beats a random OOD score, ties counting
  one half (= ``sklearn.metrics.roc_auc_score`` with ID = 1).
- ``AUIN`` / ``AUOUT``: area under the precision-recall curve with ID (resp. OOD) as the
  positive class, in the authors' (= knn-ood's) convention, which produced the paper's
  AUIN column: sweep a threshold down through the pooled scores, one operating point per
  distinct score (ties merged), from (tp, fp) = (n_ID, n_OOD) to (0, 0); integrate precision
  with the trapezoid rule over the points whose precision is defined, and close the AUIN
  curve with precision **0** at recall 0 (AUOUT: open it with precision 0 at recall 0).
  This is neither scikit-learn's step-wise average precision nor its trapezoid ``auc``
  (which starts at precision 1).
- ``DTERR``: the smallest detection error over the same sweep,
  min (n_ID − tp + fp) / (n_ID + n_OOD) (the authors print it too).
- ``FPR_OODpos``: OpenOOD / pytorch-ood's FPR@95TPR with **OOD as positive** (fraction of ID
  flagged as OOD when 95% of OOD is caught). A different number from ``FPR``; printed only
  when asked for and always labelled.
All values are fractions in [0, 1]; tables print them ×100. Inputs are never modified.
"""
import csv
import io
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


def sweep(known, novel):
    """The authors' operating points: ``(tp, fp)`` after passing each distinct pooled score,
    threshold rising. ``tp[0], fp[0] = n_ID, n_OOD`` (threshold below every score), then one
    point per distinct score value v with tp = #ID > v, fp = #OOD > v, ending at (0, 0)."""
    known_sorted, novel_sorted = np.sort(known), np.sort(novel)  # copies: inputs untouched
    pooled = np.concatenate([known_sorted, novel_sorted])
    pooled.sort()
    # Distinct values by comparison, not np.diff (which overflows on ±1.8e308 scores).
    distinct = pooled[np.r_[pooled[1:] != pooled[:-1], True]]
    tp = len(known) - np.searchsorted(known_sorted, distinct, side='right')
    fp = len(novel) - np.searchsorted(novel_sorted, distinct, side='right')
    return np.r_[len(known), tp].astype(np.float64), np.r_[len(novel), fp].astype(np.float64)


def _trapezoid(x, y):
    """Area under y(x) for x in either direction (always >= 0 for monotone x)."""
    return float(abs(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)))


def au_in_out(known, novel):
    """(AUIN, AUOUT, DTERR) in the authors' convention (module docstring)."""
    tp, fp = sweep(known, novel)
    n_in, n_out = len(known), len(novel)
    has = tp + fp > 0                                     # precision defined
    x_in = np.r_[tp[has] / n_in, 0.0]                     # recall of ID, falling
    y_in = np.r_[tp[has] / (tp[has] + fp[has]), 0.0]      # closed by precision 0
    tn, fn = n_out - fp, n_in - tp
    has = tn + fn > 0
    x_out = np.r_[0.0, tn[has] / n_out]                   # recall of OOD, rising
    y_out = np.r_[0.0, tn[has] / (tn[has] + fn[has])]     # opened by precision 0
    dterr = float(np.min((n_in - tp + fp) / (n_in + n_out)))
    return _trapezoid(x_in, y_in), _trapezoid(x_out, y_out), dterr


def fpr_at_95_tpr_ood_positive(known, novel):
    """OpenOOD convention: OOD positive (score negated); FPR over ID at the first threshold
    whose TPR over OOD reaches 0.95."""
    neg_novel = np.sort(-novel)[::-1]  # OOD-ness, descending
    n_catch = math.ceil(0.95 * len(neg_novel) - 1e-12)
    threshold = neg_novel[max(n_catch, 1) - 1]
    return float(np.mean(-known >= threshold))


def cal_metric(known, novel, ood_positive_fpr=False):
    """Scores of ID (``known``) and OOD (``novel``) samples, higher = more ID ->
    ``{'FPR', 'AUROC', 'AUIN', 'AUOUT', 'DTERR'}`` as fractions (plus ``'FPR_OODpos'`` if asked)."""
    known = _as_scores(known, 'ID')
    novel = _as_scores(novel, 'OOD')
    auin, auout, dterr = au_in_out(known, novel)
    out = {'FPR': fpr_at_95(known, novel), 'AUROC': auroc(known, novel), 'AUIN': auin, 'AUOUT': auout,
           'DTERR': dterr}
    if ood_positive_fpr:
        out['FPR_OODpos'] = fpr_at_95_tpr_ood_positive(known, novel)
    return out


TABLE_COLUMNS = ('FPR', 'AUROC', 'AUIN')
# Every column a CSV/JSON file gets, whatever the printed table shows.
FILE_COLUMNS = ('FPR', 'AUROC', 'AUIN', 'AUOUT', 'DTERR')
COLUMN_LABELS = {'FPR': 'FPR', 'AUROC': 'AUROC', 'AUIN': 'AUIN', 'AUOUT': 'AUOUT', 'DTERR': 'DTERR',
                 'FPR_OODpos': 'FPR(OOD+,OpenOOD)'}


def results_table(results, columns=TABLE_COLUMNS, near=None):
    """``{ood_name: metrics}`` -> list of (row_name, {col: value×100}) with an ``AVG`` row
    that is the mean of the rows (recomputed, never copied). With ``near`` (names of near-OOD
    rows; the others are far), ``AVG near`` and ``AVG far`` rows follow (OpenOOD v1.5's groups)."""
    rows = [(name, {c: 100.0 * m[c] for c in columns}) for name, m in results.items()]
    mean = lambda rs: {c: float(np.mean([r[c] for _, r in rs])) for c in columns}
    if rows:
        groups = [('AVG', rows)]
        if near:
            groups += [('AVG near', [r for r in rows if r[0] in near]), ('AVG far', [r for r in rows if r[0] not in near])]
        rows = rows + [(name, mean(rs)) for name, rs in groups if rs]
    return rows


def format_table(results, title='', columns=TABLE_COLUMNS, near=None, header=()):
    """The printed table; ``header`` lines (e.g. the ID accuracy) go between title and table."""
    rows = results_table(results, columns, near)
    labels = [COLUMN_LABELS[c] for c in columns]
    w0 = max([len('OOD'), *(len(n) for n, _ in rows)])
    widths = [max(len(label), 7) for label in labels]
    lines = ([title] if title else []) + list(header)
    lines.append(f"{'OOD':<{w0}}  " + '  '.join(f"{label:>{w}}" for label, w in zip(labels, widths)))
    for name, r in rows:
        lines.append(f"{name:<{w0}}  " + '  '.join(f"{r[c]:>{w}.2f}" for c, w in zip(columns, widths)))
    return '\n'.join(lines)


def markdown_table(results, columns=TABLE_COLUMNS, near=None):
    rows = results_table(results, columns, near)
    labels = [COLUMN_LABELS[c] for c in columns]
    lines = ['| OOD | ' + ' | '.join(labels) + ' |', '|---|' + '---:|' * len(labels)]
    for name, r in rows:
        lines.append(f"| {name} | " + ' | '.join(f"{r[c]:.2f}" for c in columns) + ' |')
    return '\n'.join(lines) + '\n'


def write_results(results, prefix, columns=TABLE_COLUMNS, meta=None, near=None):
    """Write ``prefix.csv``, ``prefix.json`` and ``prefix.md`` (atomically each). The Markdown
    file has the printed ``columns``; CSV and JSON have every metric (``FILE_COLUMNS``, DTERR
    included) plus any extra printed column."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    file_columns = FILE_COLUMNS + tuple(c for c in columns if c not in FILE_COLUMNS)
    rows = results_table(results, file_columns, near)

    from util.misc import write_text_atomic as atomic

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['OOD', *[COLUMN_LABELS[c] for c in file_columns]])
    for name, r in rows:
        writer.writerow([name, *[f"{r[c]:.2f}" for c in file_columns]])
    atomic(prefix + '.csv', buf.getvalue())
    atomic(prefix + '.md', markdown_table(results, columns, near))
    payload = {'metrics': results, 'table_x100': {n: r for n, r in rows}, 'meta': meta or {}}
    atomic(prefix + '.json', json.dumps(payload, indent=2, sort_keys=True) + '\n')
    return [prefix + ext for ext in ('.csv', '.json', '.md')]


def openood_rows(id_scores, ood_scores, near=None, accuracy=None):
    """OpenOOD v1.5's leaderboard columns (×100), to compare with their tables: FPR@95 with
    **OOD as positive** (``FPR_OODpos``), AUROC, AUPR_IN / AUPR_OUT as OpenOOD computes them
    (scikit-learn's precision-recall curve, trapezoid ``auc``), ACC (ID accuracy). One row per
    OOD set, then ``nearood`` / ``farood`` (with ``near``) and ``overall`` means."""
    from sklearn.metrics import auc, precision_recall_curve
    rows = []
    for name, novel in ood_scores.items():
        known, novel = _as_scores(id_scores, 'ID'), _as_scores(novel, 'OOD')
        y = np.r_[np.ones(len(known)), np.zeros(len(novel))]
        s = np.r_[known, novel]
        p_in, r_in, _ = precision_recall_curve(y, s)
        p_out, r_out, _ = precision_recall_curve(1 - y, -s)
        rows.append((name, {'FPR@95': 100 * fpr_at_95_tpr_ood_positive(known, novel), 'AUROC': 100 * auroc(known, novel),
                            'AUPR_IN': 100 * auc(r_in, p_in), 'AUPR_OUT': 100 * auc(r_out, p_out)}))
    mean = lambda rs: {c: float(np.mean([r[c] for _, r in rs])) for c in rows[0][1]}
    groups = [('nearood', [r for r in rows if r[0] in near]), ('farood', [r for r in rows if r[0] not in near])] \
        if near else []
    rows += [(n, mean(rs)) for n, rs in groups if rs] + [('overall', mean(rows))]
    for _, r in rows:
        r['ACC'] = 100 * accuracy if accuracy is not None else float('nan')
    return rows


def write_openood_csv(rows, path):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['dataset', 'FPR@95', 'AUROC', 'AUPR_IN', 'AUPR_OUT', 'ACC'])
    for name, r in rows:
        writer.writerow([name, *[f"{r[c]:.2f}" for c in ('FPR@95', 'AUROC', 'AUPR_IN', 'AUPR_OUT', 'ACC')]])
    from util.misc import write_text_atomic
    return write_text_atomic(path, buf.getvalue())
