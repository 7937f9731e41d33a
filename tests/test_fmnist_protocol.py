"""The main job's entry script end to end on a tiny Fashion-MNIST in the real IDX format."""
import json
import os
import re

import pytest

from experiments import mode_fmnist
from tests.fixtures import write_fashion_mnist
from util.errors import UserError


@pytest.fixture(scope='module')
def fmnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('fm')
    write_fashion_mnist(str(root), n_train=200, n_test=40)
    return root


@pytest.mark.slow
def test_mode_fmnist_end_to_end(fmnist_root, tmp_path, capsys):
    args = mode_fmnist.get_args_parser().parse_args([
        '--seeds', '0', '1', '--width', '4', '--batch-size', '8', '--epochs', '1', '--steps-per-epoch', '2',
        '--finetune-epochs', '1', '--max-train', '60', '--data-root', str(fmnist_root), '--out-dir', str(tmp_path),
        '--device', 'cpu', '--num-workers', '0', '--figures', '--far', 'digits'])  # noise sets: 20k images, too slow
    per_seed = mode_fmnist.main(args)
    out = capsys.readouterr().out
    assert set(per_seed) == {0, 1} and set(per_seed[0]) == {'Base', 'ALPA-finetune', 'ALPA-train'}
    for model in per_seed[0].values():
        assert set(model) == {'knn', 'csd'}
        assert set(model['csd']) == {'fashion-mnist-heldout', 'digits'}
    summary = [l for l in out.splitlines() if l.count('±') == 4]
    assert [l.split()[:2] for l in summary] == [[m, s] for m in ('Base', 'ALPA-finetune', 'ALPA-train') for s in ('knn', 'csd')]
    assert (tmp_path / 'summary.md').read_text().count('\n') == 8
    figs = sorted(os.listdir(tmp_path / 'figures'))
    assert 'tsne.png' in figs and 'knn_grid_ALPA-finetune.png' in figs and 'roc_Base.png' in figs
    assert sum(f.startswith('hist_') for f in figs) == 6
    assert all((tmp_path / 'figures' / f).stat().st_size > 10_000 for f in figs)


@pytest.mark.slow
def test_full_preset_adds_ce_rows_and_merges_seeds_run_separately(fmnist_root, tmp_path, capsys):
    common = ['--preset', 'full', '--width', '4', '--batch-size', '8', '--epochs', '1', '--steps-per-epoch', '2',
              '--finetune-epochs', '1', '--max-train', '60', '--data-root', str(fmnist_root), '--out-dir', str(tmp_path),
              '--device', 'cpu', '--num-workers', '0', '--far', 'digits', '--precision', 'fp32', '--probe-epochs', '1',
              '--max-ood', '40']
    mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(['--seeds', '0', *common]))
    capsys.readouterr()
    per_seed = mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(['--seeds', '1', *common]))
    out = capsys.readouterr().out
    assert set(per_seed) == {0, 1} and 'seed 0: results from an earlier run' in out
    # each probe scored from its encoder's stores (train, test, held-out, digits): only its logits are new
    assert out.count("this probe's logits computed from them") == 3 * 4
    assert set(per_seed[0]) == {'Base', 'ALPA-finetune', 'ALPA-train', 'CE', 'ALPA-finetune*', 'Base +probe',
                                'ALPA-finetune +probe', 'ALPA-train +probe'}
    summary = [line.split() for line in out.splitlines() if line.count('±') == 4]
    rows = {(r[0], r[1]) if r[1] != '+probe' else (r[0] + ' +probe', r[2]) for r in summary}
    assert {('CE', 'knn'), ('CE', 'energy'), ('CE', 'odin'), ('ALPA-finetune*', 'csd'), ('Base', 'global+center'),
            ('Base', 'local'), ('Base', 'mahalanobis'), ('ALPA-train', 'ssd'), ('Base +probe', 'vim')} <= rows
    assert 'over 2 seed(s)' in out
    table = [line for line in out.splitlines() if line.count('±') == 4]
    timings = json.loads((tmp_path / 'summary.json').read_text())['timings_s']
    again = mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(['--summary-only', *common]))
    assert json.loads((tmp_path / 'summary.json').read_text())['timings_s'] == timings   # left as the run wrote it
    out2 = capsys.readouterr().out
    assert again == per_seed and [line for line in out2.splitlines() if line.count('±') == 4] == table
    assert '[cache]' not in out2 and 'written: ' not in out2.split('seed 1: results')[0]   # nothing scored
    assert out2.rstrip().endswith(f'written: {tmp_path}/summary.md') and 'total ' not in out2   # nor timed
    # the ID accuracies and loss curves BENCHMARKS quotes beside the table, for both seeds
    from experiments import fmnist_report
    fmnist_report.main(fmnist_report.get_args_parser().parse_args(['--out-dir', str(tmp_path)]))
    report = capsys.readouterr().out
    assert re.search(r'^Base-probe +[\d.]+ ± [\d.]+ +\(classifier; seed0 [\d.]+, seed1 [\d.]+\)$', report, re.M)
    assert re.search(r'^Base +[\d.]+ ± [\d.]+ +\(kNN-20 vote; seed0', report, re.M)
    assert re.search(r'^ALPA-train alpa +[\d.]+ \| [\d.]+$', report, re.M)   # one epoch, two seeds
    with pytest.raises(UserError, match='--summary-only: no seed'):
        mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(['--summary-only', *common, '--max-ood', '41']))
    # the release of seed 0 (stripped checkpoints + manifest), then --released re-scores them
    from experiments import release_checkpoints
    dest = tmp_path / 'released'
    manifest = release_checkpoints.main(['--out-dir', str(tmp_path), '--seed', '0', '--dest', str(dest),
                                         '--commit', 'test'])
    assert [e['name'] for e in manifest['checkpoints']] == ['Base', 'ALPA-finetune', 'ALPA-train', 'CE']
    base = manifest['checkpoints'][0]
    assert base['max_train'] == 60 and '--max-train 60' in base['rescore_command']
    assert base['max_ood'] == 40 and '--max-ood 40' in base['rescore_command']
    assert base['results']['csd']['digits']['AUROC'] == pytest.approx(
        100 * per_seed[0]['Base']['csd']['digits']['AUROC'], abs=1e-3)
    capsys.readouterr()
    rescored = mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(
        ['--released', str(dest), '--width', '4', '--data-root', str(fmnist_root), '--out-dir', str(tmp_path / 'rs'),
         '--device', 'cpu', '--num-workers', '0', '--far', 'digits']))
    out = capsys.readouterr().out
    assert set(rescored[0]) == {'Base', 'ALPA-finetune', 'ALPA-train', 'CE'}
    assert 'largest |difference| 0.000' in out, out


