"""Every OOD score behind one contract, registered once (OpenOOD's post-processor shape):

    detector = build_detector(name, k, context).fit(splits['train'], context)
    scores = detector.score(split)          # [N], higher = more ID, for any split

A split is the feature store's dict (``util/store.py``): ``features`` [N, 6, C] (raw),
``labels`` [N], ``logits`` [N, K] for models with a classifier, ``meta`` (its ``split`` names
the set). ``Context`` holds what a detector may need beyond the features: the device and the
k-NN search settings, the classifier's (W, b), and for scores that run the network (ODIN)
the model, the test Normalize std and a way to read a split's images. A detector says what it
needs (``needs``) and whether it takes ``--k`` (``uses_k``).

| name | what | class |
|---|---|---|
| knn, csd, local, global+center | k-NN over scales (docs/METHOD.md §3) | ``CSD.scoring.MultiScaleKNN`` |
| msp, energy, mahalanobis, vim, react, ssd | post-hoc scores from features / logits | ``CSD.baselines`` |
| odin | its own forward and backward passes | ``CSD.baselines.ODIN`` |
"""
import importlib
from dataclasses import dataclass, field

from util.errors import UserError

# Imported as CSD.detectors, or as `detectors` beside `python CSD/CSD.py` (see CSD.py).
_PACKAGE = 'CSD.' if __package__ else ''
baselines = importlib.import_module(_PACKAGE + 'baselines')
scoring = importlib.import_module(_PACKAGE + 'scoring')


@dataclass(frozen=True)
class Context:
    """What ``fit`` may use besides the training split."""
    device: str = 'cpu'
    search: dict = field(default_factory=dict)   # MultiScaleKNN's backend / mem_budget / bank_chunk / approx
    head: tuple = None                           # (W [K, C], b [K]) of the classifier, if any
    model: object = None                         # the network, for detectors that run it (ODIN)
    std: tuple = None                            # the test-time Normalize std (ODIN's step is in pixel units)
    images: object = None                        # split name -> its dataset under the test transform (ODIN)
    odin: dict = field(default_factory=dict)     # ODIN's temperature / epsilon / batch_size


def _knn(method):
    return lambda k, ctx: scoring.build_score(method, k, ctx.device, **ctx.search)


DETECTORS = {**{m: _knn(m) for m in scoring.SCALE_SETS},
             **{m: (lambda k, ctx, cls=cls: cls()) for m, cls in baselines.BASELINES.items()},
             'odin': lambda k, ctx: baselines.ODIN(**ctx.odin)}
USES_K = set(scoring.SCALE_SETS)


def uses_k(name):
    return name in USES_K


def build_detector(name, k=None, context=None):
    """``name`` -> an unfitted detector (``k``: for the k-NN scores; None = the paper's k)."""
    if name not in DETECTORS:
        raise UserError(f"unknown --method {name!r}; known: {', '.join(DETECTORS)}")
    return DETECTORS[name](k, context or Context())
