"""Post-hoc baselines against slow references written from each paper's equation, and the CLI
with every method, near/far rows, saved scores and the OpenOOD export."""
import csv
import json
import math
import re

import numpy as np
import pytest

from CSD import CSD as csd_cli
from CSD.baselines import BASELINES
from CSD.detectors import Context
from util.errors import UserError
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
    np.testing.assert_allclose(BASELINES["vim"]().fit(train, Context(head=(w, b))).score(test), expect, rtol=1e-8)


def test_react_and_ssd_match_their_definitions():
    train, (w, b) = fixed_split(5)
    test, _ = fixed_split(6)
    clip = np.percentile(train['features'][:, 4], 90)
    z = np.minimum(test['features'][:, 4], clip) @ w.T + b
    np.testing.assert_allclose(BASELINES["react"]().fit(train, Context(head=(w, b))).score(test),
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
    split, _ = fixed_split(7)
    del split['logits']
    with pytest.raises(UserError, match='main_linear.py'):
        BASELINES['energy']().score(split)
    with pytest.raises(UserError, match='fc'):
        BASELINES["vim"]().fit(split, Context())


def test_cli_every_method_near_far_saved_scores_and_openood_export(data_root, tmp_path):
    from tests.fixtures import authors_checkpoint
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
    from tests.fixtures import authors_checkpoint
    from util.errors import UserError
    authors_checkpoint(tmp_path / 'sc.pth')
    with pytest.raises(UserError, match='linear'):
        csd_cli.main(csd_cli.get_args_parser().parse_args([
            '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'sc.pth'), '--data-root', str(data_root),
            '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
            '--device', 'cpu', '--out-datasets', 'SVHN', '--method', 'energy']))


def test_linear_probe_then_energy_and_csd(data_root, probe, tmp_path):
    res = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', probe[1], '--data-root', str(data_root), '--num-workers', '0',
        '--device', 'cpu', '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'),
        '--out-datasets', 'SVHN', '--method', 'energy', 'csd', '--k', '3']))
    assert set(res['results']) == {'energy', 'csd'} and 'logits' in res['splits']['test']
    meta = json.loads((tmp_path / 'res' / 'CIFAR-10' / 'linear' / 'energy.json').read_text())['meta']
    assert meta['arch'] == 'resnet18-ce' and meta['id_accuracy']['how'] == 'classifier'
    assert meta['id_accuracy']['value'] == pytest.approx(probe[2])


def test_a_probe_is_reused_only_when_encoder_flags_and_code_are_the_same(data_root, probe, tmp_path, capsys):
    import shutil

    from ALPA import main_linear
    (tmp_path / 'p').mkdir()
    shutil.copy(probe[1], tmp_path / 'p' / 'linear.pth')
    argv = ['--ckp', probe[0], '--dataset', 'cifar10', '--data-root', str(data_root), '--epochs', '2', '--batch-size',
            '16', '--num-workers', '0', '--device', 'cpu', '--save-folder', str(tmp_path / 'p')]
    before = (tmp_path / 'p' / 'linear.pth').read_bytes()
    capsys.readouterr()
    again = main_linear.main(main_linear.get_args_parser().parse_args(argv))   # the fixture's flags
    assert 'is this probe already (same encoder, flags and code): reused' in capsys.readouterr().out
    assert again == {'accuracy': probe[2], 'path': str(tmp_path / 'p' / 'linear.pth')}
    assert (tmp_path / 'p' / 'linear.pth').read_bytes() == before
    main_linear.main(main_linear.get_args_parser().parse_args([*argv, '--learning-rate', '0.05']))
    out = capsys.readouterr().out
    assert 'made from another encoder, flags or code: training it again' in out and 'written: ' in out
    assert (tmp_path / 'p' / 'linear.pth').read_bytes() != before
    (tmp_path / 'p' / 'linear.pth').write_bytes(before[:100])   # cut short: trained again, not an error
    main_linear.main(main_linear.get_args_parser().parse_args(argv))
    assert re.search(r'linear.pth is unreadable \(.*\): training it again', capsys.readouterr().out)
    assert main_linear.main(main_linear.get_args_parser().parse_args(argv))['accuracy'] == probe[2]
    with pytest.raises(UserError, match=r'--ckp .*nothing\.pth: no such file'):
        main_linear.main(main_linear.get_args_parser().parse_args([*argv[:1], str(tmp_path / 'nothing.pth'), *argv[2:]]))


