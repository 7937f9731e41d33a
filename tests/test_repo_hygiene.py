"""What a tracked file may not say: a path of the machine it was written on, or a word about
the working session that wrote it. Both mean nothing to a reader of the repository."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Written in pieces so that this file does not match itself.
MACHINE_PATH = re.compile(r'(?<![\w.~-])/(?:' + '|'.join(['wo' + 'rk', 'tm' + 'p', 'ho' + 'me', 'ro' + 'ot', 'mn' + 't'])
                          + r')/')
SESSION_WORD = re.compile(r'\b(?:first|second|third|fourth|fifth|this|last|next|previous|earlier|later) '
                          + 'ses' + r'sions?\b|\bses' + r'sion[_ ]scripts?\b', re.IGNORECASE)
TEXT = ('.py', '.sh', '.md', '.txt', '.toml', '.json', '.cfg', '.yml', '.yaml', '')


def tracked_text_files():
    try:
        names = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip('not a git checkout')
    for name in names:
        if os.path.splitext(name)[1] in TEXT and os.path.isfile(os.path.join(REPO, name)):
            yield name


def offending_lines(pattern):
    out = []
    for name in tracked_text_files():
        with open(os.path.join(REPO, name), errors='replace') as f:
            for i, line in enumerate(f, 1):
                if pattern.search(line):
                    out.append(f'{name}:{i}: {line.strip()[:120]}')
    return out


def test_no_tracked_file_names_a_machine_path():
    assert offending_lines(MACHINE_PATH) == []


def test_no_tracked_file_speaks_of_a_working_session():
    assert offending_lines(SESSION_WORD) == []


def test_the_patterns_catch_what_they_are_for():
    assert MACHINE_PATH.search('--out-dir /' + 'work/runs/x') and MACHINE_PATH.search('cp a /' + 'tmp/x')
    assert not MACHINE_PATH.search('datasets/ood_data/tmp/x') and not MACHINE_PATH.search('~/work/x')
    assert SESSION_WORD.search('measured in the third ' + 'session') and SESSION_WORD.search('bench/session' + '_scripts/')
    assert not SESSION_WORD.search('a training run')


# ---------------------------------------------------------------- which way imports run
# util/ is the base; ALPA/ (training) and CSD/ (test time) build on it and not on each other;
# experiments/, bench/ and tests/ may use everything (README, "Layout").
ALLOWED = {'util': {'util'}, 'ALPA': {'util', 'ALPA'}, 'CSD': {'util', 'CSD'}}


def imports_of(path):
    import ast
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def package_files(package):
    folder = os.path.join(REPO, package)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.py'))


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_imports_run_one_way(package):
    ours = {'util', 'ALPA', 'CSD', 'experiments', 'bench', 'tests'}
    wrong = [f'{os.path.relpath(path, REPO)}: {module}' for path in package_files(package)
             for module, _ in imports_of(path)
             if module.split('.')[0] in ours and module.split('.')[0] not in ALLOWED[package]]
    assert wrong == []


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_no_module_imports_another_modules_private_names(package):
    private = [f'{os.path.relpath(path, REPO)}: from {module} import {name}' for path in package_files(package)
               for module, names in imports_of(path) if module.split('.')[0] in ALLOWED
               for name in names if name.startswith('_')]
    assert private == []
