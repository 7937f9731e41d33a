"""Every loader in util/data.py against a fixture in its real on-disk format, the transforms,
and select_svhn_data.py."""
import os
import subprocess
import sys
import warnings
from argparse import Namespace

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

import select_svhn_data
from tests.fixtures import (
    svhn_index_pixels,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_image_folder,
    write_imagenet,
    write_svhn_mat,
    write_truncated_image,
)
from util import data
from util.data import (
    ID_DATASETS,
    collate_skip_none,
    get_id_dataset,
    get_spec,
    test_transform,
    train_transform,
)
from util.errors import UserError
from util.ood import OOD_DATASETS, get_ood_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C10 = ID_DATASETS['CIFAR-10']


# --------------------------------------------------------------------------- specs and transforms

def test_get_spec_names_and_aliases():
    assert get_spec('cifar10') is ID_DATASETS['CIFAR-10']
    assert get_spec('cifar100') is ID_DATASETS['CIFAR-100']
    assert get_spec('Fashion-MNIST') is ID_DATASETS['fashion-mnist'] and get_spec('ImageNet') is ID_DATASETS['imagenet']
    assert get_spec(C10) is C10
    with pytest.raises(UserError) as e:
        get_spec('cifar1000')
    assert 'CIFAR-10' in str(e.value) and 'fashion-mnist' in str(e.value)


# The exact test transform (the authors' squash + their constants) is checked in test_parity.py.
def test_test_transform_resizes_and_converts_channels():
    assert test_transform(C10)(Image.new('RGB', (300, 200))).shape == (3, 32, 32)
    assert test_transform(C10)(Image.new('L', (40, 40))).shape == (3, 32, 32)
    fm = get_spec('fashion-mnist')
    x = test_transform(fm)(Image.new('RGB', (28, 28), (90, 90, 90)))
    assert x.shape == (1, 28, 28)
    assert torch.allclose(x, torch.full_like(x, (90 / 255 - 0.2860) / 0.3530), atol=1e-6)
    assert test_transform(get_spec('imagenet'))(Image.new('RGB', (400, 300))).shape == (3, 224, 224)


def test_train_transform_two_views():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    views = train_transform(C10)(img)
    assert isinstance(views, list) and len(views) == 2
    assert views[0].shape == views[1].shape == (3, 32, 32)
    assert not torch.equal(views[0], views[1])
    assert train_transform(C10, two_crop=False)(img).shape == (3, 32, 32)
    fm = train_transform(get_spec('fashion-mnist'), two_crop=False)
    assert fm(Image.new('L', (28, 28))).shape == (1, 28, 28)
    assert not any('ColorJitter' in repr(t) or 'Grayscale' in repr(t) for t in fm.transforms)


# --------------------------------------------------------------------------- ID sets

def test_cifar10_round_trip(tmp_path):
    written = write_cifar10(tmp_path, n_per_class=2)
    for split in ('train', 'test'):
        images, labels = written[split]
        ds = get_id_dataset('cifar10', root=str(tmp_path), split=split)
        assert ds.name == 'CIFAR-10' and len(ds) == 20
        np.testing.assert_array_equal(ds.targets, labels)
        img, y = ds[7]
        assert isinstance(img, Image.Image) and img.mode == 'RGB' and img.size == (32, 32)
        assert y == labels[7]
        assert np.asarray(img)[3, 5, 1] == images[7, 3, 5, 1]  # row 3, col 5, green
        np.testing.assert_array_equal(np.asarray(img), images[7])
    # An image from data_batch_2 (the train images are dealt round-robin over five batches).
    ds = get_id_dataset('CIFAR-10', root=str(tmp_path), split='train', transform=test_transform(C10))
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == written['train'][1][5]
    expected = (written['train'][0][5, 0, 0, 0] / 255 - C10.mean[0]) / C10.std[0]
    assert abs(x[0, 0, 0].item() - expected) < 1e-6


