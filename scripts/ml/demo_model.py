"""Reproduce the bundled demo model from synthetic images (`make demo-model`).

    python -m scripts.ml.demo_model [--out models/demo] [--work var/demo]

Generates a seeded synthetic training set and a separate held-out synthetic test set, trains a
small network on 2 CPU cores, evaluates it on the test set and writes models/demo/: checkpoint.pt
(float16 weights), MODEL_CARD.md, evaluation.json and the plots. The model has never seen a real
photograph of an eye: it exists to exercise the serving stack, and is NOT for clinical use.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see scripts/ml/train.py

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from scripts.ml import evaluate, synth, train  # noqa: E402
from scripts.files import sha256_file  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The recipe. Changing it changes the committed model: rerun this script and commit its output.
RECIPE = {
    "train_images": 1200, "test_images": 400, "image_size": 384, "seed": 0, "test_seed": 1,
    "arch": "mobilenet_v3_small", "input_size": 160, "epochs": 16, "batch_size": 32, "lr": 3e-3,
    "val_fraction": 0.15,
}


def _fmt(m: dict, k: str, pct: bool = False) -> str:
    v, (lo, hi) = m[k]["value"], m[k]["ci95"]
    if v is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(v)} ({f(lo)} – {f(hi)})"


def model_card(ck: dict, result: dict, run: dict) -> str:
    m, op, r = result["metrics"], result["operating_point"], run["recipe"]
    counts = ck["dataset"]["counts"]
    test_counts = result["data"]["counts"]
    labels = ck["grade_labels"]
    n_params = sum(v.numel() for v in ck["state_dict"].values() if v.is_floating_point())
    recall_rows = "\n".join(
        f"| {g} {labels[g]} | {test_counts[g]} | {_fmt(m, f'recall_grade_{g}', True)} |" for g in range(len(labels)))
    t = run["seconds"]
    return f"""# Model card: Clarity in Care demo DR model (synthetic training data)

> **Not for clinical use.** This model was trained only on *synthetic* fundus images drawn by
> `scripts/ml/synth.py`. It has never seen a photograph of a real eye and has **no validated clinical
> accuracy**. Its grades on real photographs mean nothing. It exists so that the serving stack
> (TorchServe handler, API, benchmarks) can be built, tested and demonstrated end to end.

## Model
| | |
|---|---|
| Task | Diabetic retinopathy grade on the International Clinical DR (ICDR) scale, 0–4, from one fundus photograph |
| Architecture | `{ck['arch']}` (torchvision), trained from scratch (no pretrained weights), {n_params / 1e6:.2f} M parameters, 5-grade linear head |
| Input | {ck['preprocess']['input_size']} × {ck['preprocess']['input_size']} px crop of the field of view (`handlers/fundus.py`: disc crop, Ben Graham local-colour subtraction, circular mask, ImageNet normalisation) |
| Output | Probabilities of grades 0–4: {', '.join(f'{i} {lab}' for i, lab in enumerate(labels))}; referable DR = grade ≥ {ck['referable_threshold']} |
| Weights | stored as float16 in `checkpoint.pt` ({run['checkpoint_bytes'] / 1e6:.1f} MB) and cast back to float32 when loaded; the evaluation below ran on the stored weights |
| Checkpoint | format `{ck['format']}`, sha256 `{result['checkpoint']['sha256'][:16]}…`, code revision `{ck['code_revision'][:12]}`{' (with uncommitted changes)' if ck.get('code_dirty') else ''}, created {ck['created_at']} |

## Intended use
- Exercising and demonstrating the Clarity in Care stack: archiving, TorchServe serving, the control
  API, Grad-CAM overlays, load tests and benchmarks.
- **Out of scope:** any use on patients or real screening data, any clinical decision, any claim
  about DR detection performance.

## Training data (synthetic)
- {sum(counts)} images from `python -m scripts.ml.synth --n {r['train_images']} --seed {r['seed']} --size {r['image_size']}`,
  grades 0–4: {', '.join(map(str, counts))} images. The lesion model is described in `docs/synthetic-data.md`.
- Stratified split (seed {r['seed']}): {len(ck['dataset']['split']['train'])} training, {len(ck['dataset']['split']['val'])} validation
  images; the best epoch ({ck['training']['best_epoch']} of {r['epochs']}) was chosen on validation
  quadratic weighted kappa ({ck['metrics']['validation']['val_qwk']:.3f}).
- AdamW (peak lr {r['lr']}), warmup + cosine schedule, class-weighted cross-entropy with label smoothing,
  rotation/flip/zoom/colour augmentation. Details in `docs/training.md`.

## Evaluation on held-out synthetic images
A separate synthetic set (`--n {r['test_images']} --seed {r['test_seed']}`, {result['data']['n']} images, grades
{', '.join(map(str, test_counts))}) that played no part in training or model selection. 95% confidence
intervals from {result['bootstrap']['resamples']} bootstrap resamples of the test images (seed {result['bootstrap']['seed']}).

