"""One PASS / FAIL / SKIP / XFAIL / XPASS line per test from a saved pytest log run with
``-v -rA`` (``bench/gpu_check.sh`` uses it):

    python bench/pytest_results.py LOG

Names and outcomes come from the ``short test summary info`` section only, so a test that
prints a line starting with "PASSED" cannot add a result. That section names each passed,
failed or errored test, but folds skips by location (``SKIPPED [2] tests/x.py:15: reason``);
the skipped tests' names come from pytest's ``-v`` progress lines (``path::name SKIPPED``),
which are one line per test when output is captured (no ``-s``). Exit status 1 when a test
failed or errored, or the log has no summary section.
"""
import re
import sys

OUTCOMES = {'PASSED': 'PASS', 'FAILED': 'FAIL', 'ERROR': 'FAIL', 'XFAIL': 'XFAIL', 'XPASS': 'XPASS'}
SUMMARY = re.compile(r'^=+ short test summary info =+$')
END = re.compile(r'^=+ .* in [\d.]+s.* =+$')
NAMED = re.compile(r'^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+::\S+)(?: - (.*))?$')
FOLDED_SKIP = re.compile(r'^SKIPPED \[(\d+)\] (\S+?):(\d+): (.*)$')
PROGRESS_SKIP = re.compile(r'^(\S+::\S+) SKIPPED(?: \((.*)\))?')


def parse(text):
    """-> (list of (outcome, test, detail)), whether a summary section was found."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if SUMMARY.match(line)), None)
    if start is None:
        return [], False
    results, skips = [], 0
    for line in lines[start + 1:]:
        if END.match(line):
            break
        m = NAMED.match(line)
        if m:
            results.append((OUTCOMES[m.group(1)], m.group(2), m.group(3) or ''))
            continue
        m = FOLDED_SKIP.match(line)
        if m:
            skips += int(m.group(1))
            results.append(('SKIP', f'{m.group(2)}:{m.group(3)}', m.group(4), int(m.group(1))))
    named = [(m.group(1), m.group(2) or '') for m in map(PROGRESS_SKIP.match, lines[:start]) if m]
    folded = [r for r in results if len(r) == 4]
    results = [r for r in results if len(r) == 3]
    if len(named) == skips:
        results += [('SKIP', name, why) for name, why in named]
    else:   # names not recoverable (a skipped test printed under -s): one line per skip, by location
        results += [('SKIP', where, why) for where, why, n in (r[1:] for r in folded) for _ in range(n)]
    return results, True


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(argv[0], errors='replace') as f:
        results, found = parse(f.read())
    if not found:
        print(f"{argv[0]}: no 'short test summary info' section: did pytest run with -rA, and finish?")
        return 1
    for outcome, test, detail in results:
        print(f"{outcome} {test.split('::', 1)[-1]}" + (f" ({detail})" if detail and outcome != 'PASS' else ''))
    return 1 if any(r[0] == 'FAIL' for r in results) else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
