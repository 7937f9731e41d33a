"""Post-hoc baselines against slow references written from each paper's equation, and the CLI
with every method, near/far rows, saved scores and the OpenOOD export."""
import csv
import json
import math

import numpy as np
import pytest

from CSD import CSD as csd_cli
from CSD.baselines import BASELINES
from util.metrics import cal_metric


def fixed_split(seed, n=60, c=6, k=3):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    centres = rng.normal(0, 3, (k, c))
    glob = centres[labels] + rng.normal(0, 1, (n, c))
    feats = np.repeat(glob[:, None], 6, axis=1) + rng.normal(0, 0.1, (n, 6, c))
    feats[:, 4] = glob
    w, b = rng.normal(size=(k, c)), rng.normal(size=k)
    return {'features': feats, 'labels': labels, 'logits': glob @ w.T + b}, (w, b)


def test_msp_and_energy_match_their_equations():
    split, _ = fixed_split(0)
    for i, z in enumerate(split['logits']):
        e = [math.exp(v) for v in z]
        assert BASELINES['msp']().score(split)[i] == pytest.approx(max(e) / sum(e), rel=1e-12)
        assert BASELINES['energy']().score(split)[i] == pytest.approx(math.log(sum(e)), rel=1e-12)


def test_mahalanobis_matches_class_means_and_tied_covariance():
    train, _ = fixed_split(1)
    test, _ = fixed_split(2)
    x, y = train['features'][:, 4], train['labels']
    means = {c: sum(x[i] for i in range(len(x)) if y[i] == c) / sum(y == c) for c in set(y)}
    cov = sum(np.outer(x[i] - means[y[i]], x[i] - means[y[i]]) for i in range(len(x))) / len(x)
    inv = np.linalg.inv(cov)
    expect = [max(-(q - m) @ inv @ (q - m) for m in means.values()) for q in test['features'][:, 4]]
    np.testing.assert_allclose(BASELINES['mahalanobis']().fit(train).score(test), expect, rtol=1e-8)


def test_vim_matches_its_definition():
    train, (w, b) = fixed_split(3, n=80, c=8)
    test, _ = fixed_split(4, n=20, c=8)
    x = train['features'][:, 4]
    u = -np.linalg.pinv(w) @ b
    cov = (x - u).T @ (x - u) / len(x)
    val, vec = np.linalg.eigh(cov)
    null = vec[:, np.argsort(-val)[4:]]                       # C = 8 -> principal D = C / 2 = 4
    alpha = train['logits'].max(1).mean() / np.linalg.norm((x - u) @ null, axis=1).mean()
    expect = [math.log(sum(math.exp(v) for v in z)) - alpha * np.linalg.norm((q - u) @ null)
              for q, z in zip(test['features'][:, 4], test['logits'])]
    np.testing.assert_allclose(BASELINES['vim']().fit(train, (w, b)).score(test), expect, rtol=1e-8)


def test_react_and_ssd_match_their_definitions():
    train, (w, b) = fixed_split(5)
    test, _ = fixed_split(6)
    clip = np.percentile(train['features'][:, 4], 90)
    z = np.minimum(test['features'][:, 4], clip) @ w.T + b
    np.testing.assert_allclose(BASELINES['react']().fit(train, (w, b)).score(test),
                               np.log(np.exp(z).sum(1)), rtol=1e-10)
    unit = lambda a: a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-10)
    xt, y, q = unit(train['features'][:, 4]), train['labels'], unit(test['features'][:, 4])
    d = []
    for c in range(3):
        m = xt[y == c].mean(0)
        p = np.linalg.pinv(np.cov((xt[y == c] - m).T, bias=True))
        d.append(np.einsum('nc,cd,nd->n', q - m, p, q - m))
    np.testing.assert_allclose(BASELINES['ssd']().fit(train).score(test), -np.min(d, axis=0), rtol=1e-6, atol=1e-8)


def test_logit_methods_without_logits_are_one_line_errors():
    from util.errors import UserError
    split, _ = fixed_split(7)
    del split['logits']
    with pytest.raises(UserError, match='main_linear.py'):
        BASELINES['energy']().score(split)
    with pytest.raises(UserError, match='fc'):
        BASELINES['vim']().fit(split, None)


