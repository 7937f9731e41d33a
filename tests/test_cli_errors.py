"""Bad input at the command line: every entry script stops with one ``error:`` line naming the
file or flag and what to do (exit 2, no traceback), and a checkpoint that would run code is
refused before anything is unpickled."""
import pickle
import sys
import warnings

import pytest

from tests.clitools import REPO, assert_one_line_error, run_all
from tests.fixtures import (
    malicious_checkpoint,
)
from util import ood as ood_lib
from util.checkpoint import read_checkpoint
from util.errors import UserError


# ---------------------------------------------------------------- 1. bad input -> one line, exit 2
@pytest.fixture(scope='module')
def cli_errors(data_root, ckpts, tmp_path_factory):
    """Every bad-input case through the real CLIs, run concurrently once for this module."""
    work = tmp_path_factory.mktemp('cli')
    (work / 'empty_folder').mkdir()
    py = sys.executable
    csd = [py, str(REPO / 'CSD' / 'CSD.py'), '--in-dataset', 'CIFAR-10', '--num-workers', '0', '--device', 'cpu',
           '--cache-dir', str(work / 'cache'), '--output-dir', str(work / 'results')]
    collect = [py, str(REPO / 'CSD' / 'feature_collect.py'), *csd[2:-2]]
    good = ['--ckp', str(ckpts / 'ckpt.pth'), '--data-root', str(data_root)]
    cmds = {
        'missing_data_root': collect + ['--ckp', str(ckpts / 'ckpt.pth'), '--data-root', str(work / 'no_such_root'),
                                        '--out-datasets', 'SVHN'],
        'empty_ood_folder': csd + good + ['--out-datasets', 'SVHN', str(work / 'empty_folder')],
        'wrong_model_arch': csd + good + ['--model-arch', 'resnet18-ce', '--out-datasets', 'SVHN'],
        'truncated_ckpt': collect + ['--ckp', str(ckpts / 'half.pth'), '--data-root', str(data_root)],
        'unknown_ood_name': collect + good + ['--out-datasets', 'SVHN', 'dtd', 'Textures2',
                                              '--cache-dir', str(work / 'cache_unknown')],
        'malicious_ckpt': csd + ['--ckp', str(ckpts / 'evil.pth'), '--data-root', str(data_root)],
        'text_ckpt': csd + ['--ckp', str(ckpts / 'notes.txt'), '--data-root', str(data_root), '--out-datasets', 'SVHN'],
        'dir_ckpt': csd + ['--ckp', str(ckpts / 'a_run_folder'), '--data-root', str(data_root), '--out-datasets', 'SVHN'],
        'k_zero': csd + good + ['--out-datasets', 'SVHN', '--method', 'knn', '--k', '0'],
        'nan_ckpt': csd + ['--ckp', str(ckpts / 'nan.pth'), '--data-root', str(data_root), '--out-datasets', 'SVHN',
                           '--cache-dir', str(work / 'cache_nan')],
        'train_wrong_model_for_ckp': [
            py, str(REPO / 'ALPA' / 'main_supcon.py'), '--dataset', 'cifar10', '--data-root', str(data_root),
            '--model', 'resnet34', '--width', '8', '--batch-size', '8', '--epochs', '1', '--num-workers', '0',
            '--device', 'cpu', '--save-folder', str(work / 'save'), '--alpa-finetune', '--ckp', str(ckpts / 'ckpt.pth')],
    }
    # Two through a real fresh interpreter (each entry script's __main__ wiring is run that way
    # elsewhere too); the rest in this process, the same code from the flags on.
    in_process = [name for name in cmds if name not in ('missing_data_root', 'malicious_ckpt')]
    return {'work': work, **run_all(cmds, cwd=work, in_process=in_process)}


def test_cli_missing_dataset_directory(cli_errors):
    last = assert_one_line_error(cli_errors['missing_data_root'], 'CIFAR-10 not found at', 'no_such_root',
                                 'cifar-10-batches-py')
    assert '--download' in last   # says what to do