def test_cifar_pickle_with_bytes_keys(tmp_path):
    import pickle
    written = write_cifar10(tmp_path, n_per_class=1)
    path = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    entry = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in entry.items()}, protocol=2))
    ds = get_id_dataset('CIFAR-10', root=str(tmp_path), split='test')
    np.testing.assert_array_equal(np.asarray(ds[3][0]), written['test'][0][3])


def test_cifar100_round_trip(tmp_path):
    written = write_cifar100(tmp_path, n_per_class=1, n_test_per_class=2)
    train = get_id_dataset('CIFAR-100', root=str(tmp_path), split='train')
    test = get_id_dataset('cifar100', root=str(tmp_path), split='test')
    assert len(train) == 100 and len(test) == 200 and test.name == 'CIFAR-100'
    images, labels = written['test']
    img, y = test[123]
    assert y == labels[123] and np.asarray(img)[31, 0, 2] == images[123, 31, 0, 2]
    np.testing.assert_array_equal(train.targets, written['train'][1])
    assert sorted(train.targets.tolist()) == list(range(100))


@pytest.mark.parametrize('name,folder', [('CIFAR-10', 'cifar-10-batches-py'), ('CIFAR-100', 'cifar-100-python')])
def test_missing_cifar_names_path_and_flag(tmp_path, name, folder):
    with pytest.raises(UserError) as e:
        get_id_dataset(name, root=str(tmp_path), split='train')
    msg = str(e.value)
    assert os.path.join(str(tmp_path), folder) in msg and '--download' in msg and '\n' not in msg


def test_missing_cifar_batch_names_file(tmp_path):
    write_cifar10(tmp_path, n_per_class=1)
    os.remove(tmp_path / 'cifar-10-batches-py' / 'data_batch_3')
    get_id_dataset('CIFAR-10', root=str(tmp_path), split='test')  # test split still fine
    with pytest.raises(UserError, match='data_batch_3'):
        get_id_dataset('CIFAR-10', root=str(tmp_path), split='train')


def test_id_classes_filter_and_remap(tmp_path):
    written = write_cifar10(tmp_path, n_per_class=3)
    images, labels = written['test']
    ds = get_id_dataset('CIFAR-10', root=str(tmp_path), split='test', id_classes=[7, 2])
    assert len(ds) == 6 and sorted(set(ds.targets.tolist())) == [0, 1]
    keep = np.flatnonzero(np.isin(labels, [7, 2]))  # original order is preserved
    for i, j in enumerate(keep):
        img, y = ds[i]
        assert y == (0 if labels[j] == 7 else 1)
        np.testing.assert_array_equal(np.asarray(img), images[j])
    with pytest.raises(UserError, match='0..9'):
        get_id_dataset('CIFAR-10', root=str(tmp_path), split='test', id_classes=[3, 10])


@pytest.mark.parametrize('gz', [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    written = write_fashion_mnist(tmp_path, n_train=20, n_test=10, gz=gz)
    train = get_id_dataset('fashion-mnist', root=str(tmp_path), split='train')
    test = get_id_dataset('fashion-mnist', root=str(tmp_path), split='test', id_classes=[4, 1])
    assert len(train) == 20 and train.name == 'fashion-mnist'
    img, y = train[13]
    assert img.mode == 'L' and img.size == (28, 28) and y == 3
    np.testing.assert_array_equal(np.asarray(img), written['train'][0][13])
    assert len(test) == 2 and test[0][1] == 1 and test[1][1] == 0  # labels 1, 4 in file order
    np.testing.assert_array_equal(np.asarray(test[0][0]), written['test'][0][1])
    x, _ = get_id_dataset('fashion-mnist', root=str(tmp_path), transform=test_transform('fashion-mnist'))[0]
    assert x.shape == (1, 28, 28)


def test_fashion_mnist_missing_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'FASHION_MNIST_DIRS', ('{root}/FashionMNIST/raw',))
    with pytest.raises(UserError) as e:
        get_id_dataset('fashion-mnist', root=str(tmp_path))
    assert f'{tmp_path}/FashionMNIST/raw' in str(e.value) and '--download' in str(e.value)
    write_fashion_mnist(tmp_path, gz=False)
    with open(tmp_path / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte', 'r+b') as f:
        f.write(b'\x00\x00\x08\x01')  # labels' magic (2049) in the images file
    with pytest.raises(UserError, match='2051'):
        get_id_dataset('fashion-mnist', root=str(tmp_path))


REPO_DATASETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'datasets')


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO_DATASETS, 'FashionMNIST/raw/t10k-labels-idx1-ubyte.gz')),
                    reason='no Fashion-MNIST in datasets/ (setup.sh --with-fashion-mnist links Debian\'s copy there)')
