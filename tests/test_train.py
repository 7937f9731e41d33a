"""Training end to end on fixture CIFAR-10: every mode with SupCon and CE, resume, DDP."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ALPA import main_ce, main_supcon
from CSD import feature_collect
from tests.fixtures import find_last, tiny_train_argv
from tests.fixtures import train_cli as run_train_cli
from util.checkpoint import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'supcon': main_supcon, 'ce': main_ce}


def train_args(script, data_root, save, *extra):
    return SCRIPTS[script].get_args_parser().parse_args(
        tiny_train_argv(data_root, save, '--device', 'cpu', *extra, evaluate='knn', eval_k=5))


def train_cli(script, data_root, save, *extra):
    """Run ``python ALPA/main_<script>.py`` as a user would; -> (last.pth path, stdout)."""
    proc = run_train_cli(script, tiny_train_argv(data_root, save, '--device', 'cpu', *extra, evaluate='knn', eval_k=5))
    return find_last(save), proc.stdout


@pytest.fixture(scope='module')
def base_ckpts(data_root, tmp_path_factory):
    return {s: train_cli(s, data_root, tmp_path_factory.mktemp('save'))[0] for s in SCRIPTS}


def collect(data_root, tmp_path, ckp):
    args = feature_collect.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', ckp, '--data-root', str(data_root), '--cache-dir', str(tmp_path / 'c'),
        '--num-workers', '0', '--device', 'cpu', '--out-datasets', 'SVHN'])
    return feature_collect.main(args)


@pytest.mark.parametrize('script', ['supcon', 'ce'])
@pytest.mark.parametrize('mode', ['base', 'alpa_train', 'alpa_finetune'])
def test_every_mode_trains_and_is_readable(script, mode, data_root, tmp_path, base_ckpts):
    extra = {'base': [], 'alpa_train': ['--alpa-train'],
             'alpa_finetune': ['--alpa-finetune', '--ckp', base_ckpts[script]]}[mode]
    if mode == 'base':
        last = base_ckpts[script]
    else:   # through the CLI, as a user runs it
        last, stdout = train_cli(script, data_root, tmp_path, *extra)
        epoch_line = next(l for l in stdout.splitlines() if l.startswith('epoch 1:'))
        stats = dict(item.split() for item in epoch_line[len('epoch 1: '):].split(', '))
        assert 'alpa' in stats and np.isfinite(float(stats['alpa']))
        assert ('supcon' in stats or 'ce' in stats) == (mode == 'alpa_train')
    ck = read_checkpoint(last)
    assert ck['epoch'] == 1 and ck['arch']['model_arch'] == f'resnet18-{script}'
    assert (ck['attention'] is not None) == (mode != 'base')
    if ck['attention']:
        assert set(ck['attention']) == {f'{p}.{i}.weight' for p in ('query', 'key', 'value') for i in (0, 2)}
    # read back by the test-time side with no --model-arch: the checkpoint records it
    splits = collect(data_root, tmp_path, last)
    assert splits['train']['features'].shape == (40, 6, 32)
    assert ('logits' in splits['test']) == (script == 'ce')


def test_finetune_starts_from_checkpoint(data_root, tmp_path, base_ckpts):
    out = main_supcon.main(train_args('supcon', data_root, tmp_path, '--alpa-finetune', '--ckp', base_ckpts['supcon'],
                                      '--learning-rate', '0'))   # lr 0: weights must stay those of --ckp
    a, b = read_checkpoint(base_ckpts['supcon'])['model'], read_checkpoint(out['last'])['model']
    assert all(torch.equal(a[k], b[k]) for k in a if 'num_batches_tracked' not in k and 'running' not in k)


def test_resume_is_exact(data_root, tmp_path):
    straight = main_supcon.main(train_args('supcon', data_root, tmp_path / 'a', '--epochs', '2', '--alpa-train',
                                           '--eval', 'none'))
    main_supcon.main(train_args('supcon', data_root, tmp_path / 'b', '--epochs', '1', '--alpa-train', '--eval', 'none'))
    resumed = main_supcon.main(train_args('supcon', data_root, tmp_path / 'b', '--epochs', '2', '--alpa-train',
                                          '--resume', 'auto', '--eval', 'none'))
    a, b = read_checkpoint(straight['last']), read_checkpoint(resumed['last'])
    assert a['epoch'] == b['epoch'] == 2
    for part in ('model', 'attention'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f'{part}.{k}'


@pytest.mark.slow
def test_cli_runs_and_bad_flags_are_one_line(data_root, tmp_path):
    script = os.path.join(REPO, 'ALPA', 'main_ce.py')
    common = ['--dataset', 'cifar10', '--data-root', str(data_root), '--width', '4', '--batch-size', '8',
              '--epochs', '1', '--num-workers', '0', '--save-folder', str(tmp_path), '--device', 'cpu', '--eval', 'classifier']
    proc = subprocess.run([sys.executable, script, *common], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'epoch 1:' in proc.stdout and 'ID test accuracy: classifier' in proc.stdout
    proc = subprocess.run([sys.executable, script, *common, '--alpa-finetune'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        'error: --alpa-finetune needs --ckp PATH (the trained checkpoint to fine-tune)'
    proc = subprocess.run([sys.executable, script, *common[:3], str(tmp_path / 'nothing'), *common[4:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'cifar-10-batches-py' in proc.stderr and 'Traceback' not in proc.stderr


def test_non_finite_loss_stops_and_keeps_last_good(data_root, tmp_path, monkeypatch):
    from ALPA import engine
    from util.errors import UserError
    first = main_supcon.main(train_args('supcon', data_root, tmp_path, '--epochs', '2', '--eval', 'none',
                                        '--lr-decay-epochs', '100'))
    good = {k: v.clone() for k, v in read_checkpoint(first['last'])['model'].items()}
    monkeypatch.setattr(engine.SupConLoss, 'forward', lambda self, *a, **k: torch.tensor(float('nan'), requires_grad=True))
    with pytest.raises(UserError, match=r'non-finite at epoch 3, step 0.*last good checkpoint: .*last\.pth'):
        main_supcon.main(train_args('supcon', data_root, tmp_path, '--epochs', '3', '--eval', 'none',
                                    '--lr-decay-epochs', '100', '--resume', 'auto'))
    kept = read_checkpoint(first['last'])
    assert kept['epoch'] == 2 and all(torch.equal(kept['model'][k], v) for k, v in good.items())


def test_dataset_path_class_folders(tmp_path):
    from tests.fixtures import write_image_folder
    for c in ('cat', 'dog'):
        write_image_folder(str(tmp_path / 'data' / c), 6, size=36, seed=len(c))
    out = main_ce.main(main_ce.get_args_parser().parse_args([
        '--dataset', 'path', '--data-root', str(tmp_path / 'data'), '--mean', '0.5,0.5,0.5', '--std', '0.25,0.25,0.25',
        '--size', '32', '--width', '4', '--batch-size', '4', '--epochs', '1', '--num-workers', '0',
        '--save-folder', str(tmp_path / 'save'), '--device', 'cpu']))
    ck = read_checkpoint(out['last'])
    assert ck['arch']['num_classes'] == 2 and ck['model']['fc.weight'].shape == (2, 32)
