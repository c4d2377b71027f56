"""`flask --app control_api ...` commands: schema, API keys, and jobs that repair or finish work."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone

import click
from flask import current_app
from flask.cli import with_appcontext

from . import agreement, migrations
from .auth import create_key, revoke_key
from .db import db
from .grading import grade_pending
from .models import ROLES, ApiKey, Grading, Screening
from .storage import ObjectCorrupted, ObjectMissing, StorageUnavailable, get_storage
from .torchserve import get_client


def _migrate() -> None:
    from .db import _deadline

    _deadline.seconds = 3600.0  # a step may take long; lock_timeout keeps it from queueing traffic
    before = migrations.current_version(db.obj)
    applied = migrations.migrate(db.obj)
    if applied:
        click.echo(f"schema upgraded from version {before} to {applied[-1]}")
    else:
        click.echo(f"schema is up to date (version {before})")


@click.command("migrate")
@with_appcontext
def migrate_command():
    """Create the schema or upgrade it to the latest version (keeps every row)."""
    _migrate()


@click.group("keys")
def keys():
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--label", default="", help="Who or what uses the key (no patient data).")
@click.option("--to-secret", "secret_id", default=None, metavar="ARN",
              help="Write the key into this AWS Secrets Manager secret instead of stdout (one-off ECS "
                   "tasks, whose stdout goes to CloudWatch Logs).")
@with_appcontext
def keys_create(role, label, secret_id):
    """Print a new key on stdout (or store it in a secret). It is shown this once; only its hash is stored."""
    key, token = create_key(role, label)
    if secret_id:
        import boto3

        boto3.client("secretsmanager").put_secret_value(SecretId=secret_id, SecretString=token)
        click.echo(f"created {role} key {key.prefix} ({label or 'no label'}); the key is in {secret_id}", err=True)
        return
    click.echo(token)
    click.echo(f"created {role} key {key.prefix} ({label or 'no label'}); store it now, it is not shown again",
               err=True)


@keys.command("list")
@with_appcontext
def keys_list():
    for key in ApiKey.select().order_by(ApiKey.created_at):
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}Z" if key.revoked_at else "active"
        click.echo(f"{key.prefix}  {key.role:<9}  {state:<24}  {key.label}")


@keys.command("revoke")
@click.argument("prefix")
@with_appcontext
def keys_revoke(prefix):
    """Revoke the key with this prefix (the 8 characters after `cic_`)."""
    if not revoke_key(prefix):
        raise click.ClickException(f"no active key with prefix {prefix}")
    click.echo(f"revoked {prefix}")


@click.command("grade-pending")
@click.option("--limit", type=int, default=None, help="Grade at most this many.")
@with_appcontext
def grade_pending_command(limit):
    """Grade every pending screening once. Safe beside uploads, other runs and the background
    grader: each screening is claimed before grading, so none is graded twice. Goes on past a
    screening TorchServe fails on (counted; `failed` after grading.MAX_ATTEMPTS); stops, exit
    status 1, when TorchServe or storage is not there at all."""
    counts = grade_pending(get_client(), get_storage(), limit, say=click.echo)
    click.echo(", ".join(f"{n} {k}" for k, n in counts.items() if k != "stopped"))
    current_app.extensions["clarity"]["shadow"].drain()  # shadow gradings this process queued
    if counts["stopped"]:
        sys.exit(1)


@click.command("grade-worker")
@click.option("--interval", type=float, default=30.0, show_default=True,
              help="Seconds between passes over the pending screenings.")
@click.option("--once", is_flag=True, help="One pass, then exit (for a scheduled job).")
@with_appcontext
def grade_worker(interval, once):
    """Grade pending screenings in the background, for ever: what `make run`, compose and ECS
    run beside the API, so uploads kept pending while TorchServe was away get graded when it is
    back. Same claim as grade-pending (exactly once), same bounded attempts. Publishes the
    backlog (clarity_pending_screenings, clarity_pending_oldest_age_seconds) on its own
    /metrics port when GRADER_METRICS_PORT is set."""
    from . import worker

    worker.run(get_client(), get_storage(), interval=interval, once=once, say=click.echo)


@click.command("check-storage")
@with_appcontext
def check_storage():
    """Read every screening's image back and compare its SHA-256 with the record."""
    storage = get_storage()
    checked = problems = unreadable = 0
    for s in Screening.select(Screening.id, Screening.image_key, Screening.image_sha256).iterator():
        checked += 1
        try:
            storage.get(s.image_key, sha256=s.image_sha256)
        except ObjectMissing:
            problems += 1
            click.echo(f"{s.id} missing object {s.image_key}")
        except ObjectCorrupted:
            problems += 1
            click.echo(f"{s.id} SHA-256 mismatch {s.image_key}")
        except StorageUnavailable as exc:  # the network failed, not the object: not a mismatch
            unreadable += 1
            click.echo(f"{s.id} could not be read now ({exc}); run again")
    click.echo(f"{checked} checked, {problems} problems" + (f", {unreadable} unreadable" if unreadable else ""))
    if problems or unreadable:
        sys.exit(1)


