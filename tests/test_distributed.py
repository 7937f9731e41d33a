"""DDP on CPU with gloo: the gathered global-batch losses and gradients equal one process's."""
import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ALPA.attention import AttentionSimilarity
from ALPA.engine import Trainer, TrainForward
from util.networks import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _setup(loss):
    torch.manual_seed(0)
    net = build_model(f'resnet18-{loss}', width=4, num_classes=3).eval()  # eval: BN uses running stats
    att = AttentionSimilarity(net.encoder.out_dim, 8)
    args = argparse.Namespace(loss=loss, temp=0.1, temperature_s=10.0, lam=1.0, alpa_train=True,
                              alpa_finetune=False, amp=False, amp_dtype='auto', channels_last=False)
    g = torch.Generator().manual_seed(1)
    views = torch.randn(2, 8, 3, 32, 32, generator=g)      # [view, B=8, ...]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    return net, att, args, views, labels


def _grads(net, att):
    return {n: p.grad.clone() for n, p in [*net.named_parameters(), *(('att.' + k, v) for k, v in att.named_parameters())]
            if p.grad is not None}


def _worker(rank, world, port, loss, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    net, att, args, views, labels = _setup(loss)
    b = labels.shape[0] // world
    mine = slice(rank * b, (rank + 1) * b)
    fwd = torch.nn.parallel.DistributedDataParallel(TrainForward(net))
    datt = torch.nn.parallel.DistributedDataParallel(att)
    trainer = Trainer(args, fwd, datt, None, torch.device('cpu'), None)
    images = torch.cat([views[0, mine], views[1, mine]])  # this rank's view-major local batch
    terms = trainer.losses(images, labels[mine])
    terms['loss'].backward()
    torch.save({'terms': {k: v.item() for k, v in terms.items()}, 'grads': _grads(net, att)}, out.format(rank))
    dist.destroy_process_group()


@pytest.mark.parametrize('loss', ['supcon', 'ce'])
def test_ddp_matches_single_process(loss, tmp_path):
    net, att, args, views, labels = _setup(loss)
    trainer = Trainer(args, TrainForward(net), att, None, torch.device('cpu'), None)
    terms = trainer.losses(torch.cat([views[0], views[1]]), labels)
    terms['loss'].backward()
    single = _grads(net, att)
    every = {n for n, _ in net.named_parameters()} | {'att.' + n for n, _ in att.named_parameters()}
    assert set(single) == every          # the loss reaches every parameter
    out = str(tmp_path / 'rank{}.pt')
    mp.start_processes(_worker, args=(2, _free_port(), loss, out), nprocs=2, start_method='spawn', join=True)
    for r in range(2):
        got = torch.load(out.format(r), weights_only=True)
        for k, v in terms.items():
            assert got['terms'][k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
        assert set(got['grads']) == every   # and so does each rank's, through the gather
        for k, g in single.items():
            torch.testing.assert_close(got['grads'][k], g, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_torchrun_two_processes_train(data_root, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()),
           os.path.join(REPO, 'ALPA', 'main_supcon.py'), '--dataset', 'cifar10', '--data-root', str(data_root),
           '--width', '4', '--batch-size', '8', '--epochs', '1', '--num-workers', '0', '--alpa-train',
           '--inner-size', '8', '--save-folder', str(tmp_path), '--device', 'cpu', '--eval', 'none']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'cpu x2' in proc.stdout and 'epoch 1:' in proc.stdout
    last = [os.path.join(d, 'last.pth') for d, _, f in os.walk(tmp_path) if 'last.pth' in f]
    assert len(last) == 1
