"""The product's shape (issue 19), as checks that fail when it grows back by accretion: one
detector registry that CSD.py never bypasses by name, thin entry scripts, each repeated piece
written once, experiments out of bench/, the method and the docs in the repository."""
import ast
import os
import re
import subprocess

import pytest

from CSD import CSD, baselines, detectors, scoring

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_METHOD = {'knn', 'csd', 'local', 'global+center', 'msp', 'energy', 'odin', 'mahalanobis', 'vim', 'react', 'ssd'}


def source(rel):
    with open(os.path.join(REPO, rel)) as f:
        return f.read()


def function(rel, name):
    return next(n for n in ast.walk(ast.parse(source(rel))) if isinstance(n, ast.FunctionDef) and n.name == name)


def code_files():
    names = subprocess.run(['git', 'ls-files', 'util', 'ALPA', 'CSD', 'experiments', '*.py'], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
    return sorted({n for n in names if n.endswith('.py') and not n.startswith(('tests/', 'bench/'))})


# ---------------------------------------------------------------- 1. one resolved run
def test_a_run_is_resolved_once_into_a_frozen_spec():
    import dataclasses

    from CSD import feature_collect
    assert dataclasses.is_dataclass(feature_collect.Run) and feature_collect.Run.__dataclass_params__.frozen
    fields = {f.name for f in dataclasses.fields(feature_collect.Run)}
    assert {'spec', 'id_classes', 'ood', 'norm', 'device', 'name'} <= fields
    callers = [rel for rel in code_files() if re.search(r'\bprepare\(args', source(rel))]
    assert callers == ['CSD/CSD.py', 'CSD/feature_collect.py']   # the two test-time entry scripts
    for rel in callers:   # whose mains resolve nothing themselves that prepare resolves
        body = ast.get_source_segment(source(rel), function(rel, 'main'))
        assert 'prepare(args' in body and not re.search(r'resolve_id_classes|default_ood|resolve_test_norm', body), rel


# ---------------------------------------------------------------- 3. one detector contract
def test_every_method_is_registered_once_and_is_a_detector():
    assert set(detectors.DETECTORS) == EVERY_METHOD and len(detectors.DETECTORS) == len(EVERY_METHOD)
    method_flag = next(a for a in CSD.get_args_parser()._actions if a.dest == 'method')
    assert set(method_flag.choices) == EVERY_METHOD
    for name in EVERY_METHOD:
        det = detectors.build_detector(name, 5)
        assert isinstance(det, scoring.Detector), name
        assert callable(det.fit) and callable(det.score)
    assert isinstance(detectors.build_detector('odin'), baselines.ODIN)


def test_csd_py_special_cases_no_method_by_name():
    body = source('CSD/CSD.py')
    named = re.findall(r"""['"](%s)['"]""" % '|'.join(re.escape(m) for m in EVERY_METHOD), body)
    assert named == ['knn', 'csd'], named     # only --method's default


def test_knn_and_csd_scores_are_wrappers_of_multiscale_knn():
    for name in ('knn_scores', 'csd_scores'):
        fn = function('CSD/scoring.py', name)
        body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.Return), name
    assert 'MultiScaleKNN(' in ast.unparse(function('CSD/scoring.py', 'csd_scores'))
    assert 'csd_scores(' in ast.unparse(function('CSD/scoring.py', 'knn_scores'))


# ---------------------------------------------------------------- 2. thin entry scripts
@pytest.mark.parametrize('rel, name', [('ALPA/main_supcon.py', 'main'), ('ALPA/main_supcon.py', 'train'),
                                       ('CSD/CSD.py', 'main'), ('CSD/feature_collect.py', 'main'),
                                       ('ALPA/main_linear.py', 'main')])
def test_entry_script_mains_are_short(rel, name):
    fn = function(rel, name)
    assert fn.end_lineno - fn.lineno + 1 <= 60, f'{rel}:{name} is {fn.end_lineno - fn.lineno + 1} lines'


def test_csd_main_takes_one_search_config():
    evaluate = function('CSD/CSD.py', 'evaluate')
    assert len(evaluate.args.args) <= 6, [a.arg for a in evaluate.args.args]
    assert 'SearchConfig' in source('CSD/CSD.py')


# ---------------------------------------------------------------- 1. each repeated piece written once
ONCE = {   # pattern -> the one file allowed to hold it
    r'os\.replace\(': 'util/misc.py',                                   # atomic writes: util.misc.atomic_path
    r'math\.cos\(': 'util/lr_sched.py',                                 # the cosine schedule
    r"\.split\(','\)": 'util/lr_sched.py',                              # lr-decay parsing: util.lr_sched.parse_epochs
    r'DatasetSpec\(\*\*': None,                                         # DatasetSpec.replace / with_id_classes
    r'id_classes if [\w.]*id_classes is not None': None,                # util.checkpoint.resolve_id_classes
    r"\.get\('id_classes'\)": 'util/checkpoint.py',
    r'DEFAULT_OOD\s*=': 'CSD/feature_collect.py',                       # the default OOD list
    r'\.choice\(\s*\w+,\s*\w+,\s*replace=False': 'util/misc.py',        # seeded subsets: util.misc.seeded_indices
}


@pytest.mark.parametrize('pattern', sorted(ONCE))
def test_a_repeated_piece_lives_in_one_place(pattern):
    holders = [rel for rel in code_files() if re.search(pattern, source(rel))]
    assert holders == ([ONCE[pattern]] if ONCE[pattern] else []), holders


# ---------------------------------------------------------------- 4.-6. experiments, the method, the docs
def test_bench_holds_benchmarks_only_and_experiments_hold_the_drivers():
    bench = sorted(os.listdir(os.path.join(REPO, 'bench')))
    assert not [f for f in bench if os.path.isdir(os.path.join(REPO, 'bench', f)) and f != '__pycache__'], bench
    assert all(f.startswith('bench_') or f in ('__init__.py', '__pycache__', 'gpu_check.sh', 'ivf_sweep.sh',
                                                'pytest_results.py') for f in bench), bench
    for rel in ('experiments/mode_fmnist.py', 'experiments/release_checkpoints.py'):
        assert os.path.isfile(os.path.join(REPO, rel)), rel


def test_the_method_is_in_the_repository_and_every_citation_points_at_it():
    assert os.path.isfile(os.path.join(REPO, 'docs', 'METHOD.md'))
    cited = set(re.findall(r'docs/METHOD\.md §(\d+)', ''.join(source(rel) for rel in code_files())))
    headings = set(re.findall(r'^## (\d+)', source('docs/METHOD.md'), re.M))
    assert cited and cited <= headings, cited - headings
    stale = [rel for rel in code_files() + ['README.md', 'BENCHMARKS.md'] if 'PAPER' + ' §' in source(rel)]
    assert stale == []


def test_readme_is_short_and_has_a_layout_section():
    readme = source('README.md')
    assert len(readme.splitlines()) <= 150
    assert '## Layout' in readme and 'Imports run one way' in readme
    for folder in ('ALPA/', 'CSD/', 'util/', 'experiments/', 'bench/', 'tests/', 'datasets/', 'docs/'):
        assert f'`{folder}`' in readme, folder
