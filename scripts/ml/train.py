"""Train a DR grading network and write a self-describing checkpoint (docs/contracts.md section 2).

    python -m scripts.ml.train --data DIR [--csv FILE] --arch efficientnet_b0 --epochs 30 \\
        --input-size 224 --out var/models/dr.pt [--resume var/models/dr.pt] [--pretrained FILE]

The images are split by grade into train/val/test with a seed; the split is stored in the checkpoint
so that `scripts.ml.evaluate` reports on images the model never saw. The checkpoint keeps the weights of
the epoch with the best validation quadratic weighted kappa; the optimizer, scheduler and latest
weights go beside it (`<out>.train-state.pt`) so that `--resume` continues where a run stopped.
docs/training.md describes the choices.
"""
from __future__ import annotations

import os

# Must be set before torch loads OpenMP: with busy-waiting threads, a machine shared with other
# processes ran a training step several times slower on 2 threads than on 1 (docs/training.md);
# passive waiting removes that.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime as dt  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import cohen_kappa_score  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from handlers import fundus, quality  # noqa: E402
from handlers.network import ARCHS, DRNet  # noqa: E402
from scripts.ml import datasets  # noqa: E402
from scripts.ml.archive import CHECKPOINT_FORMAT  # noqa: E402

GRADE_LABELS = ["No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR"]
REFERABLE_THRESHOLD = 2
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- checkpoint files

def train_state_path(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".train-state.pt")


# The code that decides what a checkpoint is: preprocessing, model, data, training loop.
TRAINING_CODE = ("handlers", "scripts/ml/synth.py", "scripts/ml/synth_anatomy.py", "scripts/ml/synth_lesions.py",
                 "scripts/ml/datasets.py", "scripts/ml/train.py",
                 "scripts/ml/evaluate.py", "scripts/ml/demo_model.py")


def code_revision() -> tuple[str, bool]:
    """(git sha or "unknown", whether TRAINING_CODE differs from that commit)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *TRAINING_CODE], cwd=REPO,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def compact_state(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """Floating-point tensors as `dtype` (float16 halves the file); `load_state_dict` casts back."""
    return {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).clone()
            for k, v in state_dict.items()}


def load_checkpoint(path: Path) -> tuple[DRNet, dict]:
    """(model in eval mode with float32 weights, checkpoint dict)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format={ck.get('format')!r})")
    model = DRNet(ck["arch"], ck["num_classes"])
    # load_state_dict copies into the float32 parameters, which also undoes float16 storage
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck


# --------------------------------------------------------------------------- training pieces

def class_weights(grades, power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency weights to the given power (0.5 softens them), mean 1 over the samples."""
    counts = np.bincount(np.asarray(grades), minlength=len(GRADE_LABELS)).astype(np.float64)
    w = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1)) ** power, 0.0)
    w /= (w * counts).sum() / counts.sum()
    return torch.tensor(w, dtype=torch.float32)


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.02):
    """LR factor: linear warmup, then a cosine decay to `floor` of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


@torch.no_grad()
def predict(model: nn.Module, loader, progress: bool = False, desc: str = "predict"):
    """(grades int64 [n], probabilities float32 [n, 5], mean loss) over a loader."""
    model.eval()
    ys, ps, loss, n = [], [], 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        if len(y) == 0:
            continue
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        ys.append(y)
        ps.append(torch.softmax(logits, dim=1))
    if not n:
        return np.zeros(0, np.int64), np.zeros((0, len(GRADE_LABELS)), np.float32), float("nan")
    return torch.cat(ys).numpy(), torch.cat(ps).numpy(), loss / n


def qwk(y_true, y_pred) -> float:
    if len(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist())) < 2:
        return float(np.array_equal(y_true, y_pred))  # kappa is undefined; agreement is all we know
    return float(cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=list(range(len(GRADE_LABELS)))))


def _loader(ds, batch_size, shuffle=False, sampler=None, workers=0):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, collate_fn=datasets.collate,
                                       persistent_workers=workers > 0)


