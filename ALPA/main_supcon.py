"""SupCon (Base), ALPA-train and ALPA-finetune with a contrastive backbone.

    Base:           python ALPA/main_supcon.py --batch_size 512 --learning_rate 0.5 --temp 0.1 --cosine
    ALPA-train:     python ALPA/main_supcon.py --batch_size 128 --learning_rate 0.5 --temp 0.1 --cosine --alpa_train
    ALPA-finetune:  python ALPA/main_supcon.py --batch_size 128 --learning_rate 0.1 --temp 0.1 --cosine \
                        --alpa_finetune --ckp save/SupCon/cifar10_models/<base run>/last.pth

Multi-GPU: torchrun --nproc_per_node=N ALPA/main_supcon.py ... (--batch_size is the global batch).
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python ALPA/main_supcon.py`

from ALPA.engine import add_train_args, run
from util.errors import run_cli


def get_args_parser():
    parser = argparse.ArgumentParser('MODE training (supcon)', add_help=True)
    return add_train_args(parser, 'supcon')


def main(args):
    return run(args, 'supcon')


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