def test_cli_every_method_near_far_saved_scores_and_openood_export(data_root, tmp_path):
    from tests.test_e2e_csd import authors_checkpoint
    authors_checkpoint(tmp_path / 'ce.pth', arch='resnet18-ce')
    out = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ce.pth'), '--model-arch', 'resnet18-ce', '--name', 'ce',
        '--data-root', str(data_root), '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'),
        '--num-workers', '0', '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', 'places365', '--near', 'SVHN',
        '--method', 'knn', 'csd', *BASELINES, '--k', '5', '--save-scores', '--search', 'torch']))
    assert set(out['results']) == {'knn', 'csd', *BASELINES}
    res = tmp_path / 'res' / 'CIFAR-10' / 'ce'
    for method in BASELINES:
        table = json.loads((res / f'{method}.json').read_text())
        assert set(table['table_x100']) >= {'AVG', 'AVG near', 'AVG far'}
        assert table['table_x100']['AVG near']['AUROC'] == pytest.approx(table['table_x100']['SVHN']['AUROC'])
        assert table['meta']['id_accuracy']['how'] == 'classifier'
        # the saved scores give the printed table back exactly
        saved = np.load(res / f'{method}_scores.npz')
        for name in ('SVHN', 'dtd', 'places365'):
            again = cal_metric(saved['id'], saved[name])
            assert again['AUROC'] == table['metrics'][name]['AUROC'] and again['FPR'] == table['metrics'][name]['FPR']
        rows = list(csv.reader(open(res / f'{method}_openood.csv')))
        assert rows[0] == ['dataset', 'FPR@95', 'AUROC', 'AUPR_IN', 'AUPR_OUT', 'ACC']
        assert [r[0] for r in rows[1:]] == ['SVHN', 'dtd', 'places365', 'nearood', 'farood', 'overall']
    assert (res / 'knn_k5_scores.npz').exists() and (res / 'csd_k5.json').exists()


def test_supcon_model_without_logits_says_to_use_a_linear_probe(data_root, tmp_path):
    from tests.test_e2e_csd import authors_checkpoint
    from util.errors import UserError
    authors_checkpoint(tmp_path / 'sc.pth')
    with pytest.raises(UserError, match='linear'):
        csd_cli.main(csd_cli.get_args_parser().parse_args([
            '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'sc.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', 'cpu', '--out-datasets', 'SVHN', '--method', 'energy']))


def test_linear_probe_then_energy_and_csd(data_root, tmp_path):
    from ALPA import main_linear, main_supcon
    from tests.fixtures import find_last, tiny_train_argv
    main_supcon.main(main_supcon.get_args_parser().parse_args(tiny_train_argv(data_root, tmp_path / 's', '--device', 'cpu')))
    out = main_linear.main(main_linear.get_args_parser().parse_args([
        '--ckp', find_last(tmp_path / 's'), '--dataset', 'cifar10', '--data_folder', str(data_root), '--epochs', '2',
        '--batch_size', '16', '--num_workers', '0', '--device', 'cpu', '--save_folder', str(tmp_path / 'probe')]))
    assert 0.0 <= out['accuracy'] <= 1.0 and out['path'].endswith('linear.pth')
    res = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', out['path'], '--data-root', str(data_root), '--num-workers', '0',
        '--device', 'cpu', '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'),
        '--out-datasets', 'SVHN', '--method', 'energy', 'csd', '--k', '3']))
    assert set(res['results']) == {'energy', 'csd'} and 'logits' in res['splits']['test']
    meta = json.loads((tmp_path / 'res' / 'CIFAR-10' / 'linear' / 'energy.json').read_text())['meta']
    assert meta['arch'] == 'resnet18-ce' and meta['id_accuracy']['how'] == 'classifier'
    assert meta['id_accuracy']['value'] == pytest.approx(out['accuracy'])


def test_k_auto_names_its_validation_data_and_keeps_it_out_of_the_table(data_root, tmp_path, capsys):
    from tests.test_e2e_csd import authors_checkpoint
    authors_checkpoint(tmp_path / 'sc.pth')
    argv = ['--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'sc.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'knn', 'csd', '--k', 'auto', '5',
            '--search', 'torch']
    out = csd_cli.main(csd_cli.get_args_parser().parse_args(argv))
    printed = capsys.readouterr().out
    assert '--k auto for knn: k = ' in printed and 'held-out ID test images vs noise, never reported' in printed
    assert set(out['results']['knn']) == {'SVHN', 'dtd'}            # noise is not a row
    meta = json.loads(next((tmp_path / 'res' / 'CIFAR-10' / 'sc').glob('knn_k*.json')).read_text())['meta']
    sel = meta['k_selection']
    assert sel['chosen'] == meta['k'] and sel['val_ood'] == 'noise' and sel['val_id'] == 4   # 20% of 20
    assert meta['n_test'] == 16 and max(sel['auroc'], key=lambda k: (sel['auroc'][k], -int(k))) == str(meta['k'])
    from util.errors import UserError
    with pytest.raises(UserError, match='must not be reported'):
        csd_cli.main(csd_cli.get_args_parser().parse_args(argv[:-6] + ['--out-datasets', 'SVHN', 'noise',
                                                                        '--method', 'knn', '--k', 'auto']))
