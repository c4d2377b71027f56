"""The promotion gate: what `python -m scripts.serving.registry promote` checks before a version
becomes the default that clinicians' photographs are graded with.

A version is refused when
- its model card has no held-out metrics (model_meta.json's `held_out`, written by
  `scripts.ml.archive` from `scripts.ml.evaluate`);
- its held-out quadratic weighted kappa or referable sensitivity is below the configured minimum;
- shadow data exists for it (the control API's GET /api/v1/models) and its agreement with the
  current default is below the configured minimum (kappa on grade, agreement on referable).
`--force --reason TEXT` promotes anyway; the promotion log records the reason and what failed.

Thresholds come from the environment (or the command's flags):
PROMOTE_MIN_QWK (0.60), PROMOTE_MIN_REFERABLE_SENSITIVITY (0.80),
PROMOTE_MIN_SHADOW_KAPPA (0.60), PROMOTE_MIN_SHADOW_REFERABLE_AGREEMENT (0.90).
The shadow check needs the API: CLARITY_API_URL and an admin key in CLARITY_API_KEY.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests

THRESHOLD_ENV = {
    "min_qwk": ("PROMOTE_MIN_QWK", 0.60),
    "min_referable_sensitivity": ("PROMOTE_MIN_REFERABLE_SENSITIVITY", 0.80),
    "min_shadow_kappa": ("PROMOTE_MIN_SHADOW_KAPPA", 0.60),
    "min_shadow_referable_agreement": ("PROMOTE_MIN_SHADOW_REFERABLE_AGREEMENT", 0.90),
}


@dataclass(frozen=True)
class Thresholds:
    min_qwk: float = 0.60
    min_referable_sensitivity: float = 0.80
    min_shadow_kappa: float = 0.60
    min_shadow_referable_agreement: float = 0.90

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Thresholds":
        environ = os.environ if environ is None else environ
        values = {name: float(environ[env]) for name, (env, _) in THRESHOLD_ENV.items()
                  if environ.get(env, "").strip()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Verdict:
    version: str
    card: dict | None = None
    shadow: dict | None = None
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {"version": self.version, "passed": self.passed, "failures": self.failures, "notes": self.notes,
                "card": self.card, "shadow": self.shadow}


def archive_meta(mar: Path) -> dict | None:
    """model_meta.json from an archive file, or None when there is no such archive."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("model_meta.json"))
    except (FileNotFoundError, KeyError, zipfile.BadZipFile):
        return None


def held_out(meta: dict | None) -> dict | None:
    """{"quadratic_kappa": 0.91, "referable_sensitivity": 0.95, ...} from the card, values only."""
    card = (meta or {}).get("held_out")
    if not isinstance(card, dict):
        return None
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in card.items()}


def shadow_agreement(version: str, api_url: str, api_key: str, timeout: float = 30) -> dict | None:
    """The version's shadow agreement with the current default, as GET /api/v1/models reports it."""
    try:
        response = requests.get(f"{api_url.rstrip('/')}/api/v1/models",
                                headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
    except requests.RequestException as exc:
        raise GateError(f"GET {api_url}/api/v1/models failed: {exc}") from None
    if response.status_code != 200:
        raise GateError(f"GET {api_url}/api/v1/models answered {response.status_code}: {response.text[:200]}")
    for row in response.json().get("versions", []):
        if row.get("version") == version:
            return row.get("shadow")
    return None


class GateError(Exception):
    pass


def check(version: str, meta: dict | None, thresholds: Thresholds, shadow: dict | None,
          shadow_checked: bool) -> Verdict:
    verdict = Verdict(version, card=held_out(meta), shadow=shadow)
    card = verdict.card
    if not card:
        verdict.failures.append("its model card has no held-out metrics (run scripts.ml.evaluate on held-out "
                                "images, then archive the checkpoint again under a new version)")
    else:
        for key, minimum in (("quadratic_kappa", thresholds.min_qwk),
                             ("referable_sensitivity", thresholds.min_referable_sensitivity)):
            value = card.get(key)
            if not isinstance(value, (int, float)):
                verdict.failures.append(f"held-out {key} is missing from its card")
            elif value < minimum:
                verdict.failures.append(f"held-out {key} {value:.3f} is below {minimum:.3f}")
    predicted = ((meta or {}).get("held_out") or {}).get("predicted_counts") or []
    if len([n for n in predicted if n]) == 1:
        # Its kappa is 0 and the QWK threshold refuses it; say why in words.
        verdict.notes.append("it predicted one and the same grade for every held-out image")
    if shadow:
        n = shadow.get("photographs")
        for key, minimum in (("grade_kappa", thresholds.min_shadow_kappa),
                             ("referable_agreement", thresholds.min_shadow_referable_agreement)):
            value = shadow.get(key)
            if value is None:
                verdict.notes.append(f"shadow {key} undefined over {n} photographs")
            elif value < minimum:
                verdict.failures.append(f"shadow {key} with {shadow.get('baseline_version')} is {value:.3f} "
                                        f"over {n} photographs, below {minimum:.3f}")
    elif shadow_checked:
        verdict.notes.append("no shadow data for this version (put it in shadow first to compare it on live photographs)")
    else:
        verdict.notes.append("shadow agreement not checked: set CLARITY_API_URL and CLARITY_API_KEY (admin)")
    return verdict