def test_cli_empty_image_folder_as_ood_set(cli_errors):
    assert_one_line_error(cli_errors['empty_ood_folder'], 'no images in', 'empty_folder')


def test_cli_wrong_model_arch_names_the_keys(cli_errors):
    # A SupCon checkpoint read as CE: its head is set aside with a note, the missing fc is the error.
    assert_one_line_error(cli_errors['wrong_model_arch'], 'does not match this architecture',
                          'missing: fc.weight', '--model-arch')
    assert 'ignoring head.0.bias' in cli_errors['wrong_model_arch'].stdout


def test_cli_text_file_as_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['text_ckpt'], 'notes.txt', 'not a PyTorch checkpoint')


def test_cli_directory_as_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['dir_ckpt'], 'a_run_folder', 'is a directory', 'last.pth')


def test_cli_k_zero_is_an_error(cli_errors):
    assert_one_line_error(cli_errors['k_zero'], '--k 0', 'k >= 1')


def test_cli_nan_weights_stop_extraction(cli_errors):
    assert_one_line_error(cli_errors['nan_ckpt'], 'nan.pth', 'non-finite')
    assert 'FPR' not in cli_errors['nan_ckpt'].stdout   # no table of FPR 0.00 / AUROC 50.00


def test_cli_truncated_checkpoint(cli_errors):
    assert_one_line_error(cli_errors['truncated_ckpt'], 'half.pth', 'corrupt or truncated')


def test_cli_unknown_ood_name_fails_before_any_extraction(cli_errors):
    proc = cli_errors['unknown_ood_name']
    last = assert_one_line_error(proc, "unknown OOD dataset 'Textures2'")
    for known in ood_lib.OOD_DATASETS:
        assert known in last
    # Checked up front: no split was extracted or cached before the typo was reported.
    assert '[features]' not in proc.stdout and '[cache]' not in proc.stdout, proc.stdout
    assert not (cli_errors['work'] / 'cache_unknown').exists()


def test_cli_training_with_a_checkpoint_of_another_model(cli_errors):
    assert_one_line_error(cli_errors['train_wrong_model_for_ckp'], 'ckpt.pth does not match this architecture',
                          'missing: encoder.layer1.2', '--model')


def test_ood_names_are_resolved_without_reading_data(data_root, tmp_path):
    """Aliases, case, ``<id>-heldout`` spellings and existing folders pass the up-front check;
    anything else is a UserError listing the known names."""
    assert ood_lib.resolve_ood_name('svhn') == 'SVHN'
    assert ood_lib.resolve_ood_name('Textures') == 'dtd'
    assert ood_lib.resolve_ood_name('cifar10-heldout') == 'CIFAR-10-heldout'
    assert ood_lib.resolve_ood_name(str(data_root / 'my_ood_folder')) == str(data_root / 'my_ood_folder')
    with pytest.raises(UserError, match=r"unknown OOD dataset '.*my_ood_folder_typo'.*SVHN, dtd"):
        ood_lib.resolve_ood_name(str(data_root / 'my_ood_folder_typo'))
    with pytest.raises(UserError, match="unknown in-distribution dataset 'cifar11'"):
        ood_lib.resolve_ood_name('cifar11-heldout')



# ---------------------------------------------------------------- 3. untrusted checkpoints
@pytest.mark.parametrize('how', ['torch', 'pickle'])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, how):
    marker = tmp_path / 'PWNED'
    path = malicious_checkpoint(tmp_path / f'evil_{how}.pth', marker, how)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # torch notes the bare pickle's protocol
        with pytest.raises(UserError, match=r"refusing to load .*evil_.*could run code"):
            read_checkpoint(str(path))
    assert not marker.exists()
    # The same file under plain pickle does run the command: the guard above is what stops it.
    if how == 'pickle':
        with open(path, 'rb') as f:
            pickle.load(f)
        assert marker.exists()


def test_cli_refuses_checkpoint_that_would_run_code(cli_errors, ckpts):
    assert_one_line_error(cli_errors['malicious_ckpt'], 'refusing to load', 'evil.pth', 'could run code')
    assert not (ckpts / 'PWNED').exists()
