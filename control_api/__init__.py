"""Clarity in Care control API. `flask --app control_api ...` finds create_app here."""
from .app import create_app

__all__ = ["create_app"]