@click.command("reconcile")
@click.option("--apply", "apply_", is_flag=True, help="Repair; without it, only report (dry run).")
@click.option("--grace-minutes", default=10, show_default=True,
              help="Leave objects and rows younger than this alone: an upload may be in flight.")
@with_appcontext
def reconcile(apply_, grace_minutes):
    """Find objects without a screening row (deleted with --apply) and screening rows without
    their object (deleted with their gradings with --apply: they can be neither shown nor graded)."""
    storage = get_storage()
    cutoff = datetime.now(timezone.utc) - timedelta(minutes=grace_minutes)
    objects = {o.key: o for o in storage.list("screenings/")}
    rows = {s.image_key: s for s in Screening.select(Screening.id, Screening.image_key, Screening.created_at)}
    orphan_objects = [k for k, o in objects.items() if k not in rows and o.modified_at < cutoff]
    orphan_rows = [s for k, s in rows.items()
                   if k not in objects and s.created_at.replace(tzinfo=timezone.utc) < cutoff]
    for key in orphan_objects:
        click.echo(f"object without row: {key}")
        if apply_:
            storage.delete(key)
    for s in orphan_rows:
        click.echo(f"row without object: screening {s.id}")
        if apply_:
            with db.atomic():
                Grading.delete().where(Grading.screening == s.id).execute()
                Screening.delete().where(Screening.id == s.id).execute()
    verb = "repaired" if apply_ else "found (dry run; --apply repairs)"
    click.echo(f"{len(orphan_objects)} objects without rows, {len(orphan_rows)} rows without objects {verb}")


@click.command("dicom-receiver")
@with_appcontext
def dicom_receiver():
    """Run the DICOM C-STORE receiver (control_api/dicom_receiver.py) until SIGTERM."""
    from flask import current_app

    from . import dicom_receiver as receiver

    receiver.run(current_app._get_current_object())


@click.group("shadow")
def shadow_group():
    """Shadow grading: compare a candidate version with the clinical gradings."""


@shadow_group.command("report")
@click.option("--version", required=True, help="the candidate version")
@click.option("--baseline-version", default=None, help="only clinical gradings of this version")
@click.option("--json", "as_json", is_flag=True, help="the report as JSON (the admin route's body)")
@with_appcontext
def shadow_report(version, baseline_version, as_json):
    """Agreement of VERSION's shadow answers with the clinical gradings (ids only, no PHI)."""
    report = agreement.compare(version, baseline_version)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"
    click.echo(f"candidate {version} vs clinical {', '.join(report['baseline_versions']) or '-'}: "
               f"{report['photographs']} photographs, {report['both_gradable']} gradable by both")
    click.echo(f"grade: quadratic weighted kappa {fmt(report['grade_kappa'])}, "
               f"exact agreement {fmt(report['grade_agreement'])}")
    click.echo(f"referable agreement {fmt(report['referable_agreement'])}, "
               f"gradable agreement {fmt(report['gradable_agreement'])}")
    labels = report["confusion"]["labels"]
    click.echo("confusion (rows: clinical, columns: candidate)")
    click.echo("            " + "".join(f"{label:>11}" for label in labels))
    for label, row in zip(labels, report["confusion"]["matrix"]):
        click.echo(f"{label:>12}" + "".join(f"{n:>11}" for n in row))
    click.echo(f"disagree on referral: {report['referral_disagreements_total']}")
    for d in report["referral_disagreements"]:
        click.echo(f"  screening {d['screening_id']}: clinical grade {d['baseline_grade']}, "
                   f"candidate grade {d['candidate_grade']}")


def register(app) -> None:
    for command in (migrate_command, keys, grade_pending_command, grade_worker, check_storage, reconcile,
                    dicom_receiver, shadow_group):
        app.cli.add_command(command)
