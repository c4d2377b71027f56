"""The console's static files at /console: served without a key, under their own CSP that
allows the API's origin only, with nothing fetched from elsewhere (the browser tests in
tests/integration/test_console.py check the same from inside Chromium)."""
import re

import pytest

from control_api import create_app, migrations
from control_api.blueprints.console import CSP, STATIC
from control_api.db import db
from control_api.storage import LocalStorage
from tests.plugins.api import bearer, image_bytes, upload

FILES = sorted(p for p in STATIC.iterdir() if p.is_file())


def test_console_serves_the_page_without_a_key(client):
    for url in ("/console", "/console/"):
        page = client.get(url)
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert b'<script type="module" src="/console/app.js">' in page.data


def test_every_asset_is_served_with_the_console_policy(client):
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
    for path in FILES:
        response = client.get(f"/console/{path.name}")
        assert response.status_code == 200, path.name
        assert response.mimetype == types[path.suffix], path.name
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
    missing = client.get("/console/nothing-here.js")
    assert missing.status_code == 404 and missing.headers["Content-Security-Policy"] == CSP
    assert client.get("/console/../app.py").status_code == 404


def test_the_policy_allows_the_api_origin_only():
    directives = dict(d.split(" ", 1) for d in CSP.split("; "))
    assert directives["default-src"] == "'none'"
    for name, value in directives.items():
        sources = set(value.split())
        assert sources <= {"'self'", "'none'", "blob:"}, (name, value)  # no host, no 'unsafe-inline'
    assert directives["img-src"] == "'self' blob:"  # photographs fetched with the key, shown as blob: URLs


def test_the_api_keeps_its_own_policy(client):
    response = client.get("/healthz")
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert response.headers["Content-Security-Policy"] != CSP


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_asset_names_another_origin(path):
    text = path.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
    assert not re.search(r"https?://|//cdn|@import|\bimport\(\s*['\"]http", text), path.name
    assert "innerHTML" not in text and "eval(" not in text  # API text never becomes markup or code


def test_modules_and_the_page_name_only_files_that_exist():
    for path in FILES:
        for name in re.findall(r'from "\./([^"]+)"|(?:src|href)="/console/([^"]+)"', path.read_text()):
            name = "".join(name)
            assert (STATIC / name).is_file(), (path.name, name)


class RedirectingStorage(LocalStorage):
    """Local storage that also offers download links, as S3 does with presigned URLs."""
    name = "redirecting"

    def download_url(self, key, *, content_type):
        return "https://bucket.example.invalid/" + key


def test_image_read_can_skip_the_redirect(api_settings, tmp_path, fake_torchserve):
    """A page whose policy allows the API's origin only cannot follow a redirect to S3."""
    app = create_app(api_settings, storage=RedirectingStorage(tmp_path / "objects"), torchserve=fake_torchserve)
    with app.app_context():
        migrations.migrate(db.obj)
    client = app.test_client()
    headers = bearer(app)
    patient = client.post("/api/v1/patients", headers=headers, json={"name": "Redirect Example"}).json
    data = image_bytes()
    screening = upload(client, headers, patient["id"], data).json
    url = f"/api/v1/patients/{patient['id']}/screenings/{screening['id']}/image"
    assert client.get(url, headers=headers).status_code == 302
    direct = client.get(url + "?redirect=false", headers=headers)
    assert direct.status_code == 200 and direct.data == data
    assert client.get(url + "?redirect=maybe", headers=headers).status_code in (400, 422)


def test_make_run_banner_names_the_console(tmp_path):
    from scripts.serving.processes import DicomReceiver
    from scripts.serving.stack import _banner

    dicom = DicomReceiver(tmp_path, {}, port=11112, health_port=11113)  # built, never started
    banner = _banner("http://127.0.0.1:8000", {}, dicom)
    assert "http://127.0.0.1:8000/console/" in banner
    assert "127.0.0.1:11112" in banner
