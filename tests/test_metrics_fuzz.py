"""The metrics under fuzzing: finite, in range, inputs untouched, for any scores."""
import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from util.metrics import cal_metric

# ---------------------------------------------------------------- 7. metrics under fuzzing
_finite = st.floats(allow_nan=False, allow_infinity=False)
_scores = st.one_of(
    st.lists(_finite, min_size=1, max_size=60),                                     # anything finite
    st.lists(st.sampled_from([-1.7976931348623157e308, -1e300, -0.0, 0.0, 5e-324, 1e300, 1.7976931348623157e308]),
             min_size=1, max_size=60),                                              # extremes, ±0, subnormal
    st.lists(st.integers(-2, 2).map(float), min_size=1, max_size=60),              # heavy ties
    st.integers(1, 60).map(lambda n: [0.5] * n),                                    # all one value
)


@settings(max_examples=200, deadline=None)
@given(known=_scores, novel=_scores)
def test_metrics_fuzz(known, novel):
    known, novel = np.array(known), np.array(novel)
    k0, n0 = known.copy(), novel.copy()
    with warnings.catch_warnings(), np.errstate(over='raise', divide='raise', invalid='raise'):
        warnings.simplefilter('error')   # an overflow warning on valid scores counts as a failure
        m = cal_metric(known, novel, ood_positive_fpr=True)
        swapped = cal_metric(novel, known)
    assert set(m) == {'FPR', 'AUROC', 'AUIN', 'AUOUT', 'DTERR', 'FPR_OODpos'}
    for name, v in m.items():
        assert isinstance(v, float) and 0.0 <= v <= 1.0, (name, v)
    assert abs(swapped['AUROC'] - (1.0 - m['AUROC'])) <= 1e-9
    np.testing.assert_array_equal(known, k0)   # inputs untouched
    np.testing.assert_array_equal(novel, n0)
