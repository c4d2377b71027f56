"""Two models side by side on the same labelled folder, with paired tests.

    python -m scripts.ml.compare A B --data DIR [--csv FILE] [--out DIR] [--bootstrap 1000]

A and B are training checkpoints (.pt) or archives (.mar); each is run with its own
preprocessing on the same images. Images either model's quality gate rejects are left out of
both, so every number is over the same photographs. Reported for each: QWK, accuracy and
referable sensitivity/specificity with "referable" = predicted grade >= the model's
referable_threshold (the definition serving uses). Paired: the QWK difference B - A with a
bootstrap 95% CI and two-sided p-value (same resampled images for both), and an exact McNemar
test on which images each gets right as referable / not referable.
Writes OUT/comparison.json when --out is given.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from handlers import fundus, quality
from handlers.network import DRNet
from scripts.ml import datasets
from scripts.ml.train import load_checkpoint, predict, qwk


def load_model(path: Path) -> tuple[torch.nn.Module, fundus.PreprocessConfig, quality.QualityThresholds, int, str]:
    """(model, preprocessing, quality thresholds, referable threshold, description) of a .pt or .mar."""
    path = Path(path)
    if path.suffix == ".mar":
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("model_meta.json"))
            state = torch.load(io.BytesIO(z.read(meta["weights_file"])), map_location="cpu", weights_only=True)
        model = DRNet(meta["arch"], meta["num_classes"])
        model.load_state_dict(state)
        return (model.eval(), fundus.PreprocessConfig.from_dict(meta["preprocess"]),
                quality.QualityThresholds.from_dict(meta["quality"]), int(meta["referable_threshold"]),
                f"{path.name} ({meta['name']} {meta['version']}, {meta['arch']})")
    model, ck = load_checkpoint(path)
    return (model, fundus.PreprocessConfig.from_dict(ck["preprocess"]), quality.QualityThresholds.from_dict(ck["quality"]),
            int(ck["referable_threshold"]), f"{path.name} ({ck['arch']})")


def run(model, cfg, thresholds, samples, workers: int, progress: bool) -> dict[str, tuple[int, np.ndarray]]:
    """{image name: (true grade, probabilities)} for the images the quality gate accepts."""
    ds = datasets.FundusDataset(samples, cfg, thresholds, None, preload=True, workers=workers, progress=progress)
    names = [s.name for s in ds.samples]
    dl = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=datasets.collate)
    y, p, _ = predict(model, dl, progress, "predict")
    return {name: (int(g), probs) for name, g, probs in zip(names, y, p)}


def sens_spec(y, pred, ref: int) -> tuple[float | None, float | None]:
    pos, called = y >= ref, pred >= ref
    sens = float((called & pos).sum() / pos.sum()) if pos.any() else None
    spec = float((~called & ~pos).sum() / (~pos).sum()) if (~pos).any() else None
    return sens, spec


def mcnemar_exact(a_right: np.ndarray, b_right: np.ndarray) -> dict:
    """Exact two-sided McNemar test on paired right/wrong calls."""
    only_a = int((a_right & ~b_right).sum())
    only_b = int((~a_right & b_right).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    else:
        k = min(only_a, only_b)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": p}


def paired_qwk(y, pa, pb, n_boot: int, seed: int) -> dict:
    diff = qwk(y, pb) - qwk(y, pa)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        boots.append(qwk(y[i], pb[i]) - qwk(y[i], pa[i]))
    boots = np.array(boots)
    p = 2 * min((boots <= 0).mean(), (boots >= 0).mean()) if n_boot else None
    return {"b_minus_a": diff, "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
            if n_boot else None, "p_value": None if p is None else float(min(1.0, p))}


def compare(a: Path, b: Path, data_dir: Path, csv_path: Path | None = None, n_boot: int = 1000, seed: int = 0,
            workers: int = 2, progress: bool = True) -> dict:
    data = datasets.load(data_dir, csv_path)
    models = [load_model(a), load_model(b)]
    answers = [run(m, cfg, th, data.samples, workers, progress) for m, cfg, th, _, _ in models]
    names = sorted(set(answers[0]) & set(answers[1]))
    if not names:
        raise SystemExit("no image passed both models' quality gates")
    y = np.array([answers[0][n][0] for n in names])
    preds = [np.array([ans[n][1].argmax() for n in names]) for ans in answers]
    out = {"data": {"name": data.name, "images": len(data.samples), "compared": len(names),
                    "left_out_by_quality_gate": len(data.samples) - len(names), "synthetic": data.synthetic},
           "models": []}
    for (_, _, _, ref, desc), pred in zip(models, preds):
        sens, spec = sens_spec(y, pred, ref)
        out["models"].append({"model": desc, "referable_threshold": ref, "quadratic_kappa": qwk(y, pred),
                              "accuracy": float((pred == y).mean()),
                              "referable_sensitivity": sens, "referable_specificity": spec,
                              "referable_definition": f"predicted grade >= {ref}"})
    refs = [m[3] for m in models]
    right = [(pred >= ref) == (y >= ref) for pred, ref in zip(preds, refs)]
    out["paired"] = {"quadratic_kappa": paired_qwk(y, preds[0], preds[1], n_boot, seed),
                     "referable_mcnemar": mcnemar_exact(right[0], right[1]),
                     "grade_agreement_between_models": float((preds[0] == preds[1]).mean())}
    return out


def report(result: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    d = result["data"]
    lines = [f"{d['compared']} images of {d['name']} compared ({d['left_out_by_quality_gate']} left out by a "
             f"quality gate){' - synthetic images' if d['synthetic'] else ''}", ""]
    lines.append(f"{'':4}{'model':<44}{'QWK':>7}{'acc':>7}{'ref sens':>10}{'ref spec':>10}")
    for tag, m in zip("AB", result["models"]):
        lines.append(f"{tag:4}{m['model'][:43]:<44}{f(m['quadratic_kappa']):>7}{f(m['accuracy']):>7}"
                     f"{f(m['referable_sensitivity']):>10}{f(m['referable_specificity']):>10}")
    lines.append("referable = predicted grade >= each model's referable_threshold (as served)")
    q, mc = result["paired"]["quadratic_kappa"], result["paired"]["referable_mcnemar"]
    ci = q["ci95"]
    lines.append(f"paired QWK difference B - A: {q['b_minus_a']:+.3f}" +
                 (f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, bootstrap p = {q['p_value']:.3f})" if ci else ""))
    lines.append(f"referable calls, exact McNemar: only A right {mc['only_a_right']}, only B right "
                 f"{mc['only_b_right']}, p = {mc['p_value']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.ml.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="checkpoint (.pt) or archive (.mar)")
    ap.add_argument("b", type=Path, help="checkpoint (.pt) or archive (.mar)")
    ap.add_argument("--data", type=Path, required=True, help="labelled folder both are run on")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--out", type=Path, help="write comparison.json here")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    result = compare(args.a, args.b, args.data, args.csv, args.bootstrap, args.seed, args.workers,
                     not args.no_progress)
    print(report(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