def test_a_probe_scores_from_its_encoders_stores_to_the_last_bit(data_root, probe, tmp_path, capsys):
    """The probe's logits from the encoder's fp32 stores (its fc on the stored global vector)
    equal its own extraction's bit for bit, and so does every score, ODIN's included."""
    import shutil

    import torch
    import torch.nn.functional as F
    x = torch.rand(5, 7, 3, 3)   # what the reuse rests on: a 1x1 adaptive pool is the mean over H, W
    assert torch.equal(F.adaptive_avg_pool2d(x, 1).flatten(1), x.mean(dim=(2, 3)))
    common = ['--in-dataset', 'CIFAR-10', '--data-root', str(data_root), '--num-workers', '0', '--device', 'cpu',
              '--out-datasets', 'SVHN', '--dtype', 'fp32', '--batch-size', '7']
    methods = ['--method', 'msp', 'energy', 'vim', 'react', 'odin', 'csd', '--k', '3']
    run = lambda ckp, cache, *extra: csd_cli.main(csd_cli.get_args_parser().parse_args(
        [*common, '--ckp', ckp, '--cache-dir', str(tmp_path / cache), '--output-dir', str(tmp_path / 'res' / cache),
         *extra]))
    own = run(probe[1], 'own', *methods)
    run(probe[0], 'shared', '--method', 'knn', '--k', '3')   # the encoder's stores
    capsys.readouterr()
    reused = run(probe[1], 'shared', *methods)
    out = capsys.readouterr().out
    assert out.count("this probe's logits computed from them") == 3 and '[features]' not in out
    for split in ('train', 'test', 'SVHN'):
        a, b = own['splits'][split], reused['splits'][split]
        assert b['logits'].dtype == np.float32 and np.array_equal(a['logits'], b['logits']), split
        assert np.array_equal(a['features'], b['features']) and np.array_equal(a['labels'], b['labels'])
    for method in own['scores']:
        assert np.array_equal(own['scores'][method][0], reused['scores'][method][0]), method
        assert own['results'][method] == reused['results'][method], method
    # fp16 stores, or an encoder file that is gone: the probe extracts its own features
    run(probe[0], 'half', '--method', 'knn', '--k', '3', '--dtype', 'fp16')
    capsys.readouterr()
    run(probe[1], 'half', '--method', 'energy', '--dtype', 'fp16')
    assert "logits computed from them" not in capsys.readouterr().out
    shutil.copy(probe[1], tmp_path / 'linear.pth')
    moved = tmp_path / 'moved.pth'
    shutil.move(probe[0], moved)
    try:
        run(str(tmp_path / 'linear.pth'), 'shared', '--method', 'energy')
        out = capsys.readouterr().out
        assert 'is not here: extracting its features again' in out and '[features] train' in out
    finally:
        shutil.move(moved, probe[0])


def test_k_auto_names_its_validation_data_and_keeps_it_out_of_the_table(data_root, tmp_path, capsys):
    from tests.fixtures import authors_checkpoint
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


def test_in_dataset_path_scores_a_path_trained_model_on_its_own_folders(tmp_path):
    from ALPA import main_ce
    from tests.fixtures import find_last, write_image_folder
    for split, n in (('train', 6), ('test', 3)):
        for c in ('cat', 'dog'):
            write_image_folder(str(tmp_path / split / c), n, size=36, seed=len(c) + n)
    write_image_folder(str(tmp_path / 'other'), 5, size=40, seed=9)
    main_ce.main(main_ce.get_args_parser().parse_args([
        '--dataset', 'path', '--data-root', str(tmp_path / 'train'), '--mean', '(0.5,0.5,0.5)', '--std',
        '(0.25,0.25,0.25)', '--size', '24', '--width', '4', '--batch-size', '4', '--epochs', '1', '--num-workers', '0',
        '--save-folder', str(tmp_path / 'save'), '--device', 'cpu', '--eval', 'none']))
    out = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'path', '--in-test', str(tmp_path / 'test'), '--ckp', find_last(tmp_path / 'save'),
        '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'), '--num-workers', '0',
        '--device', 'cpu', '--out-datasets', str(tmp_path / 'other'), '--method', 'knn', 'energy', '--k', '3']))
    sp = out['splits']
    assert sp['train']['features'].shape[0] == 12 and sp['test']['features'].shape[0] == 6   # its own folders
    assert set(out['results']['energy']) == {'other'}
    meta = json.loads(next((tmp_path / 'res' / 'path').rglob('energy.json')).read_text())['meta']
    assert meta['test_norm'] == {'source': 'checkpoint', 'mean': [0.5] * 3, 'std': [0.25] * 3}


def test_odin_matches_its_equation_one_input_at_a_time():
    """x̃ = x − ε·sign(∇ₓ −log softmax(f(x)/T)_ŷ)/σ, score = max softmax(f(x̃)/T), per input."""
    import torch

    from CSD.baselines import odin_scores
    from util.networks import build_model
    torch.manual_seed(0)
    model = build_model('resnet18-ce', width=4, num_classes=5).eval()
    x = torch.randn(6, 3, 32, 32)
    std, t, eps = (0.2, 0.3, 0.4), 1000.0, 0.0014
    loader = [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))]
    got = odin_scores(model, loader, torch.device('cpu'), std, t, eps)
    sigma = torch.tensor(std).view(3, 1, 1)
    for i in range(6):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logp = torch.log_softmax(model(xi)[0] / t, dim=0)
        (-logp[logp.argmax()]).backward()
        x_odin = x[i] - eps * torch.sign(xi.grad[0]) / sigma
        with torch.no_grad():
            expect = torch.softmax(model(x_odin[None])[0] / t, dim=0).max().item()
        assert got[i] == pytest.approx(expect, rel=1e-6)
    # ε = 0 is MSP at temperature T
    with torch.no_grad():
        plain = torch.softmax(model(x) / t, dim=1).max(1).values.numpy()
    np.testing.assert_allclose(odin_scores(model, loader, torch.device('cpu'), std, t, 0.0), plain, rtol=1e-6)


