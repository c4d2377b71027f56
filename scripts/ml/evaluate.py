"""Evaluate a checkpoint on held-out images: grading and referable-DR metrics with 95% bootstrap CIs.

    python -m scripts.ml.evaluate --checkpoint CK --data DIR [--csv FILE] --out DIR [--target-sensitivity 0.9]

Evaluates only images the model did not train on: the checkpoint's own test split when DIR is its
training folder, otherwise every image of DIR (refused if any of them was in the training split).
Writes evaluation.json, predictions.csv, confusion_matrix.png, roc_referable.png and training_curves.png.
The referable operating point (a threshold on P(grade >= 2)) is chosen on the checkpoint's
validation split when it is available, so the test numbers at that threshold stay unbiased.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from handlers import fundus, quality
from scripts.ml import datasets
from handlers.checksum import sha256_file
from scripts.ml.train import GRADE_LABELS, load_checkpoint, predict, qwk, save_atomic

CI_LEVEL = 0.95


# --------------------------------------------------------------------------- metrics

def referable_scores(probs: np.ndarray, threshold: int) -> np.ndarray:
    """P(grade >= threshold): the model's probability that the eye should be referred."""
    return probs[:, threshold:].sum(axis=1)


def sens_spec(positive: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    positive, predicted = np.asarray(positive, bool), np.asarray(predicted, bool)
    sens = (predicted & positive).sum() / positive.sum() if positive.any() else float("nan")
    spec = (~predicted & ~positive).sum() / (~positive).sum() if (~positive).any() else float("nan")
    return float(sens), float(spec)


def point_metrics(y: np.ndarray, probs: np.ndarray, referable_threshold: int = 2,
                  score_threshold: float | None = None) -> dict:
    """Metrics of one set of predictions. Referable by the predicted grade (argmax), and also by
    P(referable) >= score_threshold when one is given."""
    pred = probs.argmax(axis=1)
    positive = y >= referable_threshold
    score = referable_scores(probs, referable_threshold)
    sens, spec = sens_spec(positive, pred >= referable_threshold)
    m = {"quadratic_kappa": qwk(y, pred), "accuracy": float((pred == y).mean()),
         "referable_sensitivity": sens, "referable_specificity": spec,
         "referable_auc": float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(y) else float("nan")}
    for g in range(len(GRADE_LABELS)):
        sel = y == g
        m[f"recall_grade_{g}"] = float((pred[sel] == g).mean()) if sel.any() else float("nan")
    if score_threshold is not None:
        s, p = sens_spec(positive, score >= score_threshold)
        m["operating_point_sensitivity"], m["operating_point_specificity"] = s, p
    return m


def bootstrap(y: np.ndarray, probs: np.ndarray, n: int = 1000, seed: int = 0, **kwargs) -> dict:
    """Percentile 95% CIs of every point metric over `n` resamples of the images (seeded).
    Resamples where a metric is undefined (e.g. no positive eye) are left out of that metric."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        for k, v in point_metrics(y[idx], probs[idx], **kwargs).items():
            draws.setdefault(k, []).append(v)
    lo, hi = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    out = {}
    for k, vals in draws.items():
        v = np.asarray(vals)
        v = v[~np.isnan(v)]
        out[k] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else [None, None]
    return out


def operating_point(positive: np.ndarray, score: np.ndarray, target_sensitivity: float) -> dict:
    """The highest threshold on the score whose sensitivity reaches the target (so the best
    specificity that still meets it)."""
    positive = np.asarray(positive, bool)
    if not positive.any() or positive.all():
        raise ValueError("an operating point needs both referable and non-referable eyes")
    fpr, tpr, thr = roc_curve(positive, score, drop_intermediate=False)
    ok = np.nonzero(tpr >= target_sensitivity)[0]
    i = ok[0]
    threshold = float(min(thr[i], 1.0))  # roc_curve's first threshold is +inf
    sens, spec = sens_spec(positive, score >= threshold)
    return {"target_sensitivity": target_sensitivity, "threshold": threshold,
            "sensitivity": sens, "specificity": spec}


def with_ci(point: dict, ci: dict) -> dict:
    return {k: {"value": _clean(v), "ci95": ci.get(k, [None, None])} for k, v in point.items()}


def _clean(v):
    return None if isinstance(v, float) and np.isnan(v) else v


# --------------------------------------------------------------------------- plots

def plot_confusion(cm: np.ndarray, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{rows[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if rows[i, j] > 0.6 else "black")
    short = [f"{g} {lab.split()[0]}" for g, lab in enumerate(GRADE_LABELS)]
    ax.set_xticks(range(len(short)), short, rotation=30, ha="right")
    ax.set_yticks(range(len(short)), short)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("true grade")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true grade")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_roc(positive, score, op: dict | None, auc: dict, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(positive, score)
    fig, ax = plt.subplots(figsize=(5.4, 5.0), dpi=110)
    ci = auc["ci95"]
    ci_txt = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else ""
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc['value']:.3f}{ci_txt}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if op:
        ax.plot(1 - op["specificity"], op["sensitivity"], "o", color="crimson",
                label=f"P(referable) >= {op['threshold']:.3f}: sens {op['sensitivity']:.3f}, "
                      f"spec {op['specificity']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_history(history: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [int(h["epoch"]) for h in history]
    best = max(history, key=lambda h: (h["val_qwk"], -h["val_loss"]))  # the epoch train.py keeps
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    a1.plot(ep, [h["train_loss"] for h in history], marker=".", label="train loss")
    a1.plot(ep, [h["val_loss"] for h in history], marker=".", label="validation loss")
    a2.plot(ep, [h["val_qwk"] for h in history], marker=".", label="validation QWK")
    a2.plot(ep, [h["val_accuracy"] for h in history], marker=".", label="validation accuracy")
    a2.plot([best["epoch"]], [best["val_qwk"]], "*", color="crimson", markersize=12,
            label=f"best epoch {best['epoch']} (kept)")
    for ax in (a1, a2):
        ax.axvline(best["epoch"], color="crimson", lw=0.8, ls="--")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.legend()
    a2.set_ylim(0, 1.02)
    a2.legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the run

def held_out(ck: dict, data: datasets.LabelledSet, fingerprint: str) -> tuple[str, list, list]:
    """(which images, samples to evaluate, validation samples for the operating point or []);
    `fingerprint` is datasets.fingerprint(data.samples)."""
    split = (ck.get("dataset") or {}).get("split") or {}
    if fingerprint == ck["dataset"].get("fingerprint"):
        if not split.get("test"):
            raise SystemExit("this is the training folder and the checkpoint holds no test split; "
                             "evaluate on a separate test folder")
        return "checkpoint test split", datasets.select(data.samples, split["test"]), \
            datasets.select(data.samples, split.get("val", []))
    if not split:
        raise SystemExit("the checkpoint does not record its training split, so held-out images "
                         "cannot be told from training images")
    seen = set(split.get("train", [])) | set(split.get("val", []))
    overlap = sorted(seen & {s.name for s in data.samples})
    if overlap:
        raise SystemExit(f"{len(overlap)} images of {data.name} were used in training or validation "
                         f"(first: {overlap[:3]}); evaluate on held-out images only")
    return "separate test folder", data.samples, []


def evaluate(checkpoint: Path, data_dir: Path, out: Path, csv_path: Path | None = None,
             target_sensitivity: float = 0.9, n_boot: int = 1000, seed: int = 0, threads: int = 2,
             workers: int = 2, progress: bool = True, val_data: tuple | None = None) -> dict:
    """Run the evaluation and write its files; returns the evaluation dict.

    `val_data` = (data_dir, csv) of the training folder, to choose the operating point on the
    checkpoint's validation split when evaluating on a separate test folder.
    """
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, ck = load_checkpoint(checkpoint)
    cfg = fundus.PreprocessConfig.from_dict(ck["preprocess"])
    thresholds = quality.QualityThresholds.from_dict(ck["quality"])
    ref = int(ck["referable_threshold"])
    data = datasets.load(data_dir, csv_path)
    fingerprint = datasets.fingerprint(data.samples)  # stats every image: once
    source, test_samples, val_samples = held_out(ck, data, fingerprint)
    if not val_samples and val_data is not None:
        train_set = datasets.load(*val_data)
        if datasets.fingerprint(train_set.samples) != ck["dataset"].get("fingerprint"):
            raise SystemExit(f"{val_data[0]} is not the folder this checkpoint was trained on")
        val_samples = datasets.select(train_set.samples, ck["dataset"]["split"]["val"])

    def run(samples, desc):
        ds = datasets.FundusDataset(samples, cfg, thresholds, None, preload=True, workers=workers,
                                    progress=progress)
        dl = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=datasets.collate)
        y, p, _ = predict(model, dl, progress, desc)
        return y, p, ds.rejected, [s.name for s in ds.samples]

    y, probs, rejected, names = run(test_samples, "evaluate")
    positive = y >= ref
    score = referable_scores(probs, ref)
    if val_samples:
        yv, pv, _, _ = run(val_samples, "validation")
        op = operating_point(yv >= ref, referable_scores(pv, ref), target_sensitivity)
        op["chosen_on"] = f"checkpoint validation split ({len(yv)} images)"
    else:
        op = operating_point(positive, score, target_sensitivity)
        op["chosen_on"] = "the evaluated images themselves (optimistic: no validation split available)"

    kwargs = {"referable_threshold": ref, "score_threshold": op["threshold"]}
    metrics = with_ci(point_metrics(y, probs, **kwargs), bootstrap(y, probs, n_boot, seed, **kwargs))
    op["test_sensitivity"] = metrics.pop("operating_point_sensitivity")
    op["test_specificity"] = metrics.pop("operating_point_specificity")
    cm = confusion_matrix(y, probs.argmax(1), labels=list(range(len(GRADE_LABELS))))
    synthetic = bool(ck["dataset"].get("synthetic")) or data.synthetic
    result = {
        "checkpoint": {"file": Path(checkpoint).name, "sha256": sha256_file(checkpoint), "arch": ck["arch"],
                       "input_size": cfg.input_size, "code_revision": ck.get("code_revision"),
                       "trained_on": {k: ck["dataset"].get(k) for k in ("name", "fingerprint", "synthetic")}},
        "data": {"name": data.name, "format": data.format, "fingerprint": fingerprint,
                 "synthetic": data.synthetic, "images": source, "n": int(len(y)),
                 "counts": np.bincount(y, minlength=len(GRADE_LABELS)).tolist(),
                 "ungradable_left_out": [{"name": s.name, "reasons": r.get("reasons", [])} for s, r in rejected]},
        "referable_threshold": ref,
        "metrics": metrics,
        "operating_point": op,
        "confusion_matrix": {"labels": GRADE_LABELS, "rows_true_cols_predicted": cm.tolist()},
        "predicted_counts": cm.sum(axis=0).tolist(),
        "referable_definitions": referable_definitions(ref, op),
        "bootstrap": {"resamples": n_boot, "seed": seed, "level": CI_LEVEL, "method": "percentile"},
        "note": ("Synthetic images: these numbers describe the synthetic task only and say nothing about "
                 "clinical accuracy." if synthetic else "Held-out evaluation; not a clinical validation."),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    write_predictions(out / "predictions.csv", names, y, probs, ref)
    tag = f"{ck['arch']} @ {cfg.input_size}px on {data.name} ({len(y)} held-out" + \
        (" synthetic" if synthetic else "") + " images)"
    plot_confusion(cm, out / "confusion_matrix.png", tag)
    if 0 < positive.sum() < len(y):
        plot_roc(positive, score, {"threshold": op["threshold"], "sensitivity": op["test_sensitivity"]["value"],
                                   "specificity": op["test_specificity"]["value"]},
                 metrics["referable_auc"], out / "roc_referable.png", f"Referable DR (grade >= {ref})\n{tag}")
    if ck.get("history"):
        plot_history(ck["history"], out / "training_curves.png", f"Training of {ck['arch']} on {ck['dataset']['name']}")
    return result


REFERABLE_BY_GRADE = "referable = predicted grade >= {ref} (what serving answers)"
REFERABLE_BY_PROBABILITY = ("referable = P(grade >= {ref}) >= {threshold:.4f}, an operating point for "
                            "{target:.0%} sensitivity chosen on {chosen_on} (NOT used in serving)")


def referable_definitions(ref: int, op: dict) -> dict:
    """The two referable definitions, named: by predicted grade (served) and by a probability threshold."""
    return {"referable_sensitivity/specificity": REFERABLE_BY_GRADE.format(ref=ref),
            "operating_point": REFERABLE_BY_PROBABILITY.format(ref=ref, threshold=op["threshold"],
                                                               target=op["target_sensitivity"],
                                                               chosen_on=op["chosen_on"])}


def text_summary(result: dict) -> str:
    """What evaluate prints: the two referable definitions named, never two bare pairs."""
    m, op, ref = result["metrics"], result["operating_point"], result["referable_threshold"]
    definitions = referable_definitions(ref, op)

    def line(label, metric):
        v, ci = metric["value"], metric["ci95"]
        return f"  {label:34s} {v:.4f}  (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if v is not None else f"  {label:34s} n/a"

    d = result["data"]
    out = [f"held-out: {d['n']} images of {d['name']} ({d['images']})"
           + (" - synthetic" if d.get("synthetic") else ""),
           line("quadratic weighted kappa", m["quadratic_kappa"]), line("accuracy", m["accuracy"]),
           definitions["referable_sensitivity/specificity"] + ":",
           line("sensitivity", m["referable_sensitivity"]), line("specificity", m["referable_specificity"]),
           f"P(grade >= {ref}) as a score:", line("AUC", m["referable_auc"]),
           definitions["operating_point"] + ":",
           line("sensitivity", op["test_sensitivity"]), line("specificity", op["test_specificity"])]
    collapsed = len([c for c in result["predicted_counts"] if c]) == 1 if "predicted_counts" in result else False
    if collapsed:
        out.append("WARNING: the model predicted ONE grade for every held-out image; its kappa is meaningless")
    return "\n".join(out)


def write_predictions(path: Path, names, y, probs, ref: int) -> None:
    """One row per image, for error analysis."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "grade", "predicted", "p_referable", *(f"p{g}" for g in range(probs.shape[1]))])
        for name, g, p in zip(names, y, probs):
            w.writerow([name, int(g), int(p.argmax()), f"{p[ref:].sum():.4f}", *(f"{v:.4f}" for v in p)])


def summary(result: dict) -> dict:
    """The checkpoint's `metrics.test` entry: values with their CIs and the operating point."""
    return {"images": result["data"]["n"], "data": result["data"]["name"],
            "counts": result["data"]["counts"], "predicted_counts": result.get("predicted_counts"),
            "ungradable": len(result["data"]["ungradable_left_out"]),
            "referable_definition": REFERABLE_BY_GRADE.format(ref=result["referable_threshold"]),
            **{k: result["metrics"][k] for k in ("quadratic_kappa", "accuracy", "referable_sensitivity",
                                                  "referable_specificity", "referable_auc")},
            "operating_point": {k: result["operating_point"][k] for k in ("target_sensitivity", "threshold")}}


def record_in_checkpoint(checkpoint: Path, result: dict) -> None:
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ck.setdefault("metrics", {})["test"] = summary(result)
    save_atomic(ck, checkpoint)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path,
                    help="the training folder (uses its test split) or a separate test folder")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--out", required=True, type=Path, help="folder for evaluation.json and the plots")
    ap.add_argument("--target-sensitivity", type=float, default=0.9)
    ap.add_argument("--train-data", type=Path,
                    help="training folder, to pick the operating point on its validation split")
    ap.add_argument("--train-csv", type=Path)
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-write-metrics", dest="write_metrics", action="store_false",
                    help="do not store the held-out summary in the checkpoint (by default it is, so that "
                         "the archive's model card and the promotion gate have it)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    result = evaluate(args.checkpoint, args.data, args.out, args.csv, args.target_sensitivity, args.bootstrap,
                      args.seed, args.threads, args.workers, not args.quiet,
                      (args.train_data, args.train_csv) if args.train_data else None)
    if args.write_metrics:
        record_in_checkpoint(args.checkpoint, result)
    print(text_summary(result))
    if args.write_metrics:
        print(f"held-out metrics stored in {args.checkpoint} (the archive's model card takes them from there)")
    print(f"wrote {args.out / 'evaluation.json'}")


if __name__ == "__main__":
    main()
