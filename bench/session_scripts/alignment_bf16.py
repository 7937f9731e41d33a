"""AlignmentStats forward + backward at the full preset's shapes (2B = 256 views, 4x4 maps, d = 80),
fp32 against bf16 inputs, as quoted in BENCHMARKS ("where an ALPA step goes").

    OMP_NUM_THREADS=T .venv/bin/python bench/session_scripts/alignment_bf16.py

Timing only: the two dtypes get different random draws, so no accuracy is compared here.
"""
import time

import torch

from ALPA.attention import AlignmentStats

NB, M, D = 256, 16, 80


def median_step(dtype, repeats=5):
    q = (torch.randn(NB * M, D) / 9).to(dtype).requires_grad_()
    va = torch.randn(NB * M, D).to(dtype).requires_grad_()
    k = torch.randn(NB, M, D).to(dtype).requires_grad_()
    vb = torch.randn(NB, M, D).to(dtype).requires_grad_()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot, sq = AlignmentStats.apply(q, va, k, vb, 0.0)
        (dot.float().sum() + sq.float().sqrt().sum()).backward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


if __name__ == '__main__':
    torch.manual_seed(0)
    t32, t16 = median_step(torch.float32), median_step(torch.bfloat16)
    print(f"fp32 {t32:.3f}s bf16 {t16:.3f}s speedup {t32 / t16:.2f}x; threads {torch.get_num_threads()}")
