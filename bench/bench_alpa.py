"""Time and peak memory of ALPA (attention similarity + ALPA loss, forward and backward):
this repo's exact Gram-matrix form against the authors' materialising form.

Each implementation runs in its own subprocess so that peak memory is its own:

    python bench/bench_alpa.py                     # 2B=256 views, 4x4 maps, C=512, d=80, CPU
    python bench/bench_alpa.py --device cuda --views 512
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ALPA.attention import AttentionSimilarity
from ALPA.losses import ALPALoss
from ALPA.reference import reference_similarity

REPO_ROOT = Path(__file__).resolve().parents[1]


def get_args_parser():
    parser = argparse.ArgumentParser("ALPA forward+backward benchmark", add_help=True)
    parser.add_argument("--views", type=int, default=256,
                        help="2B, number of views in the batch (default 256)")
    parser.add_argument("--size", type=int, default=4,
                        help="H = W of the last-stage map in positions (default 4)")
    parser.add_argument("--channels", type=int, default=512, help="C (default 512)")
    parser.add_argument("--feat-dim", type=int, default=80,
                        help="d of query/key/value (default 80)")
    parser.add_argument("--aggregation", default="mean", help="mean|max|sum|logsum (default mean)")
    parser.add_argument("--cross", action="store_true",
                        help="compare the views with a second, separate set of views instead of "
                             "with themselves (no one-set shortcut; default off, as in training)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs after one warm-up; the median is reported (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads, 0 = torch's default (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    return parser


def maxrss_bytes():
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(args):
    """Build inputs, run one warm-up and ``repeats`` timed steps; return a result dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    attention = AttentionSimilarity(args.channels, args.feat_dim,
                                    aggregation=args.aggregation).to(device)
    criterion = ALPALoss(temperature_s=10.0)
    features = torch.randn(args.views, args.channels, args.size, args.size, device=device)
    features.requires_grad_(True)
    # Training compares the 2B views with themselves; --cross uses a second set.
    others = features.detach().roll(1, dims=0).requires_grad_(True) if args.cross else features
    labels = torch.arange(args.views // 2, device=device).repeat(2)  # two views per image

    if args.worker == "ours":
        def similarity():
            return attention(features, others)
    else:
        def similarity():
            return reference_similarity(attention, features, others)

    def step():
        features.grad = others.grad = None
        attention.zero_grad(set_to_none=True)
        loss = criterion(similarity(), labels)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = maxrss_bytes()
    loss = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = maxrss_bytes() - baseline
    return {"impl": args.worker, "time_s": statistics.median(times), "peak_bytes": peak,
            "loss": loss}


def spawn(args, impl):
    """Run one implementation in a fresh interpreter and read back its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl,
           "--views", str(args.views), "--size", str(args.size),
           "--channels", str(args.channels), "--feat-dim", str(args.feat_dim),
           "--aggregation", args.aggregation, "--repeats", str(args.repeats),
           *(["--cross"] if args.cross else []),
           "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args):
    if args.worker:
        print(json.dumps(run_worker(args)))
        return None
    print(f"ALPA forward+backward: 2B={args.views}, {args.size}x{args.size} maps, "
          f"C={args.channels}, d={args.feat_dim}, aggregation={args.aggregation}, "
          f"{'two sets' if args.cross else 'one set'}, "
          f"device={args.device}, threads={args.threads or torch.get_num_threads()}, "
          f"median of {args.repeats} after 1 warm-up")
    memory = "peak alloc" if args.device.startswith("cuda") else "peak RSS"
    results = {impl: spawn(args, impl) for impl in ("ours", "reference")}
    print(f"{'impl':<10} {'time (s)':>10} {memory + ' (MiB)':>16} {'loss':>12}")
    for impl, r in results.items():
        print(f"{impl:<10} {r['time_s']:>10.3f} {r['peak_bytes'] / 2**20:>16.1f} "
              f"{r['loss']:>12.6f}")
    ours, ref = results["ours"], results["reference"]
    speedup = ref["time_s"] / ours["time_s"]
    memory_ratio = ref["peak_bytes"] / max(ours["peak_bytes"], 1)
    print(f"speed-up: {speedup:.1f}x   memory reduction: {memory_ratio:.1f}x   "
          f"|loss difference|: {abs(ours['loss'] - ref['loss']):.2e}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
