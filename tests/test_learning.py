"""The losses train: on one fixed batch, ALPA-train lowers both the SupCon and the ALPA term,
and ALPA-finetune lowers ALPA alone. A loss that lost its graph (detached, or a term with no
path to the weights) fails here."""
import argparse

import torch

from ALPA.attention import AttentionSimilarity
from ALPA.engine import Trainer, TrainForward
from util.networks import build_model


def fit_one_batch(steps=30, finetune=False, detach_alpa=False):
    torch.manual_seed(0)
    net = build_model('resnet18-supcon', width=8, feat_dim=32)
    att = AttentionSimilarity(net.encoder.out_dim, 16)
    args = argparse.Namespace(loss='supcon', temp=0.1, temperature_s=10.0, lam=1.0, alpa_train=not finetune,
                              alpa_finetune=finetune, amp=False, amp_dtype='auto', channels_last=False)
    opt = torch.optim.SGD([*net.parameters(), *att.parameters()], lr=0.05, momentum=0.9)
    trainer = Trainer(args, TrainForward(net), att, opt, torch.device('cpu'), None)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(32, 3, 32, 32, generator=g)            # 2 views x 16 images, view-major
    labels = torch.arange(16) % 4
    net.train(), att.train()
    history = []
    for _ in range(steps):
        terms = trainer.losses(images, labels)
        loss = terms['loss'] - terms['alpa'] + terms['alpa'].detach() if detach_alpa else terms['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


def test_alpa_train_lowers_both_losses():
    h = fit_one_batch()
    assert h[-1]['supcon'] < 0.8 * h[0]['supcon'], (h[0], h[-1])
    assert h[-1]['alpa'] < 0.9 * h[0]['alpa'], (h[0], h[-1])
    # SupCon alone already pulls the ALPA term down (class-clustered maps align better), so
    # compare with the same run whose ALPA term sends no gradient: it must end clearly higher.
    detached = fit_one_batch(detach_alpa=True)
    assert h[-1]['alpa'] < detached[-1]['alpa'] - 0.1, (h[-1], detached[-1])


def test_alpa_finetune_alone_lowers_alpa():
    h = fit_one_batch(finetune=True)
    assert set(h[0]) == {'alpa', 'loss'}
    assert h[-1]['alpa'] < 0.8 * h[0]['alpa'], (h[0], h[-1])
