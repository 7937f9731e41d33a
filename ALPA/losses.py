"""Training losses: SupContrast's SupCon loss and ALPA's loss over attention similarities.

Both are the same contrastive form over a logit matrix with self-pairs removed:

    L = -1/A Σ_i (1/|P(i)|) Σ_{p∈P(i)} log( exp(l_ip) / Σ_{a≠i} exp(l_ia) )

An anchor with no positive (|P(i)| = 0) adds 0 and still counts in A; SupContrast
itself returns NaN there.
"""
import torch
import torch.nn as nn


def mean_log_prob_positives(logits, self_mask, positive_mask):
    """Per anchor, the mean log-softmax over its positives, the softmax leaving self out.

    Args:
        logits: [A, K] anchor-to-candidate logits.
        self_mask: [A, K] bool, True where the candidate is the anchor itself.
        positive_mask: [A, K] float or bool, 1 where the candidate is a positive.
    Returns:
        [A]; 0 for an anchor without positives (never NaN).
    """
    others = ~self_mask
    positive_mask = positive_mask.to(logits.dtype) * others
    # The max over the non-self candidates keeps the largest term of the denominator at
    # exp(0) = 1, so its log never underflows to -inf whatever the logit scale.
    row_max = logits.detach().masked_fill(self_mask, float("-inf")).amax(dim=1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = logits - row_max  # [A, K]
    denom = shifted.masked_fill(self_mask, float("-inf")).exp().sum(dim=1, keepdim=True)
    # An anchor with nothing to contrast (a batch of one) has an empty sum; it has no
    # positives either, so any finite stand-in keeps it at 0 without a NaN gradient.
    denom = torch.where(others.any(dim=1, keepdim=True), denom, torch.ones_like(denom))
    log_prob = shifted - denom.log()  # [A, K], finite everywhere
    num_positives = positive_mask.sum(dim=1)  # [A]
    return (positive_mask * log_prob).sum(dim=1) / num_positives.clamp_min(1)


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020), SupContrast's interface.

    forward(features [B, n_views, D], labels [B] or None, mask [B, B] or None) -> scalar.
    Views are stacked view-major (row v·B + b). With ``contrast_mode='all'`` every view
    is an anchor; with ``'one'`` only view 0. Positives of an anchor: all other views of
    samples with its label (``labels``), or with ``mask[i, j] = 1`` (``mask``, may be
    asymmetric), or only its own other views when both are None (SimCLR).

        loss = -(T / T_base) · mean_i (1/|P(i)|) Σ_{p∈P(i)} log softmax_{a≠i}(z_i·z_a / T)_p

    ``features`` are expected L2-normalised (SupContrast does it in the head).
    """

    def __init__(self, temperature=0.07, contrast_mode="all", base_temperature=0.07):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        self.temperature = temperature
        self.contrast_mode = contrast_mode
        self.base_temperature = base_temperature

    def forward(self, features, labels=None, mask=None):
        if features.dim() < 3:
            raise ValueError("features must be [bsz, n_views, ...], at least 3 dimensions")
        features = features.flatten(2)  # [B, V, D]
        batch, n_views = features.shape[:2]
        device = features.device
        if labels is not None and mask is not None:
            raise ValueError("pass labels or mask, not both")
        if mask is None:
            if labels is None:
                mask = torch.eye(batch, device=device)
            else:
                labels = labels.reshape(-1, 1)
                if labels.shape[0] != batch:
                    raise ValueError(f"{labels.shape[0]} labels for {batch} samples")
                mask = (labels == labels.T).float()
        mask = mask.float().to(device)  # [B, B]

        contrast = features.transpose(0, 1).reshape(n_views * batch, -1)  # [V·B, D]
        anchors = contrast if self.contrast_mode == "all" else features[:, 0]  # [A, D]
        num_anchors = anchors.shape[0]
        logits = anchors @ contrast.T / self.temperature  # [A, V·B]
        positive_mask = mask.repeat(num_anchors // batch, n_views)  # [A, V·B]
        # Built on the device: indexing a CUDA tensor with CPU aranges costs a transfer and a sync.
        self_mask = torch.eye(num_anchors, logits.shape[1], dtype=torch.bool, device=device)
        mean_log_prob = mean_log_prob_positives(logits, self_mask, positive_mask)  # [A]
        return -(self.temperature / self.base_temperature) * mean_log_prob.mean()


class ALPALoss(nn.Module):
    """ALPA's contrastive loss over the [N, N] attention similarity of all N = 2B views.

        logits = similarity · τ_s            (τ_s is an *inverse* temperature)
        loss   = -mean_i (1/|P(i)|) Σ_{p∈P(i)} log softmax_{a≠i}(logits_i)_p
        P(i)   = {p ≠ i : labels_p = labels_i}   (the other view of i included)

    forward(similarity [N, N], labels [N]) -> scalar.
    """

    def __init__(self, temperature_s=10.0):
        super().__init__()
        self.temperature_s = temperature_s

    def forward(self, similarity, labels):
        n = similarity.shape[0]
        if similarity.shape != (n, n) or labels.shape != (n,):
            raise ValueError(f"need similarity [N, N] and labels [N], got "
                             f"{tuple(similarity.shape)} and {tuple(labels.shape)}")
        logits = similarity * self.temperature_s  # [N, N]
        self_mask = torch.eye(n, dtype=torch.bool, device=similarity.device)
        positive_mask = labels.reshape(-1, 1) == labels.reshape(1, -1)  # [N, N]
        return -mean_log_prob_positives(logits, self_mask, positive_mask).mean()
