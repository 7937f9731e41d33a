"""ID accuracy of every model of a full-preset run, mean ± std over the seeds found, from the
JSON that CSD.py wrote beside each table (``meta.id_accuracy``: kNN-20 vote on the global
features for SupCon encoders, the classifier for CE models and linear probes).

    python bench/session_scripts/id_accuracy.py /work/runs/fmnist_full2
"""
import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1]) / 'results' / 'fashion-mnist'
acc = {}
for run in sorted(root.iterdir()):
    seed, model = run.name.split('-', 1)
    js = sorted(run.glob('*.json'))
    if not js:
        continue
    meta = json.loads(js[0].read_text())['meta']['id_accuracy']
    acc.setdefault(model, {})[seed] = (meta['how'], 100 * meta['value'])
for model, per_seed in acc.items():
    vals = [v for _, v in per_seed.values()]
    how = next(iter(per_seed.values()))[0]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    print(f"{model:<22} {statistics.mean(vals):6.2f} ± {sd:4.2f}  ({how}; "
          + ', '.join(f"{s} {v:.2f}" for s, (_, v) in per_seed.items()) + ')')