def test_odin_halves_its_pieces_after_out_of_memory_with_the_same_scores():
    """A device that runs out of memory above 2 images a pass: ODIN goes on in pieces of 2
    (one line said), and every score equals the whole-batch one; --odin-batch-size sets the
    piece from the start; a single image that does not fit is a UserError."""
    import torch

    from CSD.baselines import odin_scores
    from util.errors import UserError
    from util.networks import build_model
    torch.manual_seed(0)
    model = build_model('resnet18-ce', width=4, num_classes=5).eval()
    x = torch.randn(11, 3, 32, 32)
    loader = [(x[:8], torch.zeros(8)), (x[8:], torch.zeros(3))]
    args = (torch.device('cpu'), (0.2, 0.3, 0.4), 1000.0, 0.0014)
    whole = odin_scores(model, loader, *args)
    real_forward, sizes = model.forward, []

    def small_device(inp, limit):
        sizes.append(len(inp))
        if len(inp) > limit:
            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')
        return real_forward(inp)
    model.forward = lambda inp: small_device(inp, 2)
    lines = []
    np.testing.assert_allclose(odin_scores(model, loader, *args, log=lines.append), whole, rtol=1e-6)
    assert len(lines) == 2 and '4 images' in lines[0] and '2 images' in lines[1]   # 8 -> 4 -> 2, said each time
    assert max(s for s in sizes[3:]) <= 2
    sizes.clear()
    np.testing.assert_allclose(odin_scores(model, loader, *args, batch_size=2, log=lines.append), whole, rtol=1e-6)
    assert max(sizes) == 2 and len(lines) == 2
    model.forward = lambda inp: small_device(inp, 0)
    with pytest.raises(UserError, match='single image'):
        odin_scores(model, loader, *args, log=lines.append)
    with pytest.raises(UserError, match='--odin-batch-size 0'):
        odin_scores(model, loader, *args, batch_size=0)


def test_cli_odin_on_a_ce_checkpoint(data_root, tmp_path):
    from tests.fixtures import authors_checkpoint
    authors_checkpoint(tmp_path / 'ce.pth', arch='resnet18-ce')
    out = csd_cli.main(csd_cli.get_args_parser().parse_args([
        '--in-dataset', 'CIFAR-10', '--ckp', str(tmp_path / 'ce.pth'), '--model-arch', 'resnet18-ce',
        '--data-root', str(data_root), '--cache-dir', str(tmp_path / 'cache'), '--output-dir', str(tmp_path / 'res'),
        '--num-workers', '0', '--device', 'cpu', '--out-datasets', 'SVHN', 'dtd', '--method', 'odin', 'msp']))
    id_scores, ood = out['scores']['odin']
    assert len(id_scores) == 20 and set(ood) == {'SVHN', 'dtd'} and len(ood['SVHN']) == 12
    assert not np.allclose(id_scores, out['scores']['msp'][0])     # T and ε change the scores


def test_our_detectors_give_pytorch_oods_scores():
    """pytorch-ood (a well-kept library) as a second reference: its detectors return outlier
    scores (higher = more OOD), ours ID scores, so ours = −theirs."""
    pood = pytest.importorskip('pytorch_ood.detector')
    import torch
    train, (w, b) = fixed_split(11, n=90, c=8)
    test, _ = fixed_split(12, n=30, c=8)
    test['logits'] = test['features'][:, 4] @ w.T + b     # one classifier for both sets
    z, zt = torch.from_numpy(test['logits']), torch.from_numpy(train['features'][:, 4])
    np.testing.assert_allclose(BASELINES['msp']().score(test), -pood.MaxSoftmax.score(z).numpy(), rtol=1e-10)
    np.testing.assert_allclose(BASELINES['energy']().score(test), -pood.EnergyBased.score(z).numpy(), rtol=1e-10)
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
    maha = pood.Mahalanobis(None).fit_features(f32(zt), torch.from_numpy(train['labels']))
    # pytorch-ood keeps the Gaussian log-density's factor 1/2 and does not divide the summed outer
    # products by N (its comment says so); Lee et al.'s empirical covariance does: the same ranking,
    # ours = 2N x theirs.
    n = len(train['labels'])
    np.testing.assert_allclose(BASELINES['mahalanobis']().fit(train).score(test),
                               2 * n * -maha.predict_features(f32(test['features'][:, 4])).double().numpy(), rtol=1e-3)
    vim = pood.ViM(None, d=4, w=torch.from_numpy(w), b=torch.from_numpy(b)).fit_features(zt, None)
    theirs = vim.predict_features(torch.from_numpy(test['features'][:, 4])).numpy()
    ours = BASELINES["vim"]().fit(train, Context(head=(w, b))).score(test)
    np.testing.assert_allclose(ours, -theirs, rtol=1e-4, atol=1e-4)   # theirs in float32
