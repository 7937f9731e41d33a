"""The two big GEMMs of AlignmentStats' forward (logits k_b q_aᵀ and G = v_b v_aᵀ, each
[Nb·m, d] x [d, X] at 2B = 256 views of 4x4 maps, d = 80) in fp32, and with bf16 inputs cast
back to fp32 for the fp32 softmax and passes that follow (the numerically safe half of a bf16
AlignmentStats), with the logits' error that the casts cost. Quoted in BENCHMARKS
("AlignmentStats in cache-sized tiles").

    OMP_NUM_THREADS=1 .venv/bin/python bench/session_scripts/alignment_mixed.py
"""
import statistics
import time

import torch

NB, M, D = 256, 16, 80


def gemms(q, va, k, vb, dtype, repeats=5):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = (k.reshape(-1, D).to(dtype) @ q.T.to(dtype)).float()
        gram = (vb.reshape(-1, D).to(dtype) @ va.T.to(dtype)).float()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), logits, gram


if __name__ == '__main__':
    torch.manual_seed(0)
    q, va = torch.randn(NB * M, D) / 9, torch.randn(NB * M, D)
    k, vb = torch.randn(NB, M, D), torch.randn(NB, M, D)
    t32, l32, _ = gemms(q, va, k, vb, torch.float32)
    t16, l16, _ = gemms(q, va, k, vb, torch.bfloat16)
    err = (l32 - l16).abs().max().item()
    print(f"two GEMMs: fp32 {t32:.3f} s, bf16 inputs -> fp32 {t16:.3f} s ({t32 / t16:.2f}x); "
          f"logits' max error {err:.4f} ({err / l32.abs().max().item():.2%} of the largest); "
          f"{torch.get_num_threads()} threads")
