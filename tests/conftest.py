"""Shared fixtures: a tiny data root in the authors' layout, written once per session."""
import os

import pytest
import torch

from tests.fixtures import write_bad_checkpoints, write_cifar10, write_image_folder, write_svhn_mat

os.environ.setdefault('MODE_NO_PROGRESS', '1')
# Under pytest-xdist (`-n 2`, as test.sh runs) each worker takes one core.
torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else min(2, torch.get_num_threads()))


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """datasets/ with CIFAR-10 (4 train + 2 test images per class), the selected SVHN subset,
    dtd/images (nested) and places365/test_subset, plus a free-standing image folder."""
    root = tmp_path_factory.mktemp('datasets')
    write_cifar10(str(root), n_per_class=4, n_test_per_class=2)
    write_svhn_mat(str(root / 'ood_data' / 'svhn' / 'selected_test_32x32.mat'), n=12)
    write_image_folder(str(root / 'ood_data' / 'dtd' / 'images'), 10, size=48, nested=True, ext='jpg')
    write_image_folder(str(root / 'ood_data' / 'places365' / 'test_subset'), 8, size=40, nested=True)
    write_image_folder(str(root / 'my_ood_folder'), 6, size=32)
    return root


@pytest.fixture(scope='session')
def ckpts(tmp_path_factory):
    """A real checkpoint (the authors' layout, width 8), its first half, a malicious one, a text
    file, a folder and a diverged (NaN) checkpoint: ``tests.fixtures.write_bad_checkpoints``."""
    return write_bad_checkpoints(tmp_path_factory.mktemp('ckpts'))


@pytest.fixture(scope='session')
def probe(data_root, tmp_path_factory):
    """A tiny SupCon encoder trained on ``data_root``'s CIFAR-10 and its linear probe ->
    (encoder last.pth, linear.pth, the probe's ID accuracy)."""
    from ALPA import main_linear, main_supcon
    from tests.fixtures import find_last, tiny_train_argv
    tmp = tmp_path_factory.mktemp('probe')
    main_supcon.main(main_supcon.get_args_parser().parse_args(tiny_train_argv(data_root, tmp / 's', '--device', 'cpu')))
    out = main_linear.main(main_linear.get_args_parser().parse_args([
        '--ckp', find_last(tmp / 's'), '--dataset', 'cifar10', '--data-root', str(data_root), '--epochs', '2',
        '--batch-size', '16', '--num-workers', '0', '--device', 'cpu', '--save-folder', str(tmp / 'probe')]))
    assert 0.0 <= out['accuracy'] <= 1.0 and out['path'].endswith('linear.pth')
    return find_last(tmp / 's'), out['path'], out['accuracy']


@pytest.fixture
def tf32_flags():
    """The process-wide fp32 precision flags (CUDA matmul, cuDNN conv), given back after the test."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    yield matmul, conv
    matmul.fp32_precision, conv.fp32_precision = saved


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than ~20 s on 2 CPU cores; skip with -m "not slow"')
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one)')


def pytest_collection_modifyitems(config, items):
    # The one-line-error CLI cases share a module fixture that runs every bad input through
    # the real entry scripts (~25 s): all of them are slow.
    for item in items:
        if 'cli_errors' in getattr(item, 'fixturenames', ()):
            item.add_marker(pytest.mark.slow)
