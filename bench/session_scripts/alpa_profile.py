"""torch.profiler over three ALPA-train steps (bf16 + channels_last, width 16, 1x28x28, after two
warm-up steps), as quoted in BENCHMARKS ("where an ALPA step goes").

    OMP_NUM_THREADS=1 .venv/bin/python bench/session_scripts/alpa_profile.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_train_step import get_args_parser, make_trainer

if __name__ == '__main__':
    args = get_args_parser().parse_args(['--width', '16', '--channels', '1', '--size', '28'])
    images, labels = torch.randn(256, 1, 28, 28), torch.randint(0, 6, (128,))
    trainer, opt = make_trainer(args, torch.device('cpu'), 'ALPA-train', True, True)

    def step():
        loss = trainer.losses(trainer.to_device(images), labels)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=30))
