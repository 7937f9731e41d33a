"""One training epoch (MAE-style engine): the per-step losses and ``train_one_epoch``.

Modes (docs/METHOD.md §5): Base (SupCon on the head, or cross-entropy), ``--alpa-train`` (the base
loss + λ·ALPA on the last-stage maps of both views), ``--alpa-finetune`` (ALPA alone).
Argparse, setup, checkpoints and the epoch loop live in ``main_supcon.py``.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ALPA.losses import ALPALoss, SupConLoss
from util import distributed as dist_lib
from util.errors import UserError
from util.lr_sched import warmup_learning_rate
from util.misc import autocast_dtype, progress


class Trainer:
    def __init__(self, args, model, attention, optimizer, device, scaler, writer=None):
        self.args, self.model, self.attention = args, model, attention
        self.optimizer, self.device, self.scaler, self.writer = optimizer, device, scaler, writer
        self.supcon = SupConLoss(temperature=args.temp) if args.loss == 'supcon' else None
        self.alpa = ALPALoss(args.temperature_s)
        self.use_alpa = args.alpa_train or args.alpa_finetune
        self.use_base = not args.alpa_finetune
        self.amp_dtype = autocast_dtype(device, args.amp, args.amp_dtype)
        # Inputs in the model's memory layout (channels_last: NHWC kernels, faster with bf16).
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def losses(self, images, labels):
        """images [2B, ...] (view-major), labels [B] -> dict of scalar loss terms (global batch)."""
        bsz = labels.shape[0]
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            fmap, head = self.model(images)                    # [2B, C, h, w], [2B, D or K]
        # The losses (softmaxes over large logit matrices, ALPA's cosines) run in fp32.
        all_labels = dist_lib.gather_nograd(labels)
        terms = {}
        if self.use_base:
            out = dist_lib.gather_with_grad(head.float())      # [world·2B, D or K]
            if self.args.loss == 'supcon':
                z = _views_to_sup(out, bsz, dist_lib.world_size())  # [world·B, 2, D]
                terms['supcon'] = self.supcon(z, all_labels)
            else:
                views = out.shape[0] // (bsz * dist_lib.world_size())
                terms['ce'] = F.cross_entropy(out, _repeat_labels(all_labels, bsz, views, dist_lib.world_size()))
        if self.use_alpa:
            maps = dist_lib.gather_with_grad(fmap.float())      # [world·2B, C, h, w]
            n_views = maps.shape[0] // (bsz * dist_lib.world_size())
            view_labels = _repeat_labels(all_labels, bsz, n_views, dist_lib.world_size())
            sim = self.attention(maps, maps)                     # [2B', 2B']
            terms['alpa'] = self.alpa(sim, view_labels)
        weight = {'supcon': 1.0, 'ce': 1.0, 'alpa': self.args.lam if self.use_base else 1.0}
        terms['loss'] = sum(weight[k] * v for k, v in terms.items())
        return terms

    def train_one_epoch(self, loader, epoch, global_step):
        """One pass over ``loader``. Numbers leave the device only every ``--print-freq`` steps
        and at the end (each read is a host sync): the running sums, and the index of the
        first step whose loss was not finite, stay on the device until then."""
        args = self.args
        self.model.train()
        if self.attention is not None:
            self.attention.train()
        totals, n_seen, t0 = {}, 0, time.perf_counter()
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        n_batches = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
        bar = progress(loader, desc=f'epoch {epoch}/{args.epochs}', total=n_batches) if dist_lib.is_main() else loader
        for idx, batch in enumerate(bar):
            if idx >= n_batches:
                break
            if batch is None:   # every image of the batch was unreadable (each named in a warning)
                continue
            images, labels = batch
            if dist_lib.world_size() > 1 and labels.shape[0] != args.batch_size // dist_lib.world_size():
                # The all-gather needs equal shards; a batch that lost unreadable images has fewer.
                raise UserError(f"a training batch lost {args.batch_size // dist_lib.world_size() - labels.shape[0]} "
                                f"unreadable image(s) (named in the warnings above): DDP needs equal batches on every "
                                f"rank, so remove those files or train on one process")
            images = self.to_device(images)
            labels = labels.to(self.device, non_blocking=True)
            warmup_learning_rate(args, epoch, idx, n_batches, self.optimizer)
            terms = self.losses(images, labels)
            loss = terms['loss']
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), idx, first_bad)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            bs = labels.shape[0] * dist_lib.world_size()
            n_seen += bs
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * bs
            global_step += 1
            last = idx + 1 == n_batches
            if (idx + 1) % args.print_freq == 0 or last:
                if int(first_bad) >= 0:
                    raise NonFiniteLoss(epoch, int(first_bad), {k: float(v.detach()) for k, v in terms.items()})
                if self.writer is not None:
                    for k, v in terms.items():
                        self.writer.add_scalar(f"train/{k}", float(v.detach()), global_step)
                    self.writer.add_scalar('train/lr', self.optimizer.param_groups[0]['lr'], global_step)
                    self.writer.add_scalar('train/images_per_s', n_seen / (time.perf_counter() - t0), global_step)
                if hasattr(bar, 'set_postfix'):
                    bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in terms.items()}, refresh=False)
        elapsed = time.perf_counter() - t0
        stats = {k: float(v) / max(n_seen, 1) for k, v in totals.items()}
        stats['images_per_s'] = n_seen / max(elapsed, 1e-9)
        stats['lr'] = self.optimizer.param_groups[0]['lr']
        return stats, global_step

    def to_device(self, images):
        """A batch (or SupCon's list of views) -> one tensor on the device. Each view is copied
        on its own (asynchronously from pinned memory) and the views are joined there, not on
        the CPU, where ``torch.cat`` would make an unpinned copy first."""
        if isinstance(images, (list, tuple)):
            images = torch.cat([v.to(self.device, non_blocking=True) for v in images], 0)
        else:
            images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=self.memory_format)


def _views_to_sup(out, bsz, world):
    """Gathered [world·2B, D] (each rank: view1 block then view2 block) -> [world·B, 2, D]."""
    d = out.shape[-1]
    return out.reshape(world, 2, bsz, d).permute(0, 2, 1, 3).reshape(world * bsz, 2, d)


def _repeat_labels(all_labels, bsz, views, world):
    """Labels [world·B] -> per gathered row [world·views·B] in the same rank/view-major order."""
    return all_labels.reshape(world, 1, bsz).expand(world, views, bsz).reshape(-1)


class NonFiniteLoss(Exception):
    def __init__(self, epoch, step, terms):
        super().__init__(f"loss became non-finite at epoch {epoch}, step {step} ({terms})")
        self.epoch, self.step, self.terms = epoch, step, terms


class TrainForward(nn.Module):
    """One module whose forward returns (last-stage map, head output), so DDP sees every
    parameter used in the step."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        fmap = self.net.forward_features(x)
        return fmap, self.net.forward_head(fmap)