def test_fashion_mnist_real_copy():
    ds = get_id_dataset('fashion-mnist', root=REPO_DATASETS, split='test')
    assert len(ds) == 10_000 and np.bincount(ds.targets).tolist() == [1000] * 10
    assert np.asarray(ds[0][0]).shape == (28, 28)


def test_imagenet_folders(tmp_path):
    classes = write_imagenet(tmp_path, num_classes=3, n_per_class=2)
    for split in ('train', 'test'):
        ds = get_id_dataset('imagenet', root=str(tmp_path), split=split)
        assert len(ds) == 6 and ds.classes == classes
        assert ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
        img, y = ds[3]
        assert img.mode == 'RGB' and img.size == (48, 40) and y == 1
        assert os.path.basename(os.path.dirname(ds.paths[3])) == classes[1]
    assert ds.paths[0].startswith(os.path.join(str(tmp_path), 'imagenet', 'val'))
    ds = get_id_dataset('imagenet', root=str(tmp_path), split='test', id_classes=[2],
                        transform=test_transform('imagenet'))
    assert len(ds) == 2 and ds[1][0].shape == (3, 224, 224) and ds[1][1] == 0
    assert ds.classes == [classes[2]]
    with pytest.raises(UserError) as e:
        get_id_dataset('imagenet', root=str(tmp_path / 'nowhere'))
    assert os.path.join(str(tmp_path / 'nowhere'), 'imagenet', 'train') in str(e.value)


# --------------------------------------------------------------------------- OOD sets

def test_svhn_selected_mat(tmp_path):
    x, y = write_svhn_mat(tmp_path / 'ood_data' / 'svhn' / 'selected_test_32x32.mat', n=30)
    ds = get_ood_dataset('SVHN', root=str(tmp_path), spec=C10)
    assert len(ds) == 30 and ds.name == 'SVHN'
    img, label = ds[17]
    assert label == -1 and img.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(img), x[..., 17])
    assert svhn_index_pixels(np.asarray(img)[..., None])[0] == 17
    t, label = get_ood_dataset('svhn', root=str(tmp_path), spec=C10, transform=test_transform(C10))[0]
    assert t.shape == (3, 32, 32) and label == -1
    g, _ = get_ood_dataset('SVHN', root=str(tmp_path), spec='fashion-mnist')[0]
    assert g.mode == 'L'


def test_svhn_missing_messages(tmp_path):
    sel = os.path.join(str(tmp_path), 'ood_data', 'svhn', 'selected_test_32x32.mat')
    with pytest.raises(UserError) as e:
        get_ood_dataset('SVHN', root=str(tmp_path), spec=C10)
    assert sel in str(e.value) and 'test_32x32.mat' in str(e.value)
    write_svhn_mat(tmp_path / 'ood_data' / 'svhn' / 'test_32x32.mat', n=10)
    with pytest.raises(UserError) as e:
        get_ood_dataset('SVHN', root=str(tmp_path), spec=C10)
    assert 'select_svhn_data.py' in str(e.value) and sel in str(e.value)


