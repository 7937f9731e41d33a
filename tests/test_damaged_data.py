"""Damaged data: unreadable images in an OOD folder or a training folder are skipped and
named, and a folder with nothing readable is an error."""
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from CSD import feature_collect
from tests.clitools import ENV, REPO, collect_args
from tests.fixtures import (
    write_image_folder,
    write_truncated_image,
)
from util.errors import run_cli


# ---------------------------------------------------------------- 2. damaged data
def test_damaged_ood_folder_is_collected_with_every_bad_file_reported(data_root, ckpts, tmp_path, capsys):
    good = write_image_folder(str(tmp_path / 'damaged'), 4)              # img_0000..0003.png
    bad = {'img_0004_garbage.png': b'this is not a png at all',
           'img_0005_cut.jpg': None, 'notes.txt': b'not an image', '.DS_Store': b'\x00\x00\x00\x01Bud1'}
    for name, content in bad.items():
        if content is None:
            write_truncated_image(str(tmp_path / 'damaged' / name), ext='jpg')
        else:
            (tmp_path / 'damaged' / name).write_bytes(content)
    (tmp_path / 'clean').mkdir()
    for p in good:
        shutil.copy(p, tmp_path / 'clean')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        splits = feature_collect.main(collect_args(data_root, tmp_path / 'cache', ckpts / 'ckpt.pth',
                                                   tmp_path / 'damaged', tmp_path / 'clean'))
    out = capsys.readouterr().out
    messages = [str(w.message) for w in caught]
    for name in bad:
        assert any(name in m for m in messages), f"no warning names {name}: {messages}"
    # The printed summary counts both kinds: undecodable images and non-image files.
    assert f"{tmp_path / 'damaged'}: skipped 2 of 6 unreadable files" in out, out
    assert f"{tmp_path / 'damaged'}: ignored 2 non-image files (.DS_Store, notes.txt)" in out, out
    damaged, clean = splits['damaged'], splits['clean']
    assert damaged['meta']['n'] == 4 and damaged['meta']['skipped'] == 2
    assert damaged['features'].shape == clean['features'].shape == (4, 6, 64)
    np.testing.assert_array_equal(damaged['features'], clean['features'])   # exactly the good images

    # A folder where nothing can be read is a one-line user error, not a traceback.
    (tmp_path / 'all_bad').mkdir()
    (tmp_path / 'all_bad' / 'a.png').write_bytes(b'garbage')
    write_truncated_image(str(tmp_path / 'all_bad' / 'b.png'))
    args = collect_args(data_root, tmp_path / 'cache', ckpts / 'ckpt.pth', tmp_path / 'all_bad')
    with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        warnings.simplefilter('ignore')
        run_cli(feature_collect.main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith('error: none of the 2 images of all_bad could be read')



def test_corrupt_image_in_path_training_is_skipped_and_named(tmp_path):
    for c in ('cat', 'dog'):
        write_image_folder(str(tmp_path / 'data' / c), 4, size=36, seed=len(c))
    write_truncated_image(str(tmp_path / 'data' / 'dog' / 'zz_broken.jpg'))
    proc = subprocess.run([sys.executable, str(REPO / 'ALPA' / 'main_ce.py'), '--dataset', 'path',
                           '--data-root', str(tmp_path / 'data'), '--mean', '0.5,0.5,0.5', '--std', '0.25,0.25,0.25',
                           '--width', '4', '--batch-size', '3', '--epochs', '1', '--num-workers', '0', '--device', 'cpu',
                           '--save-folder', str(tmp_path / 'save'), '--eval', 'none'],
                          capture_output=True, text=True, cwd=str(tmp_path), env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'skipping unreadable image' in proc.stderr and 'zz_broken.jpg' in proc.stderr