def test_seed_jobs_start_each_job_after_what_it_needs():
    args = mode_fmnist.resolve_preset(mode_fmnist.get_args_parser().parse_args(['--preset', 'full', '--device', 'cpu']))
    jobs = mode_fmnist.seed_jobs(args)
    assert len(jobs) == 5 + 3 + 8 and len(set(jobs)) == len(jobs)
    made = []
    scored = []
    for kind, model, needs in jobs:   # in list order every job's input is made before it
        assert needs is None or needs in made, (kind, model, needs)
        after = mode_fmnist.waits_for(kind, model)   # and a probe is scored after its encoder
        assert after is None or after[1] in scored, (kind, model, after)
        (scored if kind == 'score' else made).append(model)
    assert [(m, mode_fmnist.waits_for(k, m)) for k, m, _ in jobs if mode_fmnist.waits_for(k, m)] == [
        (f'{m} +probe', ('score', m)) for m in ('Base', 'ALPA-finetune', 'ALPA-train')]
    assert [m for k, m, _ in jobs if k == 'score'] == mode_fmnist.MODELS
    assert ('train', 'ALPA-finetune', 'Base') in jobs and ('train', 'ALPA-finetune*', 'CE') in jobs
    assert ('probe', 'ALPA-train +probe', 'ALPA-train') in jobs and ('score', 'Base +probe', 'Base +probe') in jobs
    demo = mode_fmnist.seed_jobs(mode_fmnist.resolve_preset(mode_fmnist.get_args_parser().parse_args(['--device', 'cpu'])))
    assert [(k, m) for k, m, _ in demo] == [('train', 'Base'), ('train', 'ALPA-train'), ('train', 'ALPA-finetune'),
                                            ('score', 'Base'), ('score', 'ALPA-finetune'), ('score', 'ALPA-train')]


@pytest.mark.slow
def test_jobs_in_two_processes_give_the_same_numbers(fmnist_root, tmp_path, capsys):
    """--jobs 2 (each job in a process of its own, one thread each here) against --jobs 1 in
    this process with one thread (tests/conftest.py): the same results to the last bit."""
    common = ['--width', '4', '--batch-size', '8', '--epochs', '1', '--steps-per-epoch', '2', '--finetune-epochs', '1',
              '--max-train', '60', '--max-ood', '30', '--data-root', str(fmnist_root), '--device', 'cpu',
              '--num-workers', '0', '--far', 'digits', '--precision', 'fp32', '--probe-epochs', '1']
    one = mode_fmnist.main(mode_fmnist.get_args_parser().parse_args([*common, '--out-dir', str(tmp_path / 'a')]))
    capsys.readouterr()
    two = mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(
        [*common, '--out-dir', str(tmp_path / 'b'), '--jobs', '2']))
    out = capsys.readouterr().out
    assert two == one
    logs = tmp_path / 'b' / 'seed0' / 'logs'
    models = ('Base', 'ALPA-finetune', 'ALPA-train')
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        [f'{k}-{m}.log' for k in ('train', 'score') for m in models] +
        [f'{k}-{m}-probe.log' for k in ('probe', 'score') for m in models])
    assert 'ID accuracy' in (logs / 'score-Base.log').read_text()   # the job's output went to its log
    for m in models:   # a probe's scoring started after its encoder's had written the stores
        assert "this probe's logits computed from them" in (logs / f'score-{m}-probe.log').read_text()
    assert out.count(': started, 1 thread(s)') == 12 and out.count(' s\n') >= 12
    summary = json.loads((tmp_path / 'b' / 'summary.json').read_text())
    assert set(summary['timings_s']) == set(json.loads((tmp_path / 'a' / 'summary.json').read_text())['timings_s'])
    # a job that fails stops the run with one line naming its log; what was done stays
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match=r'train (Base|ALPA-train) \(seed 0\) failed: .*[Ff]ashion.*'
                                        r'whole output is in .*train-(Base|ALPA-train).log'):
        mode_fmnist.main(mode_fmnist.get_args_parser().parse_args(
            [*common, '--out-dir', str(tmp_path / 'c'), '--jobs', '2', '--data-root', str(tmp_path / 'empty')]))