def test_image_folder_flat(tmp_path):
    paths = write_image_folder(tmp_path / 'ood_data' / 'LSUN' / 'test', 5, size=36)
    ds = get_ood_dataset('LSUN', root=str(tmp_path), spec=C10, transform=test_transform(C10))
    assert ds.name == 'LSUN' and len(ds) == 5 and ds.paths == paths
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and y == -1
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate_skip_none)))
    assert batch[0].shape == (5, 3, 32, 32) and batch[1].tolist() == [-1] * 5


def test_image_folder_nested_and_channels(tmp_path):
    paths = write_image_folder(tmp_path / 'ood_data' / 'dtd' / 'images', 6, nested=True, ext='jpg', mode='L')
    assert os.path.isdir(tmp_path / 'ood_data' / 'dtd' / 'images' / 'class_1')
    ds = get_ood_dataset('dtd', root=str(tmp_path), spec=C10)
    assert len(ds) == 6 and ds.paths == paths
    img, _ = ds[0]
    assert img.mode == 'RGB'  # grey files converted to the ID channels
    fm = get_ood_dataset('textures', root=str(tmp_path), spec='fashion-mnist')
    assert fm.name == 'dtd' and fm[0][0].mode == 'L'


def test_known_folder_names_and_aliases(tmp_path):
    for name, rel in [('places365', 'places365/test_subset'), ('inat', 'iNaturalist'), ('sun50', 'SUN'),
                      ('Places', 'Places'), ('imagenet_resize', 'Imagenet_resize')]:
        write_image_folder(tmp_path / 'ood_data' / rel, 2)
        ds = get_ood_dataset(name, root=str(tmp_path), spec=C10)
        assert len(ds) == 2 and ds.paths[0].startswith(os.path.join(str(tmp_path), 'ood_data', rel))


def test_folder_spelling_is_matched_case_insensitively(tmp_path):
    write_image_folder(tmp_path / 'ood_data' / 'Imagenet_fix', 2)  # CSI's spelling
    write_svhn_mat(tmp_path / 'ood_data' / 'SVHN' / 'selected_test_32x32.mat', n=4)
    assert len(get_ood_dataset('ImageNet_fix', root=str(tmp_path), spec=C10)) == 2
    assert len(get_ood_dataset('SVHN', root=str(tmp_path), spec=C10)) == 4


def test_directory_path_as_name(tmp_path):
    write_image_folder(tmp_path / 'my_ood_set', 3, nested=True)
    ds = get_ood_dataset(str(tmp_path / 'my_ood_set') + os.sep, spec=C10)
    assert ds.name == 'my_ood_set' and len(ds) == 3 and ds[0][1] == -1


def test_missing_known_folder_names_path(tmp_path):
    with pytest.raises(UserError) as e:
        get_ood_dataset('iSUN', root=str(tmp_path), spec=C10)
    assert os.path.join(str(tmp_path), 'ood_data', 'iSUN') in str(e.value) and 'iSUN.tar.gz' in str(e.value)


def test_unknown_ood_name_lists_known(tmp_path):
    with pytest.raises(UserError) as e:
        get_ood_dataset('not-a-dataset', root=str(tmp_path), spec=C10)
    msg = str(e.value)
    for known in ('SVHN', 'dtd', 'places365', 'LSUN', 'iSUN', 'gaussian', 'digits', 'CIFAR-10-heldout'):
        assert known in msg
    assert set(OOD_DATASETS) >= {'SVHN', 'dtd', 'places365', 'LSUN', 'iSUN', 'LSUN_fix', 'ImageNet_fix',
                                 'Imagenet_resize', 'iNaturalist', 'SUN', 'Places', 'digits', 'gaussian',
                                 'uniform'}


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / 'ood_data' / 'iSUN').mkdir(parents=True)
    with pytest.raises(UserError) as e:
        get_ood_dataset('iSUN', root=str(tmp_path), spec=C10)
    assert os.path.join(str(tmp_path), 'ood_data', 'iSUN') in str(e.value)
    (tmp_path / 'only_text').mkdir()
    (tmp_path / 'only_text' / 'README.txt').write_text('no images here')
    with pytest.warns(UserWarning, match='README.txt'), pytest.raises(UserError, match='only_text'):
        get_ood_dataset(str(tmp_path / 'only_text'), spec=C10)


