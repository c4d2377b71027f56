"""The one model-card writer: the card a .mar carries (and `archive` writes beside it), from what the
checkpoint says of itself, and the demo model's card (models/demo/MODEL_CARD.md), with its
evaluation on held-out synthetic images and how it was made."""
from __future__ import annotations

import json

SYNTHETIC_DISCLAIMER = "Demo model trained on synthetic images. Not for clinical use."
GENERAL_DISCLAIMER = "Screening aid only; not validated for clinical use."


def _flat_scalars(d, prefix=""):
    """('a.b', 0.93) pairs for the numbers in a nested metrics dict."""
    for key, value in (d or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_scalars(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def archive_card(ck: dict, meta: dict, n_params: int) -> str:
    """MODEL_CARD.md inside a .mar (and beside it): what the checkpoint says of itself."""
    ds = meta["dataset"]
    lines = [f"# Model card: `{meta['name']}` version {meta['version']}", ""]
    if meta["synthetic"]:
        lines += [f"> **{SYNTHETIC_DISCLAIMER}** Its grades say",
                  "> nothing about real eyes; it exists to exercise the serving stack.", ""]
    else:
        lines += [f"> {GENERAL_DISCLAIMER}", ""]
    lines += [
        "## Model",
        f"- Architecture: `{meta['arch']}` backbone + linear head, {meta['num_classes']} classes, "
        f"{n_params:,} parameters",
        "- Grades: " + "; ".join(f"{i} = {label}" for i, label in enumerate(meta["grade_labels"])),
        f"- Referable: grade >= {meta['referable_threshold']}",
        f"- Input: {meta['preprocess']['input_size']} px square disc crop; preprocessing "
        f"`{json.dumps(meta['preprocess'])}`",
        f"- Quality gate thresholds: `{json.dumps(meta['quality'])}`",
        "",
        "## Training data",
        f"- Dataset: {ds.get('name') or 'unnamed'} ({ds.get('format') or 'unknown format'})",
        f"- Synthetic: **{'yes' if meta['synthetic'] else 'no'}**",
        f"- Fingerprint (SHA-256 of labels + file list): `{ds.get('fingerprint')}`",
        f"- Counts: `{json.dumps(ds.get('counts'))}`",
        "",
        "## Held-out metrics",
    ]
    metrics = list(_flat_scalars(ck.get("metrics")))
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics]
        if isinstance(meta.get("held_out"), dict) and meta["held_out"].get("referable_definition"):
            lines += ["", f"Referable sensitivity/specificity: {meta['held_out']['referable_definition']}."]
    else:
        lines += ["None recorded in the checkpoint."]
    if not meta.get("held_out"):
        lines += ["", "**No held-out metrics**: `promote` refuses this version. Run `scripts.ml.evaluate` on "
                  "held-out images, then archive again under a new version."]
    if meta["synthetic"]:
        lines += ["", "Metrics on synthetic images do not estimate clinical accuracy."]
    lines += [
        "",
        "## Provenance",
        f"- Weights: `{meta['weights_file']}`, float32 state dict, SHA-256 `{meta['weights_sha256']}`",
        f"- Code revision: `{meta['code_revision']}`",
        *([f"- Engine: `{meta['engine']['name']}` ({meta['engine']['file']}, SHA-256 "
           f"`{meta['engine']['sha256']}`); Grad-CAM runs on the eager weights"] if meta.get("engine") else []),
        f"- Trained: {meta['trained_at'] or 'unknown'}; archived: {meta['archived_at']}",
        "",
        "## Intended use and limits",
        "Decision support for diabetic-retinopathy screening programmes, with every grade reviewed",
        "by a qualified grader. Images that fail the quality gate are not graded. No claim of",
        "clinical accuracy is made.",
        "",
    ]
    return "\n".join(lines)


def _fmt(m: dict, k: str, pct: bool = False) -> str:
    v, (lo, hi) = m[k]["value"], m[k]["ci95"]
    if v is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(v)} ({f(lo)} – {f(hi)})"


def demo_card(ck: dict, result: dict, run: dict) -> str:
    """models/demo/MODEL_CARD.md: the demo checkpoint with its evaluation on held-out synthetic images
    and how it was made (`python -m scripts.ml.demo_model`)."""
    return (_demo_model(ck, result, run) + _demo_training(ck, run) + _demo_evaluation(ck, result, run)
            + _demo_limits(ck, run))


def _demo_model(ck: dict, result: dict, run: dict) -> str:
    labels = ck["grade_labels"]
    n_params = sum(v.numel() for v in ck["state_dict"].values() if v.is_floating_point())
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

"""


def _demo_training(ck: dict, run: dict) -> str:
    counts, r = ck["dataset"]["counts"], run["recipe"]
    return f"""## Training data (synthetic)
- {sum(counts)} images from `python -m scripts.ml.synth --n {r['train_images']} --seed {r['seed']} --size {r['image_size']}`,
  grades 0–4: {', '.join(map(str, counts))} images. The lesion model is described in `docs/synthetic-data.md`.
- Stratified split (seed {r['seed']}): {len(ck['dataset']['split']['train'])} training, {len(ck['dataset']['split']['val'])} validation
  images; the best epoch ({ck['training']['best_epoch']} of {r['epochs']}) was chosen on validation
  quadratic weighted kappa ({ck['metrics']['validation']['val_qwk']:.3f}).
- AdamW (peak lr {r['lr']}), warmup + cosine schedule, class-weighted cross-entropy with label smoothing,
  rotation/flip/zoom/colour augmentation. Details in `docs/training.md`.

"""


def _demo_evaluation(ck: dict, result: dict, run: dict) -> str:
    m, op, r = result["metrics"], result["operating_point"], run["recipe"]
    test_counts = result["data"]["counts"]
    recall_rows = "\n".join(
        f"| {g} {label} | {test_counts[g]} | {_fmt(m, f'recall_grade_{g}', True)} |"
        for g, label in enumerate(ck["grade_labels"]))
    return f"""## Evaluation on held-out synthetic images
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

"""


def _demo_limits(ck: dict, run: dict) -> str:
    t = run["seconds"]
    return f"""## Limitations
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
