"""Post-hoc baseline detectors from cached features and logits (the paper's comparison rows).

OpenOOD's post-processor contract, as ``CSD/scoring.py``: ``fit(train)`` on the ID training
split, then ``score(split) -> [N]``, **higher = more ID**. A split is the feature cache's dict:
``features`` [N, 6, C] (raw; index 4 = the global average pool = the penultimate features),
``labels`` [N], and ``logits`` [N, K] for models with a classifier. ``head`` = (W [K, C],
b [K]) of that classifier, for the methods that recompute logits (ReAct) or need its
geometry (ViM).

- ``msp``   Hendrycks & Gimpel 2017: max_c softmax(z)_c.
- ``energy`` Liu et al. 2020: T·log Σ_c exp(z_c / T), T = 1.
- ``mahalanobis`` Lee et al. 2018 (penultimate layer, no input noise here; see ``odin_scores``
  for perturbed inputs): class means μ_c and one tied covariance Σ of the training features;
  score = max_c −(x − μ_c)ᵀ Σ⁺ (x − μ_c).
- ``vim`` Wang et al. 2022: origin u = −W⁺b; principal space P of the centred training
  features (D = 1000 for C ≥ 2048, 512 for C ≥ 768, else C/2); virtual logit
  v = α‖(x − u) P⊥‖ with α = mean max logit / mean ‖·P⊥‖ over training; score =
  logsumexp(z) − v (the ranking of the paper's virtual-class probability).
- ``react`` Sun et al. 2021: penultimate features clipped at their 90th percentile over
  training, then energy of W·x + b.
- ``ssd`` SSD+ (Sehwag et al. 2021): on L2-normalised features, one mean and covariance per
  class (per k-means cluster without labels); score = −min_c Mahalanobis distance.
"""
import importlib

import numpy as np
from scipy.special import logsumexp, softmax

from util.errors import UserError

# Imported as CSD.baselines, or as `baselines` beside `python CSD/CSD.py` (see CSD.py).
Detector = importlib.import_module(('CSD.' if __package__ else '') + 'scoring').Detector

GLOBAL = 4   # index of the global-average vector in the cached [N, 6, C] features


def _penultimate(split):
    return np.asarray(split['features'][:, GLOBAL], dtype=np.float64)


