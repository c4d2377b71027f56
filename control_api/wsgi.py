"""WSGI entry point: `gunicorn -c gunicorn.conf.py control_api.wsgi:app`."""
from .app import create_app

app = create_app()