| Metric | Value (95% CI) |
|---|---|
| Quadratic weighted kappa | {_fmt(m, 'quadratic_kappa')} |
| Accuracy (5 grades) | {_fmt(m, 'accuracy', True)} |
| Referable DR sensitivity (predicted grade ≥ 2) | {_fmt(m, 'referable_sensitivity', True)} |
| Referable DR specificity | {_fmt(m, 'referable_specificity', True)} |
| Referable DR AUC (P(grade ≥ 2)) | {_fmt(m, 'referable_auc')} |

| True grade | Test images | Recall (95% CI) |
|---|---|---|
{recall_rows}

Operating point for a target sensitivity of {op['target_sensitivity']:.0%}: refer when P(grade ≥ 2) ≥
{op['threshold']:.4f} (chosen on the {op['chosen_on']}); on the test set this gives sensitivity
{_fmt({'s': op['test_sensitivity']}, 's', True)} and specificity {_fmt({'s': op['test_specificity']}, 's', True)}.

Plots: `confusion_matrix.png`, `roc_referable.png`, `training_curves.png`; all numbers in `evaluation.json`.
**These numbers describe how well the model learned the synthetic drawing rules, not DR.**

## Limitations
- Synthetic lesions are simplified, drawn 1.5–3× larger than typical real ones (so they survive
  {ck['preprocess']['input_size']} px), on idealised anatomy without real camera artefacts, pathology
  mimics (drusen, laser scars, myopic changes), media opacities or ungradable images.
- No diabetic macular oedema grading; one image per eye; no patient-level aggregation.
- Severe vs. moderate and proliferative vs. severe are the hardest distinctions even in this
  synthetic task (see the confusion matrix).
- For real use a model must be trained on licensed, labelled photographs (e.g. with
  `scripts.ml.train --arch efficientnet_b0`), validated prospectively, and cleared by a regulator.

## Reproduce
`make demo-model` (= `python -m scripts.ml.demo_model`). Measured for this checkpoint on {run['machine']}:
generate {t['generate']:.0f} s, train {t['train']:.0f} s (of which preprocessing {ck['training']['preprocess_seconds']:.0f} s),
evaluate {t['evaluate']:.0f} s, total {t['total']:.0f} s wall clock, using {t['cpu']:.0f} CPU-seconds
(1-minute load average {run['load_average'][0]:.1f} at the start and {run['load_average'][1]:.1f} at the end; the
machine was shared with other work, so the wall time depends on it).
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "models" / "demo", help="where the model and its card go")
    ap.add_argument("--work", type=Path, default=REPO / "var" / "demo", help="scratch folder (images, train state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    r = RECIPE
    work, out = args.work, args.out
    load_start = os.getloadavg()[0]
    seconds = {}
    t0 = time.perf_counter()
    for part in ("train", "test"):  # stale images of another recipe must not leak in
        shutil.rmtree(work / part, ignore_errors=True)
    synth.generate(work / "train", r["train_images"], r["seed"], r["image_size"], workers=args.workers,
                   progress=not args.quiet)
    synth.generate(work / "test", r["test_images"], r["test_seed"], r["image_size"], workers=args.workers,
                   progress=not args.quiet)
    seconds["generate"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    ck_path = work / "checkpoint.pt"
    for stale in (ck_path, train.train_state_path(ck_path)):
        stale.unlink(missing_ok=True)
    train.train(train.build_parser().parse_args([
        "--data", str(work / "train"), "--out", str(ck_path), "--name", "clarity-synthetic-demo",
        "--arch", r["arch"], "--input-size", str(r["input_size"]), "--epochs", str(r["epochs"]),
        "--batch-size", str(r["batch_size"]), "--lr", str(r["lr"]), "--val-fraction", str(r["val_fraction"]),
        "--test-fraction", "0", "--seed", str(r["seed"]), "--threads", str(args.threads),
        "--workers", str(args.workers), "--half-weights", *(["--quiet"] if args.quiet else [])]))
    seconds["train"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate.evaluate(ck_path, work / "test", out, threads=args.threads, workers=args.workers,
                               progress=not args.quiet, val_data=(work / "train", None))
    evaluate.record_in_checkpoint(ck_path, result)
    seconds["evaluate"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    # CPU time actually received, with the preprocessing and generator processes: on a shared
    # machine wall time alone overstates what the recipe costs.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    seconds["cpu"] = sum(u.ru_utime + u.ru_stime for u in usage)

    shutil.copyfile(ck_path, out / "checkpoint.pt")
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    # record_in_checkpoint added metrics.test after evaluate hashed the file; the weights are the same
    result["checkpoint"].update(file="checkpoint.pt", sha256=sha256_file(out / "checkpoint.pt"))
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    run = {"recipe": r, "seconds": seconds, "checkpoint_bytes": (out / "checkpoint.pt").stat().st_size,
           "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                      f"torch {torch.__version__.split('+')[0]} with {args.threads} threads",
           "load_average": [load_start, os.getloadavg()[0]]}
    (out / "MODEL_CARD.md").write_text(model_card(ck, result, run))
    print(json.dumps({"seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "checkpoint_bytes": run["checkpoint_bytes"],
                      "quadratic_kappa": result["metrics"]["quadratic_kappa"]}, indent=2))
    print(f"wrote {out}/checkpoint.pt, MODEL_CARD.md, evaluation.json and plots")


if __name__ == "__main__":
    main()
