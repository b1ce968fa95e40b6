"""Fine-tune an akamaster CIFAR-10 ResNet with AugMix and the Jensen-Shannon consistency loss (Hendrycks et al. 2020).

Usage: python benchmarks/train_augmix.py --out runs/augmix20 [--depth 20] [--epochs 6] [--lr 0.03] [--seed 0]

Reads the 50,000 training images from ../shared/data/cifar10/train50k_jpeg75.npz (JPEG q75 bytes, decoded once into
OUT/train_x.npy) and the starting weights from the built-in cifar10_resnet<depth>. Per step: a random crop (padding
4) and flip of each image, then two AugMix views of it (torchvision's AugMix with the paper's CIFAR settings:
severity 3, width 3, random depth 1-3, alpha 1, without the four ops that overlap CIFAR-10-C: all_ops=False). The
three views go through the net in one batch (BN sees all three, as in the paper's code); the loss is cross-entropy on
the clean view plus 12 x the Jensen-Shannon divergence of the three predictions. SGD with Nesterov momentum 0.9,
weight decay 5e-4, cosine schedule from --lr to 0 over all steps.

Resumable per epoch: OUT/last.pt holds the model, optimiser, epoch and RNG state after each finished epoch; run the
same command again to continue. Seeded: the same command gives the same weights on the same machine and thread
count. OUT/log.jsonl gets one line per epoch (loss, clean top-1 on the 1000 lossless test images, seconds).
At the end, OUT/cifar10_resnet<depth>_augmix.safetensors holds the weights (akamaster key layout, float32).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import AugMix, InterpolationMode
from tqdm import tqdm

from bnadapt.models import load_model

SHARED = Path(os.environ.get("BNADAPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
JSD_WEIGHT = 12.0  # the paper's lambda


def decode_train(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The training images as uint8 (50000, 32, 32, 3) and their labels, decoded once and kept in ``out``."""
    from PIL import Image

    src = np.load(SHARED / "data" / "cifar10" / "train50k_jpeg75.npz")
    y = src["y"].astype(np.int64)
    cache = out / "train_x.npy"
    if not cache.is_file():
        jpeg, offsets = src["jpeg"], src["offsets"]
        x = np.stack([
            np.asarray(Image.open(io.BytesIO(jpeg[a:b].tobytes())).convert("RGB"))
            for a, b in zip(offsets[:-1], offsets[1:], strict=True)
        ])  # fmt: skip
        tmp = out / "train_x.tmp.npy"
        np.save(tmp, x)
        os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r"), y


class AugMixViews(Dataset):
    """Image i as three float [0, 1] CHW views: cropped and flipped, then that image twice through AugMix."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.augmix = AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1.0, all_ops=False,
                             interpolation=InterpolationMode.BILINEAR)  # fmt: skip

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.x[i])).permute(2, 0, 1)  # uint8 CHW
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        img = F.pad(img, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        views = torch.stack([img, self.augmix(img), self.augmix(img)]).float().div_(255)
        return views, int(self.y[i])


def jsd_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the clean third of ``logits`` plus the JSD consistency of its three thirds."""
    clean, a1, a2 = logits.chunk(3)
    probs = [F.softmax(t, dim=1) for t in (clean, a1, a2)]
    log_mix = torch.clamp(sum(probs) / 3, 1e-7, 1).log()
    jsd = sum(F.kl_div(log_mix, p, reduction="batchmean") for p in probs) / 3
    return F.cross_entropy(clean, y) + JSD_WEIGHT * jsd


@torch.no_grad()
def clean_top1(model: torch.nn.Module) -> float:
    """Top-1 (%) on the 1000 lossless CIFAR-10 test images, BN in eval mode."""
    test = np.load(SHARED / "data" / "cifar10" / "test1000_lossless.npz")
    x = torch.from_numpy(test["x"]).permute(0, 3, 1, 2).float().div_(255)
    model.eval()
    pred = torch.cat([model(b).argmax(1) for b in x.split(250)])
    model.train()
    return 100.0 * float((pred == torch.from_numpy(test["y"])).float().mean())


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    x, y = decode_train(out)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    model = load_model(f"cifar10_resnet{args.depth}")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    first = 0
    state_path = out / "last.pt"
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["args"] != _run_args(args):
            raise SystemExit(f"error: {state_path} was written with {state['args']}; use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        first = state["epoch"]
        print(f"resuming after epoch {first} of {args.epochs}")
    else:
        torch.manual_seed(args.seed)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"epoch": 0, "clean_top1": clean_top1(model), "args": _run_args(args)}) + "\n")
    data = AugMixViews(x, y)
    for epoch in range(first, args.epochs):
        t0 = time.time()
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=gen, num_workers=args.workers)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", dynamic_ncols=True)
        for views, labels in bar:
            loss = jsd_loss(model(views.transpose(0, 1).reshape(-1, 3, 32, 32)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        top1 = clean_top1(model)
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "rng": torch.get_rng_state(), "epoch": epoch + 1, "args": _run_args(args)}  # fmt: skip
        _save_atomic(state, state_path)
        line = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "clean_top1": top1, "seconds": time.time() - t0}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        print(json.dumps(line))
    final = out / f"cifar10_resnet{args.depth}_augmix.safetensors"
    weights = {k: v.detach().float().contiguous() for k, v in model.net.state_dict().items()}
    save_file(weights, final, metadata={"recipe": json.dumps(_run_args(args))})
    print(f"wrote {final}")
    return final


def _run_args(args: argparse.Namespace) -> dict:
    """The settings that decide the weights (a resumed run must use the same)."""
    keys = ("depth", "epochs", "lr", "batch_size", "seed", "limit", "workers")
    return {k: getattr(args, k) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--depth", type=int, default=20, choices=[20, 32, 44, 56])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes making the AugMix views")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke tests)")
    train(ap.parse_args())


if __name__ == "__main__":
    main()
