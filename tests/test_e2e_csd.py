"""Test time end to end: a checkpoint in the authors' layout -> feature_collect.py -> CSD.py."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ALPA.attention import AttentionSimilarity
from CSD import feature_collect
from tests.fixtures import authors_checkpoint
from util.checkpoint import load_model, load_weights, read_checkpoint
from util.errors import UserError
from util.networks import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_authors_checkpoint_loads(tmp_path):
    model, attention = authors_checkpoint(tmp_path / 'ckpt.pth')
    ck = read_checkpoint(str(tmp_path / 'ckpt.pth'))
    assert ck['epoch'] == 500 and ck['opt'].model == 'resnet18'
    loaded, info = load_model(str(tmp_path / 'ckpt.pth'))
    assert info['arch'] == 'resnet18-supcon'   # inferred from opt.model + head.* keys
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    att = AttentionSimilarity(64, 80)
    load_weights(att, ck['attention'])
    assert torch.equal(att.query[0].weight, attention.query[0].weight)


def test_supcontrast_and_bare_state_dict(tmp_path):
    model = build_model('resnet18-ce', width=8)
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    loaded, info = load_model(str(tmp_path / 'bare.pth'), 'resnet18-ce')
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    # torchvision-style keys (no encoder. prefix) go under encoder.
    tv = {k.replace('encoder.', '', 1): v for k, v in model.state_dict().items()}
    torch.save({'state_dict': {'module.' + k: v for k, v in tv.items()}}, tmp_path / 'tv.pth')
    loaded, _ = load_model(str(tmp_path / 'tv.pth'), 'resnet18-ce')
    assert torch.equal(loaded.encoder.conv1.weight, model.encoder.conv1.weight)


def test_wrong_arch_names_keys(tmp_path):
    authors_checkpoint(tmp_path / 'ckpt.pth')
    # A SupCon checkpoint read as CE: the unused head is set aside (with a note), the missing
    # classifier is an error.
    with pytest.raises(UserError, match=r'missing: .*fc\.weight'):
        load_model(str(tmp_path / 'ckpt.pth'), 'resnet18-ce')
    with pytest.raises(UserError, match='layer1.2'):
        load_model(str(tmp_path / 'ckpt.pth'), 'resnet34-supcon')


def collect_args(data_root, tmp_path, ckp, *extra):
    return feature_collect.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(ckp), '--name', 'authors', '--data-root', str(data_root),
        '--cache-dir', str(tmp_path / 'cache'), '--num-workers', '0', '--batch-size', '16', '--device', 'cpu',
        '--out-datasets', 'SVHN', 'dtd', 'places365', str(data_root / 'my_ood_folder'), *extra])


def test_feature_collect_shapes_and_cache(data_root, tmp_path, capsys):
    authors_checkpoint(tmp_path / 'ckpt.pth')
    splits = feature_collect.main(collect_args(data_root, tmp_path, tmp_path / 'ckpt.pth'))
    assert set(splits) == {'train', 'test', 'SVHN', 'dtd', 'places365', 'my_ood_folder'}
    assert splits['train']['features'].shape == (40, 6, 64)
    assert splits['SVHN']['features'].shape == (12, 6, 64) and splits['dtd']['features'].shape == (10, 6, 64)
    assert 'logits' not in splits['train']   # SupCon model: no classifier
    # second run: everything from the cache
    capsys.readouterr()
    again = feature_collect.main(collect_args(data_root, tmp_path, tmp_path / 'ckpt.pth'))
    out = capsys.readouterr().out
    assert out.count('[cache]') == 6 and '[features]' not in out
    np.testing.assert_array_equal(again['dtd']['features'], splits['dtd']['features'])
    # a different checkpoint (same path, new bytes) is never served from the old cache
    torch.manual_seed(1)
    m = build_model('resnet18-supcon', width=8)
    torch.save({'model': m.state_dict(), 'opt': argparse.Namespace(model='resnet18'), 'epoch': 1}, tmp_path / 'ckpt.pth')
    capsys.readouterr()
    third = feature_collect.main(collect_args(data_root, tmp_path, tmp_path / 'ckpt.pth'))
    assert capsys.readouterr().out.count('[cache]') == 0
    assert not np.allclose(third['train']['features'], splits['train']['features'])


def test_features_match_direct_forward(data_root, tmp_path):
    """The stored vectors are docs/METHOD.md §2's pooling of the model's own last-stage map: the fp32
    store holds it as computed, the default fp16 store holds exactly its fp16 rounding."""
    from util import data as data_lib
    from util.features import multi_scale_pool
    model, _ = authors_checkpoint(tmp_path / 'ckpt.pth')
    fp32 = feature_collect.main(collect_args(data_root, tmp_path, tmp_path / 'ckpt.pth', '--dtype', 'fp32'))
    fp16 = feature_collect.main(collect_args(data_root, tmp_path, tmp_path / 'ckpt.pth'))
    ds = data_lib.get_id_dataset('CIFAR-10', str(data_root), 'test', data_lib.test_transform('CIFAR-10'))
    x = torch.stack([ds[i][0] for i in range(3)])
    model.eval()
    with torch.no_grad():
        expect = multi_scale_pool(model.forward_features(x)).numpy()
    assert fp32['test']['features'].dtype == np.float32 and fp16['test']['features'].dtype == np.float16
    np.testing.assert_allclose(fp32['test']['features'][:3], expect, rtol=1e-4, atol=1e-5)
    for split in fp32:
        np.testing.assert_array_equal(fp16[split]['features'], np.asarray(fp32[split]['features']).astype(np.float16))
        np.testing.assert_array_equal(fp16[split]['labels'], fp32[split]['labels'])


def test_csd_cli_end_to_end(data_root, tmp_path):
    authors_checkpoint(tmp_path / 'ckpt.pth')
    cmd = [sys.executable, os.path.join(REPO, 'CSD', 'CSD.py'), '--in-dataset', 'CIFAR-10',
           '--ckp', str(tmp_path / 'ckpt.pth'), '--name', 'authors', '--data-root', str(data_root),
           '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'results'),
           '--num-workers', '0', '--out-datasets', 'SVHN', 'dtd', 'places365', str(data_root / 'my_ood_folder'),
           '--method', 'knn', 'csd', '--k', '5', '3']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = [i for i, l in enumerate(lines) if l.split()[:4] == ['OOD', 'FPR', 'AUROC', 'AUIN']]
    assert len(header) == 2   # one table per method
    for h in header:
        names = [lines[h + j].split()[0] for j in range(1, 6)]
        assert names == ['SVHN', 'dtd', 'places365', 'my_ood_folder', 'AVG']
        vals = np.array([[float(v) for v in lines[h + j].split()[1:]] for j in range(1, 6)])
        assert np.all((vals >= 0) & (vals <= 100))
        np.testing.assert_allclose(vals[4], vals[:4].mean(0), atol=0.006)   # AVG recomputed
    res = json.loads((tmp_path / 'results' / 'CIFAR-10' / 'authors' / 'csd_k3.json').read_text())
    assert res['meta']['k'] == 3 and set(res['metrics']) == {'SVHN', 'dtd', 'places365', 'my_ood_folder'}
    assert (tmp_path / 'results' / 'CIFAR-10' / 'authors' / 'knn_k5.csv').read_text().startswith('OOD,FPR,AUROC,AUIN')


@pytest.mark.slow
def test_csd_cli_user_errors(data_root, tmp_path):
    authors_checkpoint(tmp_path / 'ckpt.pth')
    base = [sys.executable, os.path.join(REPO, 'CSD', 'CSD.py'), '--in-dataset', 'CIFAR-10',
            '--data-root', str(data_root), '--cache-dir', str(tmp_path / 'cache'), '--num-workers', '0']
    cases = [
        (['--ckp', str(tmp_path / 'nope.pth')], 'nope.pth'),
        (['--ckp', str(tmp_path / 'ckpt.pth'), '--out-datasets', 'Textures2'], 'Textures2'),
        (['--ckp', str(tmp_path / 'ckpt.pth'), '--out-datasets', 'SVHN', '--k', '1000', '--method', 'knn'], '--k 1000'),
    ]
    for extra, needle in cases:
        proc = subprocess.run(base + extra, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert err[-1].startswith('error: ') and needle in err[-1] and 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_demo_cifar_sh(data_root, tmp_path):
    authors_checkpoint(tmp_path / 'ckpt.pth')
    env = dict(os.environ, PY=sys.executable, CKP=str(tmp_path / 'ckpt.pth'), DATA=str(data_root),
               OOD='SVHN dtd places365', K_KNN='5', K_CSD='3', NAME='demo',
               CACHE=str(tmp_path / 'cache'), RESULTS=str(tmp_path / 'results'))
    script = os.path.join(REPO, 'demo_cifar.sh')
    proc = subprocess.run(['bash', script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('AVG') == 2 and 'KNN (k=5)' in proc.stdout and 'CSD (k=3)' in proc.stdout
    proc = subprocess.run(['bash', script], capture_output=True, text=True, env=dict(env, CKP=str(tmp_path / 'no.pth')))
    assert proc.returncode == 2 and 'no.pth does not exist' in proc.stderr
