"""Train the CIFAR-10 classifier behind ``fid_c10`` (the offline FID) and ship its weights.

    python -m akod_ray.evaluation.train_classifier --data-dir ../shared/data/cifar10 \
        --out akod_ray/evaluation/weights/c10_classifier.pt

Recipe (Page's ResNet-9 for DAWNBench, at half width): SGD with Nesterov momentum 0.9,
weight decay 5e-4, a linear one-cycle learning rate (up to ``lr`` over the first quarter,
then down to ~0), label smoothing 0.2, batch 512; augmentation by random 32x32 crops of the
4-pixel reflect-padded image and horizontal flips. bf16 autocast and channels_last make one
CPU thread (with AMX) about 4x faster than float32. Everything is seeded; the weights are
stored as an fp16 state dict with a JSON record beside them (test accuracy on
test.parquet, epochs, seed, command, training time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from akod_ray.data.parquet import load_images, to_model_range
from akod_ray.evaluation.feature_net import C10FeatureNet


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the reflect-padded image (same size) and random horizontal flip, per image."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def evaluate(net: C10FeatureNet, images_u8: torch.Tensor, labels: torch.Tensor, batch: int = 1000,
             bf16: bool = True, flip_tta: bool = False) -> float:
    """Top-1 accuracy on uint8 images; with ``flip_tta`` the logits of the flipped image are added."""
    net.eval()
    correct = 0
    for i in range(0, len(images_u8), batch):
        x = to_model_range(images_u8[i:i + batch]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x).float()
            if flip_tta:
                logits = logits + net(x.flip(3)).float()
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images_u8)


def one_cycle_lr(step: int, total: int, peak: float, warm_frac: float = 0.25) -> float:
    """Linear up from 0 to ``peak`` over ``warm_frac`` of the steps, then linear down to 0."""
    warm = max(1, int(warm_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / (total - warm))


def train_classifier(data_dir: str | Path, out: str | Path, epochs: int = 16, width: int = 32,
                     batch_size: int = 512, lr: float = 0.4, weight_decay: float = 5e-4,
                     label_smoothing: float = 0.2, seed: int = 0, bf16: bool = True,
                     train_count: int | None = None, command: str = "") -> dict:
    """Train, evaluate on test.parquet, write ``out`` (fp16 state dict) and ``out.json``; return the record."""
    t_start = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_images(data_dir, "train", count=train_count, seed=seed, return_labels=True)
    x_test, y_test = load_images(data_dir, "test", return_labels=True)
    print(f"data: train {tuple(x_train.shape)}, test {tuple(x_test.shape)} ({time.time() - t_start:.0f}s)", flush=True)

    net = C10FeatureNet(width).to(memory_format=torch.channels_last)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    n = len(x_train)
    steps_per_epoch = n // batch_size  # drop the last partial batch: BatchNorm dislikes tiny batches
    total = epochs * steps_per_epoch
    step = 0
    history = []
    t_train, cpu_train = time.time(), time.process_time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g)
        loss_sum, correct, seen, t_epoch = 0.0, 0, 0, time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = augment(to_model_range(x_train[idx]), g).contiguous(memory_format=torch.channels_last)
            y = y_train[idx]
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(step, total, lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"classifier training diverged at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        acc = evaluate(net, x_test, y_test, bf16=bf16)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_acc": acc, "epoch_s": time.time() - t_epoch})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()}), flush=True)
    train_time, train_cpu = time.time() - t_train, time.process_time() - cpu_train

    test_acc = evaluate(net, x_test, y_test, bf16=False)
    test_acc_tta = evaluate(net, x_test, y_test, bf16=True, flip_tta=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = net.to(memory_format=torch.contiguous_format)
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"width": width, "state_dict": state}, tmp)
    tmp.replace(out)
    record = {
        "test_accuracy": test_acc,  # float32 inference, as fid_c10 uses the net
        "test_accuracy_flip_tta_bf16": test_acc_tta,
        "test_images": len(x_test),
        "train_images": n,
        "epochs": epochs,
        "width": width,
        "feature_dim": net.feature_dim,
        "parameters": sum(p.numel() for p in net.parameters()),
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "bf16": bf16,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 1),  # wall-clock: longer than CPU time on a shared machine
        "train_cpu_s": round(train_cpu, 1),
        "total_time_s": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "data": str(data_dir),
        "command": command,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "history": history,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with train.parquet and test.parquet")
    p.add_argument("--out", required=True, help="weights file to write (a .json record goes beside it)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--width", type=int, default=32, help="base width; features are 8*width-d")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.4, help="peak one-cycle learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--train-count", type=int, default=None, help="seeded subset of the training set (timing runs)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m akod_ray.evaluation.train_classifier " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    record = train_classifier(args.data_dir, args.out, epochs=args.epochs, width=args.width, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed, bf16=not args.no_bf16, train_count=args.train_count,
                              command=command)
    print(f"test accuracy {record['test_accuracy']:.4f} (flip TTA {record['test_accuracy_flip_tta_bf16']:.4f}), "
          f"{record['epochs']} epochs, {record['train_time_s']:.0f}s training", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
