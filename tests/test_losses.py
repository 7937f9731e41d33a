"""SupConLoss and ALPALoss against per-anchor loops (ALPA/reference.py) and exact answers."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ALPA.losses import ALPALoss, SupConLoss
from ALPA.reference import reference_alpa_loss, reference_supcon


def unit_features(batch, n_views, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, n_views, dim, generator=gen, dtype=torch.float64)
    return F.normalize(z, dim=-1).requires_grad_(True)


def similarity_matrix(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.rand(n, n, generator=gen, dtype=torch.float64) * 4 - 2  # ALPA's range [-2, 2]
    return ((s + s.T) / 2).requires_grad_(True)


def assert_same_value_and_grad(ours, ref, wrt):
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    g_ours, = torch.autograd.grad(ours, wrt)
    g_ref, = torch.autograd.grad(ref, wrt)
    assert torch.isfinite(g_ours).all()
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- SupConLoss
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_supcon_with_labels_matches_reference(temperature, contrast_mode):
    z = unit_features(6, 2)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    kwargs = dict(temperature=temperature, contrast_mode=contrast_mode, base_temperature=0.07)
    assert_same_value_and_grad(SupConLoss(**kwargs)(z, labels),
                               reference_supcon(z, labels, **kwargs), z)


@pytest.mark.parametrize("n_views", [2, 3])
def test_supcon_simclr_matches_reference(n_views):
    z = unit_features(5, n_views, seed=1)
    assert_same_value_and_grad(SupConLoss(0.1)(z), reference_supcon(z, temperature=0.1), z)


def test_supcon_with_asymmetric_mask_matches_reference():
    z = unit_features(4, 2, seed=2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]])
    assert_same_value_and_grad(SupConLoss(0.2)(z, mask=mask),
                               reference_supcon(z, mask=mask, temperature=0.2), z)


def supcontrast_formula(features, labels, temperature, base_temperature):
    """SupContrast's vectorised loss ('all' mode); valid when every anchor has a positive."""
    batch, n_views = features.shape[:2]
    mask = (labels.view(-1, 1) == labels.view(1, -1)).double().repeat(n_views, n_views)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    logits_mask = 1 - torch.eye(batch * n_views, dtype=torch.float64)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def test_supcon_equals_supcontrast_formula():
    z = unit_features(6, 2, seed=6)
    labels = torch.tensor([3, 1, 3, 0, 1, 0])
    assert_same_value_and_grad(SupConLoss(0.1)(z, labels),
                               supcontrast_formula(z, labels, 0.1, 0.07), z)


def test_supcon_anchor_without_positive_adds_zero():
    """n_views = 1: the sample with a unique label has no positive and must add 0, not NaN."""
    z = unit_features(5, 1, seed=3)
    labels = torch.tensor([0, 0, 1, 1, 2])  # sample 4 has no positive
    loss = SupConLoss(0.1)(z, labels)
    assert torch.isfinite(loss)
    assert_same_value_and_grad(loss, reference_supcon(z, labels, temperature=0.1), z)


def test_supcon_no_positive_at_all_is_zero():
    z = unit_features(4, 1, seed=4)
    loss = SupConLoss()(z, torch.arange(4))
    grad, = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_supcon_identical_features_exact_value():
    """All logits equal: log softmax = -log(K-1) for every pair, so loss = (T/T_b)·log(K-1)."""
    z = F.normalize(torch.ones(3, 2, 4, dtype=torch.float64), dim=-1)
    loss = SupConLoss(temperature=0.1, base_temperature=0.07)(z, torch.tensor([0, 1, 0]))
    assert loss.item() == pytest.approx(0.1 / 0.07 * math.log(5), rel=1e-12)


def test_supcon_large_logits_finite():
    z = unit_features(8, 2, seed=5)
    loss = SupConLoss(temperature=1e-4)(z, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    grad, = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_supcon_rejects_bad_arguments():
    z = unit_features(3, 2)
    with pytest.raises(ValueError):
        SupConLoss()(z[:, 0])  # no view axis
    with pytest.raises(ValueError):
        SupConLoss()(z, labels=torch.arange(3), mask=torch.eye(3))
    with pytest.raises(ValueError):
        SupConLoss()(z, labels=torch.arange(4))
    with pytest.raises(ValueError):
        SupConLoss(contrast_mode="some")


# ---------------------------------------------------------------- ALPALoss
@pytest.mark.parametrize("temperature_s", [1.0, 10.0])
def test_alpa_matches_reference(temperature_s):
    sim = similarity_matrix(8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # two views of four images
    assert_same_value_and_grad(ALPALoss(temperature_s)(sim, labels),
                               reference_alpa_loss(sim, labels, temperature_s), sim)


def test_alpa_anchor_without_positive_adds_zero():
    sim = similarity_matrix(5, seed=1)
    labels = torch.tensor([0, 0, 1, 1, 7])  # anchor 4 has no positive
    loss = ALPALoss(10.0)(sim, labels)
    assert torch.isfinite(loss)
    assert_same_value_and_grad(loss, reference_alpa_loss(sim, labels, 10.0), sim)


def test_alpa_uniform_similarity_exact_value():
    """Equal logits: each anchor with positives contributes log(N-1); the rest contribute 0."""
    sim = torch.zeros(5, 5, dtype=torch.float64)
    loss = ALPALoss(10.0)(sim, torch.tensor([0, 0, 1, 1, 2]))
    assert loss.item() == pytest.approx(4 / 5 * math.log(4), rel=1e-12)


def test_alpa_self_pairs_do_not_enter():
    """Changing the diagonal (self-similarity) leaves the loss unchanged."""
    sim = similarity_matrix(6, seed=2).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = ALPALoss(10.0)
    bumped = sim + torch.diag(torch.full((6,), 100.0, dtype=sim.dtype))
    torch.testing.assert_close(loss(sim, labels), loss(bumped, labels), rtol=1e-12, atol=1e-12)


def test_alpa_temperature_is_inverse():
    sim = similarity_matrix(6, seed=3).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(ALPALoss(10.0)(sim, labels), ALPALoss(1.0)(10.0 * sim, labels))


def test_alpa_single_view_and_large_logits_finite():
    one = torch.zeros(1, 1, requires_grad=True)
    loss = ALPALoss()(one, torch.tensor([3]))
    grad, = torch.autograd.grad(loss, one)
    assert loss.item() == 0.0 and torch.isfinite(grad).all()

    sim = similarity_matrix(6, seed=4)
    loss = ALPALoss(1e4)(sim, torch.tensor([0, 1, 2, 0, 1, 5]))
    grad, = torch.autograd.grad(loss, sim)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_alpa_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ALPALoss()(torch.zeros(3, 4), torch.arange(3))
    with pytest.raises(ValueError):
        ALPALoss()(torch.zeros(3, 3), torch.arange(4))


@settings(max_examples=25, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=7), seed=st.integers(0, 2**16))
def test_alpa_matches_reference_for_any_labels(labels, seed):
    labels = torch.tensor(labels)
    sim = similarity_matrix(len(labels), seed=seed)
    ours, ref = ALPALoss(10.0)(sim, labels), reference_alpa_loss(sim, labels, 10.0)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
