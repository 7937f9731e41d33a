"""Cross-entropy baseline, and ALPA-train / ALPA-finetune with a CE backbone (the * rows).

    Base:           python ALPA/main_ce.py --batch-size 256 --learning-rate 0.2 --cosine
    ALPA-train:     python ALPA/main_ce.py --batch-size 128 --learning-rate 0.2 --cosine --alpa-train
    ALPA-finetune:  python ALPA/main_ce.py --batch-size 128 --learning-rate 0.1 --cosine \
                        --alpa-finetune --ckp save/SupCE/cifar10_models/<base run>/last.pth

The same entry as ``main_supcon.py`` with the CE loss, SupContrast's CE augmentation and
its defaults (batch 256); every flag is documented there and in ``--help``.
"""
import functools

from ALPA.main_supcon import get_args_parser as _get_args_parser
from ALPA.main_supcon import main  # noqa: F401  (the entry point; args carry loss='ce')
from util.errors import run_cli

get_args_parser = functools.partial(_get_args_parser, 'ce')

if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