def _unit(x):
    """The authors' normalisation x / (‖x‖ + 1e-10), kept in float64."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def _head_of(context):
    return getattr(context, 'head', None)


def _logits(split, method):
    if 'logits' not in split:
        raise UserError(f"--method {method} needs a classifier's logits: use a CE checkpoint, or a SupCon one "
                        f"through ALPA/main_linear.py (a linear probe)")
    return np.asarray(split['logits'], dtype=np.float64)


class MSP(Detector):
    needs = ('logits',)

    def fit(self, train, context=None):
        return self

    def score(self, split):
        return softmax(_logits(split, 'msp'), axis=1).max(axis=1)


class Energy(Detector):
    needs = ('logits',)

    def __init__(self, temperature=1.0):
        self.temperature = temperature

    def fit(self, train, context=None):
        return self

    def score(self, split):
        t = self.temperature
        return t * logsumexp(_logits(split, 'energy') / t, axis=1)


def _precision(centred):
    """Pseudo-inverse of the (biased) covariance of already-centred rows."""
    cov = centred.T @ centred / len(centred)
    return np.linalg.pinv(cov, hermitian=True)


def _min_mahalanobis(x, means, precisions):
    """[N, C], [K, C], [K, C, C] or one [C, C] -> [N] min_c (x−μ_c)ᵀ P_c (x−μ_c)."""
    best = np.full(len(x), np.inf)
    for c, mu in enumerate(means):
        p = precisions if precisions.ndim == 2 else precisions[c]
        d = x - mu
        best = np.minimum(best, np.einsum('nc,cd,nd->n', d, p, d))
    return best


class Mahalanobis(Detector):
    needs = ('labels',)

    def fit(self, train, context=None):
        x, y = _penultimate(train), np.asarray(train['labels'])
        self.classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(0) for c in self.classes])
        self.precision = _precision(x - self.means[np.searchsorted(self.classes, y)])   # tied
        return self

    def score(self, split):
        return -_min_mahalanobis(_penultimate(split), self.means, self.precision)


class SSD(Detector):
    """SSD+ with labels; with ``clusters`` (or no labels) k-means clusters instead."""
    needs = ()

    def __init__(self, clusters=None, seed=0):
        self.clusters, self.seed = clusters, seed

    def fit(self, train, context=None):
        x = _unit(_penultimate(train))
        y = np.asarray(train['labels']) if 'labels' in train and self.clusters is None else None
        if y is None or (y < 0).any():
            from sklearn.cluster import KMeans
            y = KMeans(n_clusters=self.clusters or 1, n_init=10, random_state=self.seed).fit_predict(x)
        groups = np.unique(y)
        self.means = np.stack([x[y == g].mean(0) for g in groups])
        self.precisions = np.stack([_precision(x[y == g] - m) for g, m in zip(groups, self.means)])
        return self

    def score(self, split):
        return -_min_mahalanobis(_unit(_penultimate(split)), self.means, self.precisions)


def _head(head, method):
    if head is None:
        raise UserError(f"--method {method} needs the classifier's weights (fc): use a CE or linear-probe checkpoint")
    w, b = head
    return np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)


class ReAct(Detector):
    needs = ('logits',)

    def __init__(self, percentile=90.0):
        self.percentile = percentile

    def fit(self, train, context=None):
        self.w, self.b = _head(_head_of(context), 'react')
        self.clip = float(np.percentile(_penultimate(train), self.percentile))
        return self

    def score(self, split):
        z = np.minimum(_penultimate(split), self.clip) @ self.w.T + self.b
        return logsumexp(z, axis=1)


class ViM(Detector):
    needs = ('logits',)

    def __init__(self, dim=None):
        self.dim = dim

    def fit(self, train, context=None):
        w, b = _head(_head_of(context), 'vim')
        x = _penultimate(train)
        c = x.shape[1]
        self.u = -np.linalg.pinv(w) @ b
        dim = self.dim or (1000 if c >= 2048 else 512 if c >= 768 else c // 2)
        centred = x - self.u
        eigval, eigvec = np.linalg.eigh(centred.T @ centred / len(centred))
        self.null = eigvec[:, np.argsort(eigval)[::-1][dim:]]          # [C, C − D], the residual space
        vlogit = np.linalg.norm(centred @ self.null, axis=1)
        self.alpha = _logits(train, 'vim').max(axis=1).mean() / vlogit.mean()
        return self

    def score(self, split):
        v = self.alpha * np.linalg.norm((_penultimate(split) - self.u) @ self.null, axis=1)
        return logsumexp(_logits(split, 'vim'), axis=1) - v


BASELINES = {'msp': MSP, 'energy': Energy, 'mahalanobis': Mahalanobis, 'vim': ViM, 'react': ReAct, 'ssd': SSD}


class ODIN(Detector):
    """ODIN through the contract: ``fit`` takes the model, the Normalize std and the image
    reader from the context; ``score(split)`` runs ``odin_scores`` over that split's images
    (the rows of a split cut down by ``--k auto`` only: ``split['rows']``)."""
    needs = ('images',)

    def __init__(self, temperature=1000.0, epsilon=0.0014, batch_size=None, num_workers=0, loader_batch=256):
        self.temperature, self.epsilon, self.batch_size = temperature, epsilon, batch_size
        self.num_workers, self.loader_batch = num_workers, loader_batch

    def fit(self, train, context=None):
        self.model, self.std, self.images = getattr(context, 'model', None), context.std, context.images
        self.device = context.device
        if getattr(self.model, 'fc', None) is None:
            raise UserError("--method odin needs a classifier: use a CE checkpoint, or a SupCon one through "
                            "ALPA/main_linear.py (a linear probe)")
        return self

    def score(self, split):
        import torch

        from util.data import collate_skip_none
        dataset = self.images(split['meta']['split'])
        if 'rows' in split:
            dataset = torch.utils.data.Subset(dataset, [int(i) for i in split['rows']])
        device = torch.device(self.device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.loader_batch, shuffle=False,
                                             num_workers=self.num_workers, pin_memory=device.type == 'cuda',
                                             collate_fn=collate_skip_none)
        return odin_scores(self.model, loader, device, self.std, self.temperature, self.epsilon,
                           batch_size=self.batch_size)


def odin_scores(model, loader, device, std, temperature=1000.0, epsilon=0.0014, batch_size=None, log=print):
    """ODIN (Liang et al. 2018), which needs its own forward and backward passes: for each
    input x (already normalised), ŷ = argmax f(x), the input is moved against the gradient of
    −log softmax(f(x)/T)_ŷ, x̃ = x − ε·sign(∇ₓ) / σ_c (the step is ε in pixel units, hence the
    division by the Normalize std, as in their code), and the score is max softmax(f(x̃)/T).
    Defaults are the paper's: T = 1000, ε = 0.0014. -> [N] scores, higher = more ID.

    The backward pass keeps the whole autograd graph of a batch (a ResNet-50 at 224² holds
    about 100 MB of activations per image), so the loader's batches go through in pieces of
    ``batch_size`` images (``--odin-batch-size``; default the whole batch), halved after a
    device out-of-memory error. Every score is per image (sum-reduced loss, eval mode), so the
    piece size never changes a number."""
    import torch

    from util.features import exact_fp32
    if getattr(model, 'fc', None) is None:
        raise UserError("--method odin needs a classifier: use a CE checkpoint, or a SupCon one through "
                        "ALPA/main_linear.py (a linear probe)")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--odin-batch-size {batch_size}: give a positive number of images")
    model.eval()
    sigma = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    out, piece = [], batch_size
    with exact_fp32(device):
        for batch in loader:
            if batch is None:
                continue
            x_all, s = batch[0], 0
            piece = piece or len(x_all)
            while s < len(x_all):
                try:
                    out.append(_odin_piece(model, x_all[s:s + piece].to(device), sigma, temperature, epsilon))
                    s += piece
                except torch.OutOfMemoryError:
                    if piece == 1:
                        raise UserError("ODIN runs out of device memory on a single image: use --device cpu or "
                                        "a smaller model") from None
                    piece = max(1, piece // 2)
                    if device.type == 'cuda':
                        torch.cuda.empty_cache()
                    log(f"[odin] out of device memory: {piece} images per forward/backward pass from here on "
                        f"(--odin-batch-size {piece} sets it from the start)")
    return np.concatenate(out).astype(np.float64)


def _odin_piece(model, x, sigma, temperature, epsilon):
    """ODIN scores of the images ``x`` (one forward/backward pass, then one forward pass)."""
    import torch
    import torch.nn.functional as F
    x = x.requires_grad_(True)
    logits = model(x) / temperature
    loss = F.cross_entropy(logits, logits.argmax(1), reduction='sum')   # per-sample terms: exact signs
    grad, = torch.autograd.grad(loss, x)
    with torch.no_grad():
        x_odin = x - epsilon * torch.sign(grad) / sigma
        return F.softmax(model(x_odin) / temperature, dim=1).max(dim=1).values.cpu().numpy()
