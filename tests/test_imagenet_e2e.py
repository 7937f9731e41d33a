"""The ImageNet path end to end on a fixture ImageFolder of tiny JPEGs: the paper's
ResNet-50 SupCon model, Resize(256) + CenterCrop(224), against the four ImageNet OOD folders;
KNN with Sun et al.'s k = 1000 and CSD with k = 10 through the CLI."""
import json
import os

import numpy as np
import pytest
import torch

from tests.fixtures import write_image_folder, write_imagenet, write_svhn_mat


def test_a_missing_ood_folder_is_named_before_any_forward_pass(tmp_path):
    from CSD import CSD as csd_cli
    from util.errors import UserError
    from util.networks import build_model
    root = tmp_path / 'datasets'
    write_imagenet(root, num_classes=2, n_per_class=2, size=24)
    write_image_folder(root / 'ood_data' / 'SUN', 2, ext='jpg')
    torch.save({'model': build_model('resnet50-imagenet-supcon').state_dict()}, tmp_path / 'r50.pth')
    argv = ['--in-dataset', 'imagenet', '--ckp', str(tmp_path / 'r50.pth'), '--model-arch', 'resnet50-imagenet-supcon',
            '--data-root', str(root), '--cache-dir', str(tmp_path / 'cache'), '--num-workers', '0', '--device', 'cpu',
            '--out-datasets', 'iNaturalist', 'SUN', 'Places']
    with pytest.raises(UserError) as e:
        csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    msg = str(e.value)
    assert 'iNaturalist not found at ' in msg and 'Places not found at ' in msg and 'SUN not found' not in msg
    assert 'iNaturalist.tar.gz' in msg and not (tmp_path / 'cache').exists()   # nothing was extracted


def test_imagenet_resnet50_on_the_four_ood_folders_and_its_default_k(tmp_path):
    """The ImageNet path (ResNet-50 SupCon, Resize(256) + CenterCrop(224), ImageNet's
    constants, the four OOD folders, dtd nested) on a 12-image bank; then the same run without
    --k asks for Sun et al.'s k = 1000 for KNN, which this bank cannot give (a one-line error
    that names it, from the cached features). k = 1000 itself: the next test."""
    from CSD import CSD as csd_cli
    from util.errors import UserError
    from util.networks import build_model
    root = tmp_path / 'datasets'
    classes = write_imagenet(root, num_classes=4, n_per_class=3, size=24, n_val_per_class=3)
    for i, (name, folder) in enumerate([('iNaturalist', 'iNaturalist'), ('SUN', 'SUN'), ('Places', 'Places'),
                                        ('dtd', 'dtd/images')]):
        write_image_folder(root / 'ood_data' / folder, 5, size=(30, 20), nested=name == 'dtd', ext='jpg', seed=10 + i)
    torch.manual_seed(0)
    model = build_model('resnet50-imagenet-supcon')
    torch.save({'model': model.state_dict()}, tmp_path / 'supcon_r50.pth')
    argv = ['--in-dataset', 'imagenet', '--model-arch', 'resnet50-imagenet-supcon', '--ckp',
            str(tmp_path / 'supcon_r50.pth'), '--data-root', str(root), '--cache-dir', str(tmp_path / 'cache'),
            '--output-dir', str(tmp_path / 'res'), '--num-workers', '0', '--batch-size', '64', '--device', 'cpu',
            '--method', 'knn', 'csd']
    out = csd_cli.main(csd_cli.get_args_parser().parse_args(argv + ['--k', '10', '10']))
    splits = out['splits']
    assert splits['train']['features'].shape == (12, 6, 2048) and splits['test']['features'].shape == (12, 6, 2048)
    assert set(out['results']['knn']) == {'iNaturalist', 'SUN', 'Places', 'dtd'}
    assert all(len(splits[n]['features']) == 5 for n in ('iNaturalist', 'SUN', 'Places', 'dtd'))
    np.testing.assert_array_equal(np.asarray(splits['test']['labels']), np.repeat(np.arange(4), 3))
    assert len(classes) == 4
    for method in ('knn', 'csd'):
        meta = json.loads(next((tmp_path / 'res').rglob(f'{method}_k10.json')).read_text())['meta']
        assert meta['k'] == 10 and meta['in_dataset'] == 'imagenet' and meta['arch'] == 'resnet50-imagenet-supcon'
        assert meta['test_norm']['mean'] == pytest.approx([0.485, 0.456, 0.406])
        assert all(np.isfinite(out['scores'][method][0]))
    assert os.path.isdir(tmp_path / 'res' / 'imagenet')
    with pytest.raises(UserError, match=r'--k 1000 is out of range: the bank holds 12 vectors'):
        csd_cli.main(csd_cli.get_args_parser().parse_args(argv))


def test_knn_k1000_and_csd_through_the_cli_on_a_1008_image_bank(tmp_path):
    """KNN with k = 1000 (Sun et al.'s ImageNet k) through the CLI: the 1000th of the 1008
    global vectors, as a hand search finds it; CSD's k = 10 beside it. A small model on 32×32
    images: k = 1000 does not depend on the backbone (the ResNet-50 path: the test above)."""
    from CSD import CSD as csd_cli
    from tests.fixtures import authors_checkpoint, write_cifar10
    root = tmp_path / 'datasets'
    write_cifar10(str(root), n_per_class=101, n_test_per_class=2)                        # 1010-image bank
    write_svhn_mat(str(root / 'ood_data' / 'svhn' / 'selected_test_32x32.mat'), n=12)
    authors_checkpoint(tmp_path / 'ckpt.pth', width=4)
    out = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ckpt.pth'), '--data-root', str(root),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--device', 'cpu', '--out-datasets', 'SVHN', '--method', 'knn', 'csd', '--k', '1000', '10']))
    splits = out['splits']
    assert splits['train']['features'].shape[0] == 1010
    from util.features import l2_normalize
    bank = l2_normalize(np.asarray(splits['train']['features'][:, 4], dtype=np.float32))
    for split, scores in (('test', out['scores']['knn'][0]), ('SVHN', out['scores']['knn'][1]['SVHN'])):
        q = l2_normalize(np.asarray(splits[split]['features'][:, 4], dtype=np.float32))
        d = np.sort(((q[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1), axis=1)[:, 999]
        np.testing.assert_allclose(-scores, d, rtol=1e-4, atol=1e-5)
    meta = json.loads(next((tmp_path / 'res').rglob('knn_k1000.json')).read_text())['meta']
    assert meta['k'] == 1000 and all(np.isfinite(out['scores']['csd'][0]))