def test_corrupt_and_non_image_files_are_skipped(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    folder = tmp_path / 'mixed'
    write_image_folder(folder, 3)  # img_0000..img_0002.png
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'img_0003_garbage.jpg').write_bytes(b'this is not a jpeg')
    write_truncated_image(str(folder / 'img_0004_cut.png'))
    write_truncated_image(str(folder / 'img_0005_cut.jpg'), ext='jpg')
    with pytest.warns(UserWarning, match='notes.txt'):
        ds = get_ood_dataset(str(folder), spec=C10, transform=test_transform(C10))
    assert len(ds) == 6 and not any(p.endswith('.txt') for p in ds.paths)
    for i, bad in [(3, 'img_0003_garbage.jpg'), (4, 'img_0004_cut.png'), (5, 'img_0005_cut.jpg')]:
        with pytest.warns(UserWarning, match=bad):
            assert ds[i] is None
    with warnings.catch_warnings(record=True):
        warnings.simplefilter('always')
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_none))
    assert batches[0][0].shape == (3, 3, 32, 32)  # 3 good of the first 4
    assert batches[1] is None  # both items of the last batch were unreadable
    assert collate_skip_none([None, (torch.zeros(2), -1)])[0].shape == (1, 2)


def test_digits(tmp_path):
    from sklearn.datasets import load_digits
    ds = get_ood_dataset('digits', spec=C10)
    assert len(ds) == 1797 and ds.name == 'digits'
    np.testing.assert_array_equal(ds.images, np.round(load_digits().images * 255 / 16).astype(np.uint8))
    assert ds.images.max() == 255
    img, y = ds[0]
    arr = np.asarray(img)
    assert y == -1 and img.size == (32, 32) and arr.shape == (32, 32, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and arr.max() > 100
    x, _ = get_ood_dataset('digits', spec='fashion-mnist', transform=test_transform('fashion-mnist'))[5]
    assert x.shape == (1, 28, 28)


@pytest.mark.parametrize('kind', ['gaussian', 'uniform'])
def test_noise_sets_are_deterministic(kind):
    a = get_ood_dataset(kind, spec=C10, seed=3)
    b = get_ood_dataset(kind, spec=C10, seed=3)
    c = get_ood_dataset(kind, spec=C10, seed=4)
    assert len(a) == 10_000 and a.name == kind
    for i in (0, 9999):
        np.testing.assert_array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
        assert not np.array_equal(np.asarray(a[i][0]), np.asarray(c[i][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[1][0]))
    pix = np.stack([np.asarray(a[i][0]) for i in range(20)]).astype(float) / 255
    assert pix.shape == (20, 32, 32, 3) and a[0][1] == -1
    assert abs(pix.mean() - 0.5) < 0.01
    if kind == 'gaussian':
        assert 0.2 < pix.std() < 0.25  # std 0.25 before clipping
    else:
        assert abs(pix.std() - 12 ** -0.5) < 0.01 and pix.min() < 0.01 and pix.max() > 0.99
    fm = get_ood_dataset(kind, spec='fashion-mnist', transform=test_transform('fashion-mnist'))
    assert fm[0][0].shape == (1, 28, 28)


def test_heldout_classes(tmp_path):
    written = write_cifar10(tmp_path, n_per_class=1, n_test_per_class=3)
    images, labels = written['test']
    ds = get_ood_dataset('CIFAR-10-heldout', root=str(tmp_path), spec=C10, id_classes=[0, 1, 2, 3, 4, 5])
    assert ds.name == 'CIFAR-10-heldout' and len(ds) == 12
    keep = np.flatnonzero(labels >= 6)
    for i, j in enumerate(keep):
        img, y = ds[i]
        assert y == -1
        np.testing.assert_array_equal(np.asarray(img), images[j])
    with pytest.raises(UserError, match='--id-classes'):
        get_ood_dataset('CIFAR-10-heldout', root=str(tmp_path), spec=C10)


def test_fashion_heldout(tmp_path):
    write_fashion_mnist(tmp_path, n_test=20)
    ds = get_ood_dataset('fashion-mnist-heldout', root=str(tmp_path), spec='fashion-mnist',
                         id_classes=[0, 1, 2, 3, 4, 5, 6, 7], transform=test_transform('fashion-mnist'))
    assert len(ds) == 4 and ds[0][0].shape == (1, 28, 28) and ds.targets.tolist() == [-1] * 4


# --------------------------------------------------------------------------- select_svhn_data.py

def _select(root, per_class=1000):
    return select_svhn_data.main(Namespace(root=str(root), per_class=per_class))


def test_select_svhn_first_per_label_in_file_order(tmp_path, capsys):
    labels = [3, 1, 3, 3, 2, 1, 3, 10, 1, 10, 1, 3]
    x, y = write_svhn_mat(tmp_path / 'test_32x32.mat', labels=labels)
    out = _select(tmp_path, per_class=2)
    mat = scipy.io.loadmat(out)
    kept = [0, 1, 2, 4, 5, 7, 9]  # first two 3s, 1s, 10s; the only 2
    assert mat['X'].shape == (32, 32, 3, 7) and mat['y'].shape == (7, 1)
    assert svhn_index_pixels(mat['X']).tolist() == kept
    np.testing.assert_array_equal(mat['X'], x[..., kept])
    assert mat['y'].ravel().tolist() == [labels[i] for i in kept]
    err = capsys.readouterr().err
    assert 'label 2 has only 1' in err and 'label 5 has only 0' in err and 'label 3 ' not in err
    assert sorted(os.listdir(tmp_path)) == ['selected_test_32x32.mat', 'test_32x32.mat']


def test_select_svhn_default_keeps_first_1000(tmp_path, capsys):
    # 1,100 images of labels 1 and 10 interleaved with 50 of label 7: the default keeps
    # indices of the first 1000 of 1 and 10 and every 7.
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat([1, 10, 7], [1100, 1100, 50]))
    write_svhn_mat(tmp_path / 'test_32x32.mat', labels=labels)
    assert get_args_default_per_class() == 1000
    mat = scipy.io.loadmat(_select(tmp_path))
    expected = np.sort(np.concatenate([np.flatnonzero(labels == 1)[:1000], np.flatnonzero(labels == 10)[:1000],
                                       np.flatnonzero(labels == 7)]))
    np.testing.assert_array_equal(svhn_index_pixels(mat['X']), expected)
    assert mat['X'].dtype == np.uint8
    assert {int(k): int(v) for k, v in zip(*np.unique(mat['y'], return_counts=True))} == {1: 1000, 7: 50, 10: 1000}
    assert 'label 7 has only 50' in capsys.readouterr().err


def get_args_default_per_class():
    return select_svhn_data.get_args_parser().parse_args([]).per_class


def test_select_svhn_missing_input(tmp_path):
    with pytest.raises(UserError) as e:
        _select(tmp_path)
    assert os.path.join(str(tmp_path), 'test_32x32.mat') in str(e.value)
    r = subprocess.run([sys.executable, os.path.join(REPO, 'select_svhn_data.py'), '--root', str(tmp_path)],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith('error: ') and r.stderr.count('\n') == 1
    assert 'Traceback' not in r.stderr


def test_select_svhn_output_loads_as_ood_set(tmp_path):
    svhn = tmp_path / 'ood_data' / 'svhn'
    write_svhn_mat(svhn / 'test_32x32.mat', n=40)
    _select(svhn, per_class=3)
    ds = get_ood_dataset('SVHN', root=str(tmp_path), spec=C10)
    assert len(ds) == 30
    assert [int(svhn_index_pixels(np.asarray(ds[i][0])[..., None])[0]) for i in range(len(ds))] == list(range(30))
