"""Figures for a scored run: score histograms, ROC curves, t-SNE, k-NN retrieval grids.

Every function takes arrays (no model, no data loading) and writes one PNG with a title and
labelled axes, so it can be reused on any ID/OOD pair.
"""

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    from util.misc import atomic_path
    with atomic_path(path, suffix='.png') as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches='tight')
    _plt().close(fig)
    return path


def plot_score_histograms(id_scores, ood_scores, path, title):
    """One panel per OOD set: density of ID test scores vs that OOD set's scores."""
    plt = _plt()
    names = list(ood_scores)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        lo = min(np.min(id_scores), np.min(ood_scores[name]))
        hi = max(np.max(id_scores), np.max(ood_scores[name]))
        bins = np.linspace(lo, hi, 60)
        ax.hist(id_scores, bins=bins, density=True, alpha=0.55, label='ID test', color='tab:blue')
        ax.hist(ood_scores[name], bins=bins, density=True, alpha=0.55, label=name, color='tab:red')
        ax.set_xlabel('score (higher = more ID)')
        ax.set_ylabel('density')
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def roc_points(id_scores, ood_scores):
    """(FPR, TPR) with ID positive, one point per distinct threshold."""
    from sklearn.metrics import roc_curve
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[id_scores, ood_scores])
    return fpr, tpr


def plot_roc(curves, path, title):
    """``curves``: {ood_name: {method: (id_scores, ood_scores)}} -> one panel per OOD set."""
    from util.metrics import auroc
    plt = _plt()
    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, (ids, oods) in curves[name].items():
            fpr, tpr = roc_points(ids, oods)
            ax.plot(fpr, tpr, label=f'{method} (AUROC {100 * auroc(np.asarray(ids, float), np.asarray(oods, float)):.1f})')
        ax.plot([0, 1], [0, 1], color='0.7', lw=0.8, ls='--')
        ax.axhline(0.95, color='0.6', lw=0.6, ls=':')
        ax.set_xlabel('false positive rate (OOD kept as ID)')
        ax.set_ylabel('true positive rate (ID kept)')
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def tsne_embed(features, seed=0):
    from sklearn.manifold import TSNE
    n = len(features)
    return TSNE(n_components=2, perplexity=min(30.0, max(5.0, (n - 1) / 4)), init='pca', random_state=seed,
                max_iter=500).fit_transform(np.asarray(features, dtype=np.float32))


def plot_tsne(panels, path, title, class_names=None):
    """``panels``: {panel_title: (features [N, D], labels [N])}, label -1 = OOD (grey) and
    -2 = far OOD (black); the same points in every panel so they compare."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.6), squeeze=False)
    for ax, (name, (feats, labels)) in zip(axes[0], panels.items()):
        emb = tsne_embed(feats)
        labels = np.asarray(labels)
        for c in sorted(set(labels[labels >= 0].tolist())):
            m = labels == c
            ax.scatter(emb[m, 0], emb[m, 1], s=4, label=(class_names or {}).get(c, f'ID class {c}'))
        for c, color, lab in ((-1, '0.55', 'OOD: held-out classes'), (-2, 'k', 'OOD: digits')):
            m = labels == c
            if m.any():
                ax.scatter(emb[m, 0], emb[m, 1], s=4, c=color, marker='x', linewidths=0.5, label=lab)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('t-SNE 1')
        ax.set_ylabel('t-SNE 2')
    axes[0][-1].legend(fontsize=7, markerscale=3, loc='center left', bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_knn_grid(rows, path, title):
    """``rows``: list of dicts {'query': image, 'query_label': str, 'groups': [(group_title,
    [(image, caption), ...]), ...]}; images are HxW or HxWx3 uint8 arrays."""
    plt = _plt()
    n_cols = 1 + sum(len(items) for _, items in rows[0]['groups'])
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.15 * n_cols, 1.3 * len(rows) + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        cells = [(row['query'], row['query_label'], 'query')]
        for group, items in row['groups']:
            cells += [(img, cap, group if i == 0 else '') for i, (img, cap) in enumerate(items)]
        for c, (img, cap, group) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(img, cmap='gray' if np.ndim(img) == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(cap, fontsize=6)
            if r == 0 and group:
                ax.set_title(group, fontsize=7, loc='left')
            if c == 0:
                for side in ax.spines.values():
                    side.set_edgecolor('tab:red')
                    side.set_linewidth(2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
