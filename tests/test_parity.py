"""Parity with the authors' pipeline (docs/METHOD.md §5b, §6; issue 8), one test per item.

Each expectation is written from the paper's statement of what the authors' (and
SupContrast's / knn-ood's) code does, not from our own code.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ALPA import main_ce, main_supcon
from CSD import CSD as csd_cli
from CSD import feature_collect
from CSD.scoring import default_k
from tests.fixtures import tiny_train_argv
from tests.test_metrics import ref_authors_curve
from util import data as data_lib
from util import ood as ood_lib
from util.checkpoint import load_model, read_checkpoint
from util.errors import UserError
from util.features import multi_scale_pool
from util.metrics import cal_metric
from util.networks import build_model, resolve_arch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUTHORS_C10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
AUTHORS_C100_TRAIN = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))


def authors_test_transform(mean, std, size=32):
    """The authors' ``transform_test``, written out from docs/METHOD.md §5b."""
    return transforms.Compose([transforms.Resize((size, size)), transforms.CenterCrop(size),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def noisy_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def normalize_of(t):
    return [op for op in t.transforms if isinstance(op, transforms.Normalize)][0]


# ---------------------------------------------------------------- 1. CIFAR normalisation
def test_cifar_normalisation_is_the_authors():
    for spec_name, (mean, std) in (('CIFAR-10', AUTHORS_C10), ('CIFAR-100', AUTHORS_C100_TRAIN)):
        for t in (data_lib.test_transform(spec_name), data_lib.train_transform(spec_name, two_crop=False),
                  data_lib.train_transform(spec_name, two_crop=False, recipe='ce')):
            n = normalize_of(t)
            assert tuple(n.mean) == mean and tuple(n.std) == std


# ---------------------------------------------------------------- 3. the 32-px test transform
@pytest.mark.parametrize('size', [(32, 32), (300, 200), (45, 90), (33, 31)])
def test_test_transform_squashes_like_the_authors(size):
    img = noisy_image(*size)
    ours = data_lib.test_transform('CIFAR-10')(img)
    theirs = authors_test_transform(*AUTHORS_C10)(img)
    assert torch.equal(ours, theirs)


def test_imagenet_test_transform_is_resize256_crop224():
    img = noisy_image(400, 300)
    theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                 transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    assert torch.equal(data_lib.test_transform('imagenet')(img), theirs)


# ---------------------------------------------------------------- 2. test-time normalisation
def test_test_norm_follows_the_checkpoint():
    c100 = data_lib.get_spec('CIFAR-100')
    recorded = {'mean': [0.1, 0.2, 0.3], 'std': [0.4, 0.5, 0.6]}
    assert feature_collect.resolve_test_norm(None, c100, recorded) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 'checkpoint')
    # Nothing recorded (the authors', SupContrast's, knn-ood's): the authors' test pipeline,
    # which normalises CIFAR-100 with CIFAR-10's constants.
    assert feature_collect.resolve_test_norm(None, c100, {}) == (*AUTHORS_C10, 'paper')
    assert feature_collect.resolve_test_norm('paper', c100, recorded) == (*AUTHORS_C10, 'paper')
    assert feature_collect.resolve_test_norm('train', c100, recorded) == (*AUTHORS_C100_TRAIN, 'train')
    assert feature_collect.resolve_test_norm('(0.5,0.5,0.5),(0.25,0.25,0.25)', c100, {}) == \
        ((0.5,) * 3, (0.25,) * 3, 'given')
    with pytest.raises(UserError, match='--test-norm'):
        feature_collect.resolve_test_norm('0.5,0.5', c100, {})


# ---------------------------------------------------------------- 4. CE augmentation
def test_ce_augmentation_is_crop_and_flip_only():
    ce = data_lib.train_transform('CIFAR-10', two_crop=False, recipe='ce')
    kinds = [type(op) for op in ce.transforms]
    assert transforms.RandomApply not in kinds and transforms.RandomGrayscale not in kinds
    assert transforms.ColorJitter not in kinds
    crop = [op for op in ce.transforms if isinstance(op, transforms.RandomResizedCrop)][0]
    assert crop.size == (32, 32) and crop.scale == (0.2, 1.0)
    assert transforms.RandomHorizontalFlip in kinds
    supcon = data_lib.train_transform('CIFAR-10', two_crop=False, recipe='supcon')
    assert transforms.RandomGrayscale in [type(op) for op in supcon.transforms]


# ---------------------------------------------------------------- 5. flags
def small_train_argv(data_root, save, *extra):
    return tiny_train_argv(data_root, save, '--device', 'cpu', *extra, batch=16)


def test_feat_dim_is_the_alpa_inner_size_and_last_batch_is_kept(data_root, tmp_path):
    args = main_supcon.get_args_parser().parse_args(small_train_argv(data_root, tmp_path, '--alpa-train',
                                                                     '--feat-dim', '40'))
    out = main_supcon.main(args)
    ck = read_checkpoint(out['last'])
    assert ck['attention']['value.2.weight'].shape == (40, 32)     # d = 40 outputs from C = 32
    assert ck['model']['head.2.weight'].shape[0] == 128             # the head keeps its own size
    # 40 fixture images, batch 16: 16 + 16 + 8, the partial batch kept (drop_last=False).
    assert ck['raw']['global_step'] == 3


def test_authors_mean_std_tuple_syntax(tmp_path):
    for c in range(2):
        data_lib_folder = tmp_path / 'imgs' / f'class{c}'
        data_lib_folder.mkdir(parents=True)
        for i in range(4):
            noisy_image(32, 32, seed=10 * c + i).save(data_lib_folder / f'{i}.png')
    args = main_ce.get_args_parser().parse_args([
        '--dataset', 'path', '--data-root', str(tmp_path / 'imgs'), '--mean', '(0.5,0.5,0.5)',
        '--std', '(0.25, 0.25, 0.25)', '--size', '32', '--model', 'resnet18', '--width', '4', '--batch-size', '4',
        '--epochs', '1', '--num-workers', '0', '--save-folder', str(tmp_path / 'save'), '--device', 'cpu',
        '--eval', 'none'])
    ck = read_checkpoint(main_ce.main(args)['last'])
    assert ck['arch']['mean'] == [0.5, 0.5, 0.5] and ck['arch']['std'] == [0.25, 0.25, 0.25]
    assert data_lib.parse_floats('[0.1 0.2]') == (0.1, 0.2)
    with pytest.raises(UserError, match='--mean'):
        data_lib.parse_floats('__import__("os")', '--mean')


# ---------------------------------------------------------------- 6. KNN's k follows the ID set
def test_knn_k_follows_the_id_set():
    assert [default_k('knn', n) for n in ('CIFAR-10', 'CIFAR-100', 'imagenet')] == [50, 200, 1000]
    assert default_k('csd', 'CIFAR-100') == default_k('csd', 'imagenet') == 10


# ---------------------------------------------------------------- 7. AUIN / AUOUT / DTERR
@pytest.mark.parametrize('seed', range(6))
def test_auin_auout_match_the_authors_convention_at_scale(seed):
    rng = np.random.default_rng(seed)
    n = 10_000 if seed < 2 else 300
    if seed % 2:   # tie-heavy: a few distinct values
        known, novel = rng.integers(0, 6, n).astype(float), rng.integers(0, 5, n // 2).astype(float)
    else:
        known, novel = rng.normal(1, 1, n), rng.normal(0, 1, n // 2)
    if n > 1000:   # the loop reference is quadratic: check big arrays on distinct-value buckets
        known, novel = np.round(known, 1), np.round(novel, 1)
    m = cal_metric(known, novel)
    auin, auout, dterr = ref_authors_curve(list(known), list(novel))
    assert abs(m['AUIN'] - auin) < 1e-9 and abs(m['AUOUT'] - auout) < 1e-9 and abs(m['DTERR'] - dterr) < 1e-12


# ---------------------------------------------------------------- 8. checkpoints
def knn_ood_cifar_state(model):
    """Our SupConResNet's weights under knn-ood's ResNetCifar names: flat, ``downsample``,
    ``head`` and an ``fc``, saved as ``{'state_dict': ...}`` by DataParallel (``module.``)."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace('encoder.', '', 1).replace('.shortcut.', '.downsample.')
        out['module.' + k] = v
    out['module.fc.weight'] = torch.randn(10, model.encoder.out_dim)
    out['module.fc.bias'] = torch.randn(10)
    return out


def features_equal(a, b, x):
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a.forward_features(x), b.forward_features(x))


def test_knn_ood_cifar_checkpoint_loads(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model('resnet18-supcon', width=8)
    torch.save({'state_dict': knn_ood_cifar_state(model), 'epoch': 500}, tmp_path / 'checkpoint_500.pth.tar')
    loaded, info = load_model(str(tmp_path / 'checkpoint_500.pth.tar'), 'resnet18-supcon', 'CIFAR-10')
    assert 'ignoring fc.bias, fc.weight' in capsys.readouterr().out
    assert features_equal(loaded, model, torch.randn(2, 3, 32, 32))
    # knn-ood's CE name for the same class of file
    loaded_ce, info = load_model(str(tmp_path / 'checkpoint_500.pth.tar'), 'resnet18-supce', 'CIFAR-10')
    assert info['arch'] == 'resnet18-ce' and 'ignoring head.' in capsys.readouterr().out
    assert features_equal(loaded_ce, model, torch.randn(2, 3, 32, 32))


def test_imagenet_supcon_with_fc_loads_with_a_note(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model('resnet50-imagenet-supcon')
    state = {'module.' + k: v for k, v in model.state_dict().items()}
    state['module.fc.weight'], state['module.fc.bias'] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save({'model': state, 'epoch': 1}, tmp_path / 'supcon.pth')
    loaded, info = load_model(str(tmp_path / 'supcon.pth'), 'resnet50-supcon', 'imagenet')
    out = capsys.readouterr().out
    assert info['arch'] == 'resnet50-imagenet-supcon' and 'ignoring fc.bias, fc.weight' in out
    assert features_equal(loaded, model, torch.randn(1, 3, 64, 64))
    # Nothing else is set aside silently: an unknown extra key is an error.
    state['module.encoder.extra.weight'] = torch.zeros(1)
    torch.save({'model': state}, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='unexpected: encoder.extra.weight'):
        load_model(str(tmp_path / 'bad.pth'), 'resnet50-supcon', 'imagenet')


def test_authors_arch_aliases():
    assert resolve_arch('resnet18-supce') == 'resnet18-ce' and resolve_arch('resnet34-supce') == 'resnet34-ce'
    assert resolve_arch('resnet50-supcon', 'imagenet') == 'resnet50-imagenet-supcon'
    assert resolve_arch('resnet50-supcon', 'CIFAR-10') == 'resnet50-supcon'
    assert resolve_arch('resnet18') == 'resnet18-ce'


@pytest.mark.parametrize('filename', ['Base_epoch_500.pth', 'Finetune_epoch_500.pth'])
def test_authors_epoch_files_load(tmp_path, filename):
    from ALPA.attention import AttentionSimilarity
    torch.manual_seed(0)
    model = build_model('resnet34-supcon', width=4)
    opt = argparse.Namespace(model='resnet34', dataset='cifar100', feat_dim=80, temperature_s=10.0, batch_size=128,
                             learning_rate=0.1, temp=0.1, alpa_finetune=filename.startswith('Finetune'))
    state = {k.replace('encoder.', 'encoder.module.', 1): v for k, v in model.state_dict().items()}
    ck = {'opt': opt, 'model': state, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 500}
    if filename.startswith('Finetune'):
        ck['attention'] = AttentionSimilarity(model.encoder.out_dim, 80).state_dict()
    torch.save(ck, tmp_path / filename)
    loaded, info = load_model(str(tmp_path / filename), None, 'CIFAR-100')
    assert info['arch'] == 'resnet34-supcon' and (info['attention'] is not None) == filename.startswith('Finetune')
    assert features_equal(loaded, model, torch.randn(2, 3, 32, 32))


def test_our_base_checkpoint_has_no_attention_key(data_root, tmp_path):
    out = main_supcon.main(main_supcon.get_args_parser().parse_args(small_train_argv(data_root, tmp_path)))
    raw = torch.load(out['last'], weights_only=False)
    assert 'attention' not in raw and 'model' in raw and 'opt' in raw


# ---------------------------------------------------------------- 9. datasets their code names
def test_lsun_resize_and_tinyimages_folders(tmp_path):
    from tests.fixtures import write_image_folder
    for name in ('LSUN_resize', 'TinyImages'):
        write_image_folder(str(tmp_path / 'ood_data' / name), 3, size=36)
        ds = ood_lib.get_ood_dataset(name, str(tmp_path), 'CIFAR-10', data_lib.test_transform('CIFAR-10'))
        assert ds.name == name and len(ds) == 3 and ds[0][0].shape == (3, 32, 32)
    assert ood_lib.resolve_ood_name('tim') == 'TinyImages'
    # The authors' "LSUN_FIX" read LSUN_resize; we never map one name to another set.
    with pytest.raises(UserError, match='LSUN_resize.*LSUN_fix'):
        ood_lib.resolve_ood_name('LSUN_FIX')
    assert ood_lib.resolve_ood_name('LSUN_fix') == 'LSUN_fix'


def test_cifar_sets_and_imagenet_val_as_ood(tmp_path):
    from tests.fixtures import write_cifar10, write_cifar100, write_imagenet
    c10 = write_cifar10(str(tmp_path), n_per_class=1, n_test_per_class=2)
    write_cifar100(str(tmp_path), n_per_class=1, n_test_per_class=1)
    write_imagenet(str(tmp_path))
    t = data_lib.test_transform('CIFAR-100')
    ood = ood_lib.get_ood_dataset('cifar10', str(tmp_path), 'CIFAR-100', t)
    assert ood.name == 'CIFAR-10' and len(ood) == 20 and all(ood[i][1] == -1 for i in range(3))
    assert torch.equal(ood[0][0], t(Image.fromarray(c10['test'][0][0])))
    assert len(ood_lib.get_ood_dataset('CIFAR-100', str(tmp_path), 'CIFAR-10', t)) == 100
    val = ood_lib.get_ood_dataset('imagenet', str(tmp_path), 'CIFAR-10', data_lib.test_transform('CIFAR-10'))
    assert val.name == 'imagenet-val' and val[0][0].shape == (3, 32, 32) and val[0][1] == -1


def test_noise_and_lfnoise_follow_the_authors_recipe():
    from scipy.fft import dctn
    noise = ood_lib.get_ood_dataset('noise', spec='CIFAR-10')
    lf = ood_lib.get_ood_dataset('lfnoise', spec='CIFAR-10')
    assert len(noise) == len(lf) == 10_000
    x, label = noise[3]
    assert label == -1 and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    big = torch.stack([noise[i][0] for i in range(200)])
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02   # N(0, 1), no normalisation
    # lfnoise = the same draw with every DCT coefficient outside the low 16x16 block removed.
    z = lf[3][0].double().numpy()
    coeff = dctn(z, axes=(1, 2), norm='ortho')
    src = np.random.default_rng([0, 3]).standard_normal((3, 32, 32))
    expect = src.copy()
    expect[:, 16:, :] = 0
    expect[:, :, 16:] = 0
    np.testing.assert_allclose(coeff, expect, atol=1e-5)
    assert torch.equal(noise[3][0], noise[3][0]) and not torch.equal(noise[3][0], noise[4][0])   # seeded per index
    assert ood_lib.get_ood_dataset('noise', spec='fashion-mnist')[0][0].shape == (1, 28, 28)


# ---------------------------------------------------------------- end to end on the authors' preprocessing
def test_authors_checkpoint_features_equal_authors_preprocessing(data_root, tmp_path):
    from tests.fixtures import authors_checkpoint
    model, _ = authors_checkpoint(tmp_path / 'Finetune_epoch_500.pth')
    argv = ['--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'Finetune_epoch_500.pth'), '--name', 'authors',
            '--data-root', str(data_root), '--cache-dir', str(tmp_path / 'cache'), '--num-workers', '0',
            '--batch-size', '16', '--device', 'cpu', '--out-datasets', 'dtd', 'SVHN', '--dtype', 'fp32']
    splits = feature_collect.main(feature_collect.get_args_parser().parse_args(argv))
    # The authors' preprocessing, applied by hand to the dtd files (non-square JPEGs) and
    # the CIFAR-10 test images, then the model's own forward pass and docs/METHOD.md §2's pooling.
    tf = authors_test_transform(*AUTHORS_C10)
    dtd = ood_lib.get_ood_dataset('dtd', str(data_root), 'CIFAR-10')
    paths = dtd.paths
    x = torch.stack([tf(Image.open(p).convert('RGB')) for p in paths])
    model.eval()
    with torch.no_grad():
        expect = multi_scale_pool(model.forward_features(x)).numpy()
    np.testing.assert_allclose(splits['dtd']['features'], expect, rtol=1e-5, atol=1e-6)
    test = data_lib.get_id_dataset('CIFAR-10', str(data_root), 'test')
    x = torch.stack([tf(test[i][0]) for i in range(len(test))])
    with torch.no_grad():
        expect = multi_scale_pool(model.forward_features(x)).numpy()
    np.testing.assert_allclose(splits['test']['features'], expect, rtol=1e-5, atol=1e-6)
    # The cache keeps [N, 6, C] arrays as .npy files under --cache-dir.
    npys = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'cache') for f in fs if f == 'features.npy']
    assert len(npys) == 4 and all(np.load(p).shape[1] == 6 for p in npys)

    # CSD.py prints k and the normalisation in each table's header, and DTERR reaches the files.
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'CSD', 'CSD.py'), *argv,
                           '--output-dir', str(tmp_path / 'results'), '--method', 'knn', 'csd', '--k', '5', '3'],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    titles = [line for line in proc.stdout.splitlines() if line.startswith(('KNN (k=', 'CSD (k='))]
    assert len(titles) == 2 and all('test norm paper (0.4914,0.4822,0.4465)/(0.2023,0.1994,0.201)' in t for t in titles)
    res = json.loads((tmp_path / 'results' / 'CIFAR-10' / 'authors' / 'csd_k3.json').read_text())
    assert 'DTERR' in res['metrics']['dtd'] and res['meta']['test_norm']['source'] == 'paper'
    assert (tmp_path / 'results' / 'CIFAR-10' / 'authors' / 'knn_k5.csv').read_text().startswith(
        'OOD,FPR,AUROC,AUIN,AUOUT,DTERR')


def test_csd_default_k_shown_for_cifar100(tmp_path):
    from tests.fixtures import write_cifar100, write_svhn_mat
    write_cifar100(str(tmp_path / 'data'), n_per_class=3, n_test_per_class=1)
    write_svhn_mat(str(tmp_path / 'data' / 'ood_data' / 'svhn' / 'selected_test_32x32.mat'), n=12)
    torch.manual_seed(0)
    torch.save({'model': build_model('resnet34-supcon', width=4).state_dict(),
                'opt': argparse.Namespace(model='resnet34')}, tmp_path / 'c100.pth')
    out = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-100', '--ckp', str(tmp_path / 'c100.pth'), '--data-root', str(tmp_path / 'data'),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--device', 'cpu', '--out-datasets', 'SVHN', '--method', 'knn', 'csd', '--search', 'torch']))
    assert sorted(os.listdir(out['out_dir'])) == sorted(
        f'{m}_k{k}{e}' for m, k in (('knn', 200), ('csd', 10)) for e in ('.csv', '.json', '.md', '_openood.csv'))