# --------------------------------------------------------------------------- the run

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset folder (APTOS, EyePACS or IDRiD layout)")
    ap.add_argument("--csv", type=Path, help="label CSV (default: train.csv / trainLabels.csv in --data)")
    ap.add_argument("--arch", default="efficientnet_b0", choices=ARCHS)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    ap.add_argument("--resume", type=Path, help="checkpoint of an interrupted run (its train state is beside it)")
    ap.add_argument("--pretrained", type=Path, help="local backbone weights (e.g. torchvision ImageNet file)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--label-smoothing", type=float, default=0.05)
    ap.add_argument("--bn-momentum", type=float, default=0.1,
                    help="batch-norm running-statistics momentum (0: keep the architecture's)")
    ap.add_argument("--balance", choices=("loss", "sampler", "none"), default="loss",
                    help="class imbalance: weighted loss, weighted sampler, or nothing")
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.15,
                    help="held out for scripts.ml.evaluate; 0 when a separate test folder exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--workers", type=int, default=2, help="processes for preprocessing / data loading")
    ap.add_argument("--no-cache", action="store_true", help="read images on every epoch instead of once")
    ap.add_argument("--no-ben-graham", action="store_true", help="skip local-average-colour subtraction")
    ap.add_argument("--half-weights", action="store_true", help="store weights as float16 (half the file)")
    ap.add_argument("--name", help="dataset name recorded in the checkpoint (default: folder name)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def train(args) -> dict:
    """Run training as configured by `build_parser()`; returns the final checkpoint dict."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    revision = code_revision()  # once: the code this process runs, whatever changes on disk later
    data = _data(args)
    state = _resume_state(args, data["described"]) if args.resume else None
    weights = class_weights(data["train"].grades) if args.balance == "loss" else None
    train_dl, val_dl = _loaders(args, data["train"], data["val"])
    model = _model(args)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(train_dl)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(args.epochs * steps, max(1, int(args.warmup_epochs * steps))))

    history, best, best_state, start_epoch, train_s = [], None, None, 1, 0.0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, best, best_state = state["history"], state["best"], state["best_state"]
        start_epoch, train_s = state["epoch"] + 1, state.get("train_seconds", 0.0)
        print(f"resuming after epoch {state['epoch']} (best val QWK {best['val_qwk']:.4f})")

    ck = None
    for epoch in range(start_epoch, args.epochs + 1):
        te = time.perf_counter()
        train_loss, train_accuracy = _one_epoch(model, train_dl, criterion, opt, sched,
                                                f"epoch {epoch}/{args.epochs}", not args.quiet)
        y_val, p_val, val_loss = predict(model, val_dl)
        pred = p_val.argmax(1)
        row = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_accuracy": round(train_accuracy, 5),
               "val_loss": round(val_loss, 5), "val_qwk": round(qwk(y_val, pred), 5),
               "val_accuracy": round(float((pred == y_val).mean()), 5),
               "val_predicted_grades": sorted({int(g) for g in pred}),
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - te, 2)}
        history.append(row)
        train_s += row["seconds"]
        if best is None or row["val_qwk"] > best["val_qwk"] or \
                (row["val_qwk"] == best["val_qwk"] and row["val_loss"] < best["val_loss"]):
            best, best_state = dict(row), copy.deepcopy(model.state_dict())
        _print_epoch(row, best)
        if len(row["val_predicted_grades"]) == 1 and len(set(y_val.tolist())) > 1:
            print(collapse_warning(row["val_predicted_grades"][0], f"epoch {epoch}"), flush=True)
        ck = checkpoint_dict(args, data["described"], data["cfg"], data["thresholds"], best_state, best, history,
                             revision, _run_info(data, train_s, weights))
        save_atomic(ck, args.out)
        save_atomic({"run": {"arch": args.arch, "input_size": args.input_size, "seed": args.seed,
                             "fingerprint": data["described"]["fingerprint"]},
                     "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                     "history": history, "best": best, "best_state": best_state, "train_seconds": train_s},
                    train_state_path(args.out))
    if ck is None:
        raise SystemExit(f"nothing to do: the run already finished {args.epochs} epochs")
    print(f"best epoch {best['epoch']}: val QWK {best['val_qwk']:.4f}; wrote {args.out}")
    if len(best.get("val_predicted_grades", [0, 1])) == 1:
        print(collapse_warning(best["val_predicted_grades"][0], f"the kept (best) epoch {best['epoch']}"),
              file=sys.stderr, flush=True)
    return ck


def _data(args) -> dict:
    """The split, its description, the preprocessing and the train/val datasets (preprocessed)."""
    data = datasets.load(args.data, args.csv)
    if args.name:
        data.name = args.name
    fractions = {k: f for k, f in (("val", args.val_fraction), ("test", args.test_fraction)) if f > 0}
    if "val" not in fractions:
        raise SystemExit("--val-fraction must be > 0: the best epoch is chosen on validation kappa")
    split = datasets.stratified_split(data.samples, fractions, args.seed)
    cfg = fundus.PreprocessConfig(input_size=args.input_size, ben_graham=not args.no_ben_graham)
    thresholds = quality.QualityThresholds()
    described = data.describe()
    described["split"] = {"seed": args.seed, "fractions": fractions,
                          **{part: sorted(s.name for s in samples) for part, samples in split.items()}}
    t0 = time.perf_counter()
    sets = {part: datasets.FundusDataset(split[part], cfg, thresholds, augment, preload=not args.no_cache,
                                         workers=args.workers, progress=not args.quiet)
            for part, augment in (("train", datasets.Augment()), ("val", None))}
    rejected = [(s.name, r["reasons"]) for ds in sets.values() for s, r in ds.rejected]
    if rejected:
        print(f"left out {len(rejected)} ungradable images (first: {rejected[0]})")
    if not len(sets["train"]) or not len(sets["val"]):
        raise SystemExit("no gradable images to train or validate on")
    return {**sets, "described": described, "cfg": cfg, "thresholds": thresholds, "rejected": rejected,
            "preprocess_s": time.perf_counter() - t0}


def _resume_state(args, described: dict) -> dict:
    state = torch.load(train_state_path(args.resume), map_location="cpu", weights_only=True)
    for key, now in (("arch", args.arch), ("input_size", args.input_size),
                     ("fingerprint", described["fingerprint"]), ("seed", args.seed)):
        if state["run"][key] != now:
            raise SystemExit(f"--resume: {key} was {state['run'][key]!r}, now {now!r}")
    return state


def _loaders(args, train_ds, val_ds):
    loader_workers = 0 if not args.no_cache else args.workers
    sampler = None
    if args.balance == "sampler":
        w = class_weights(train_ds.grades, power=1.0)[train_ds.grades]
        sampler = torch.utils.data.WeightedRandomSampler(w.double(), len(train_ds), replacement=True)
    return (_loader(train_ds, args.batch_size, shuffle=True, sampler=sampler, workers=loader_workers),
            _loader(val_ds, 2 * args.batch_size, workers=loader_workers))


def _model(args) -> DRNet:
    model = DRNet(args.arch, len(GRADE_LABELS), str(args.pretrained) if args.pretrained else None)
    if args.bn_momentum:
        # torchvision's MobileNetV3 keeps BN statistics with momentum 0.01, made for long ImageNet
        # runs; in a short run from scratch they lag the weights and eval-mode output collapses.
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.momentum = args.bn_momentum
    return model


def _one_epoch(model, loader, criterion, opt, sched, desc: str, progress: bool) -> tuple[float, float]:
    """One pass over the training data; (mean loss, accuracy)."""
    model.train()
    total, n, correct = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for x, y in bar:
        if len(y) < 2:  # batch norm cannot train on one image
            continue
        logits = model(x)
        loss = criterion(logits, y)
        correct += int((logits.argmax(1) == y).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1), correct / max(n, 1)


def _print_epoch(row: dict, best: dict) -> None:
    print(f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f}  "
          f"val loss {row['val_loss']:.4f}  "
          f"val QWK {row['val_qwk']:.4f}  val acc {row['val_accuracy']:.3f}  {row['seconds']:.0f}s"
          + ("  *" if best["epoch"] == row["epoch"] else ""), flush=True)


def _run_info(data: dict, train_s: float, weights) -> dict:
    return {"train_seconds": round(train_s, 1), "preprocess_seconds": round(data["preprocess_s"], 1),
            "train_images": len(data["train"]), "val_images": len(data["val"]),
            "ungradable_left_out": len(data["rejected"]),
            "class_weights": None if weights is None else [round(float(w), 4) for w in weights]}


def collapse_warning(grade: int, when: str) -> str:
    """Loud: a model that answers one grade for everything must not slip through unnoticed."""
    line = "!" * 78
    return (f"{line}\nWARNING: at {when} the model predicted grade {grade} ({GRADE_LABELS[grade]}) for EVERY "
            f"validation image.\nIts validation QWK says nothing; it has learned the class prior, not the "
            f"images. Train longer,\ncheck the labels and class balance, or lower the learning rate. "
            f"`promote` will refuse it.\n{line}")


def checkpoint_dict(args, described, cfg, thresholds, best_state, best, history, revision, run_info) -> dict:
    sha, dirty = revision
    dtype = torch.float16 if args.half_weights else None
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": args.arch,
        "num_classes": len(GRADE_LABELS),
        "state_dict": compact_state(best_state, dtype),
        "weights_dtype": "float16" if dtype is not None else "float32",
        "preprocess": cfg.to_dict(),
        "quality": thresholds.to_dict(),
        "grade_labels": list(GRADE_LABELS),
        "referable_threshold": REFERABLE_THRESHOLD,
        "dataset": described,
        "metrics": {"validation": {k: best[k] for k in ("epoch", "val_qwk", "val_accuracy", "val_loss")}},
        "history": history,
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                     "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
                     "label_smoothing": args.label_smoothing, "bn_momentum": args.bn_momentum,
                     "balance": args.balance, "seed": args.seed,
                     "threads": args.threads, "pretrained": args.pretrained.name if args.pretrained else None,
                     "best_epoch": best["epoch"], **run_info},
        "code_revision": sha,
        "code_dirty": dirty,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file and rename, so an interrupted save never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def main(argv=None):
    train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
