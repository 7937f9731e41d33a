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
