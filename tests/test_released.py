"""The released checkpoints (issue 10): checksums, what they hold, and a re-score of the
released Base through the CLI on real Fashion-MNIST that reproduces its recorded AUROC."""
import hashlib
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPTS = os.path.join(REPO, 'checkpoints')
MANIFEST = os.path.join(CKPTS, 'manifest.json')
FMNIST = os.path.join(REPO, 'datasets', 'FashionMNIST', 'raw', 'train-images-idx3-ubyte.gz')


def manifest():
    with open(MANIFEST) as f:
        return json.load(f)


def test_manifest_lists_the_four_models_with_matching_sha256():
    m = manifest()
    assert [e['name'] for e in m['checkpoints']] == ['Base', 'ALPA-finetune', 'ALPA-train', 'CE']
    for e in m['checkpoints']:
        with open(os.path.join(CKPTS, e['file']), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == e['sha256'], e['file']
        assert e['command'] and e['machine'] and e['rescore_command'].startswith('python CSD/CSD.py')
        assert 'max_train' in e and (e['max_train'] is None or isinstance(e['max_train'], int))
        for method in ('knn', 'csd'):
            assert {'fashion-mnist-heldout', 'digits'} <= set(e['results'][method])
            for r in e['results'][method].values():
                assert 0 <= r['FPR'] <= 100 and 0 <= r['AUROC'] <= 100


def test_released_checkpoints_are_stripped_and_load_as_data():
    from util.checkpoint import load_model, read_checkpoint
    for e in manifest()['checkpoints']:
        path = os.path.join(CKPTS, e['file'])
        ckp = read_checkpoint(path)                      # torch.load(weights_only=True)
        assert ckp.get('optimizer') is None and ckp.get('rng') is None and ckp.get('scaler') is None
        arch = ckp['arch']
        assert arch['dataset'] == 'fashion-mnist' and arch['mean'] and arch['std'] and arch['id_classes'] == list(range(6))
        assert os.path.getsize(path) < 20e6
        model, info = load_model(path, None, 'fashion-mnist')
        assert info['arch'] == e['arch']['model_arch']


def test_released_base_is_at_least_92_percent_accurate():
    base = manifest()['checkpoints'][0]
    assert base['name'] == 'Base' and base['id_accuracy']['percent'] >= 92.0, base['id_accuracy']


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FMNIST), reason='Fashion-MNIST not set up (bash setup.sh --with-fashion-mnist)')
def test_rescoring_the_released_base_reproduces_its_auroc(tmp_path):
    """The manifest's re-score command, run through the CLI on the same bank, gives the
    recorded AUROC of the held-out and digits rows within 0.5 points (float differences
    between CPUs)."""
    from CSD import CSD as csd_cli
    base = manifest()['checkpoints'][0]
    words = base['rescore_command'].split()[2:]          # after "python CSD/CSD.py"
    argv = [*words, '--data-root', os.path.join(REPO, 'datasets'), '--cache-dir', str(tmp_path / 'cache'),
            '--output-dir', str(tmp_path / 'res'), '--search', 'torch']
    argv[argv.index('--ckp') + 1] = os.path.join(REPO, argv[argv.index('--ckp') + 1])
    # the two real-image rows (a row does not depend on the others; the 20,000 noise images would
    # only make CI slower)
    cut = argv.index('--out-datasets')
    end = next((i for i in range(cut + 1, len(argv)) if argv[i].startswith('--')), len(argv))
    argv[cut + 1:end] = ['fashion-mnist-heldout', 'digits']
    out = csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    for method in ('knn', 'csd'):
        for name in ('fashion-mnist-heldout', 'digits'):
            rec = base['results'][method][name]
            got = 100 * out['results'][method][name]['AUROC']
            assert abs(got - rec['AUROC']) <= 0.5, (method, name, got, rec['AUROC'])
    assert len(out['splits']['train']['features']) == (base['max_train'] or 36000)
    assert np.isfinite(out['scores']['csd'][0]).all()
