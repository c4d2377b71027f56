"""A corpus of bad and awkward input, each case with the answer it must get, through real
gunicorn (2 workers), real TorchServe (tiny model), SeaweedFS S3 and PostgreSQL.

Rejected input gets a specific 4xx with the JSON error shape ({"error": {"code", "message",
"request_id"}}); nothing answers 5xx. Some cases are valid input on purpose (unicode, SQL-like
or script-like names, CMYK, 16-bit, EXIF-rotated, multi-page TIFF, path traversal in the file
name, a wrong declared content type): they expect success, and that the value comes back
unchanged. Photographs that are not fundus images are not errors: they are stored and answered
201 with status `ungradable` (quality reasons for a retake).

MAX_UPLOAD_BYTES is 1 MiB here so that "over the limit" needs little data. After the corpus the
same workers (no restart) still answer /healthz and grade a good upload, and gunicorn's access
log holds no 5xx.
"""
from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
import requests
from PIL import Image

from tests.support import images as im
from tests.support.harness import jpeg, new_patient, phi_patient, upload

pytestmark = pytest.mark.integration

LIMIT = 1024 * 1024


@dataclass
class Ctx:
    stack: object
    clinician: dict
    admin: dict
    patient: str
    screening: str

    def url(self, path: str) -> str:
        return f"{self.stack.url}/api/v1{path}"

    def call(self, method: str, path: str, *, headers=None, **kwargs) -> requests.Response:
        return requests.request(method, self.url(path), headers={**self.clinician, **(headers or {})},
                                timeout=120, **kwargs)

    def upload(self, data: bytes, **kwargs) -> requests.Response:
        return upload(self.stack, self.clinician, self.patient, data, **kwargs)

    def form(self, files: dict, data: dict, path: str | None = None) -> requests.Response:
        return self.call("POST", path or f"/patients/{self.patient}/screenings", files=files, data=data)

    def raw(self, method: str, path: str, body: bytes | str, content_type: str) -> requests.Response:
        return self.call(method, path, data=body, headers={"Content-Type": content_type})


@dataclass
class Case:
    id: str
    send: Callable[[Ctx], requests.Response]
    status: int
    code: str | None = None  # the error code; for 201 screenings the screening status
    check: Callable[[Ctx, requests.Response], None] | None = None


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header claims width x height."""
    data = bytearray(im.encode(Image.new("RGB", (64, 64), (180, 80, 30))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def cursor(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def multipart(fields: dict) -> tuple[bytes, str]:
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata(fields)


def chunked_upload(ctx: Ctx, size: int) -> requests.Response:
    """An upload sent with Transfer-Encoding: chunked (no Content-Length to refuse up front)."""
    body, content_type = multipart({"eye": "left", "image": ("big.jpg", jpeg(seed=1) + b"\0" * size, "image/jpeg")})
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    return ctx.call("POST", f"/patients/{ctx.patient}/screenings", data=chunks,
                    headers={"Content-Type": content_type})


def same_name(expected: str):
    def check(ctx: Ctx, response):
        assert response.json()["name"] == expected
        stored = ctx.call("GET", f"/patients/{response.json()['id']}").json()
        assert stored["name"] == expected

    return check


def key_is_uuid(ctx: Ctx, response):
    sid = response.json()["id"]
    keys = {o["Key"] for o in ctx.stack.s3.client().list_objects_v2(
        Bucket=ctx.stack.bucket, Prefix=f"screenings/{sid}").get("Contents", [])}
    assert keys == {f"screenings/{sid}"}


def returns_json_not_html(ctx: Ctx, response):
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    same_name("<script>alert('x')</script>")(ctx, response)


def table_survives(ctx: Ctx, response):
    same_name("Robert'); DROP TABLE patient;--")(ctx, response)
    assert ctx.call("GET", "/patients", params={"limit": 1}).status_code == 200


def small():
    return im.fundus_like((160, 120))


def photo(img: Image.Image, fmt: str = "JPEG") -> bytes:
    return im.encode(img, fmt)


P = "/patients/{patient}"
S = "/patients/{patient}/screenings/{screening}"
NOBODY = "00000000-0000-4000-8000-000000000000"


def path(template: str):
    return lambda ctx: template.format(patient=ctx.patient, screening=ctx.screening)


def get(template: str, **params):
    return lambda ctx: ctx.call("GET", path(template)(ctx), params=params)


def post_json(template: str, body, method: str = "POST", headers=None):
    return lambda ctx: ctx.call(method, path(template)(ctx), json=body, headers=headers)


def raw(template: str, body, content_type="application/json", method="POST"):
    return lambda ctx: ctx.raw(method, path(template)(ctx), body, content_type)


def up(data_fn, **kwargs):
    return lambda ctx: ctx.upload(data_fn() if callable(data_fn) else data_fn, **kwargs)


CASES = [
    # --- image bytes that are not a usable photograph
    Case("zero_byte_jpeg", up(b""), 422, "empty_image"),
    Case("text_named_jpg", up(b"this is not a photograph\n" * 20), 415, "unsupported_media_type"),
    Case("pdf_named_jpg", up(im.MINIMAL_PDF), 415, "unsupported_media_type"),
    Case("html_named_jpg", up(b"<!DOCTYPE html><html><body>hello</body></html>"), 415, "unsupported_media_type"),
    Case("svg_named_jpg", up(b'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="900"/>'), 415,
         "unsupported_media_type"),
    Case("json_named_jpg", up(b'{"grade": 0}'), 415, "unsupported_media_type"),
    Case("elf_binary_named_jpg", up(b"\x7fELF\x02\x01\x01" + b"\0" * 200), 415, "unsupported_media_type"),
    # A readable header passes the API's check; TorchServe decodes the pixels and its code comes back
    # (the upload is removed). Only when TorchServe is down does the API decode them itself.
    Case("truncated_jpeg_half", up(im.truncated_jpeg), 422, "truncated_image"),
    Case("truncated_jpeg_90pct", up(lambda: im.truncated_jpeg(keep=0.9)), 422, "truncated_image"),
    Case("jpeg_header_only", up(lambda: photo(small())[:200]), 422, "undecodable_image"),
    Case("jpeg_soi_then_garbage", up(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8), 422, "undecodable_image"),
    Case("truncated_png", up(lambda: photo(small(), "PNG")[:2000], filename="eye.png"), 422, "truncated_image"),
    Case("truncated_tiff", up(lambda: photo(small(), "TIFF")[:3000], filename="eye.tif"), 422, "truncated_image"),
    Case("png_bomb_40000x40000", up(im.png_bomb), 422, "image_too_large"),
    Case("png_bomb_10000x10000", up(lambda: im.png_bomb(10000, 10000)), 422, "image_too_large"),
    Case("png_bomb_9000x9000", up(lambda: im.png_bomb(9000, 9000)), 422, "image_too_large"),
    Case("jpeg_header_40000x40000", up(lambda: jpeg_claiming(40000, 40000)), 422, "image_too_large"),
    Case("png_1x1", up(lambda: photo(Image.new("RGB", (1, 1)), "PNG")), 422, "image_too_small"),
    Case("jpeg_1x1", up(lambda: photo(Image.new("RGB", (1, 1)))), 422, "image_too_small"),
    Case("jpeg_63x63", up(lambda: photo(Image.new("RGB", (63, 63)))), 422, "image_too_small"),
    Case("jpeg_2000x10_strip", up(lambda: photo(Image.new("RGB", (2000, 10)))), 422, "image_too_small"),
    Case("animated_gif", up(im.animated_gif, filename="eye.gif"), 415, "unsupported_media_type"),
    Case("bmp", up(lambda: photo(small(), "BMP")), 415, "unsupported_media_type"),
    Case("webp", up(lambda: photo(small(), "WEBP")), 415, "unsupported_media_type"),
    # --- awkward but valid images: stored and answered (tiny ones end up ungradable)
    Case("cmyk_jpeg_valid", up(lambda: photo(im.fundus_like((640, 480)).convert("CMYK"))), 201),
    Case("grayscale_jpeg_valid", up(lambda: photo(small().convert("L"))), 201),
    Case("png_16bit_valid", up(im.png16, filename="eye.png"), 201),
    Case("palette_png_valid", up(lambda: photo(small().convert("P"), "PNG")), 201),
    Case("rgba_png_valid", up(lambda: photo(small().convert("RGBA"), "PNG")), 201),
    Case("multipage_tiff_valid", up(im.multipage_tiff, filename="eye.tiff"), 201),
    Case("exif_rotated_jpeg_valid", up(im.exif_rotated_jpeg), 201),
    Case("progressive_jpeg_valid", up(lambda: im.encode(im.fundus_like((640, 480)), progressive=True)), 201,
         "graded"),
    Case("jpeg_with_trailing_bytes_valid", up(lambda: jpeg(seed=3) + b"trailing data"), 201, "graded"),
    # --- photographs that are not of a retina: graded as ungradable, not rejected
    Case("landscape_photo_ungradable", up(lambda: photo(im.ordinary_photo())), 201, "ungradable"),
    Case("porthole_photo_ungradable", up(lambda: photo(im.ordinary_photo(porthole=True))), 201, "ungradable"),
    Case("document_scan_ungradable", up(lambda: photo(im.document_page())), 201, "ungradable"),
    Case("black_frame_ungradable", up(lambda: photo(im.blank_frame())), 201, "ungradable"),
    Case("white_frame_ungradable", up(lambda: photo(im.blank_frame(value=255))), 201, "ungradable"),
    Case("blurred_fundus_ungradable", up(lambda: photo(im.blurred(im.fundus_like((640, 480)), 0.03))), 201,
         "ungradable"),
    Case("dark_fundus_ungradable", up(lambda: photo(im.darkened(im.fundus_like((640, 480))))), 201, "ungradable"),
    # --- the multipart request itself
    Case("declared_text_plain_but_jpeg_valid", up(lambda: jpeg(seed=4), content_type="text/plain"), 201, "graded"),
    Case("declared_jpeg_but_pdf", up(im.MINIMAL_PDF, content_type="image/jpeg"), 415, "unsupported_media_type"),
    Case("json_body_instead_of_multipart", post_json(P + "/screenings", {"eye": "left", "image": "aGk="}), 422,
         "invalid_request"),
    Case("raw_jpeg_body", raw(P + "/screenings", b"\xff\xd8\xff" + b"\0" * 100, "image/jpeg"), 422,
         "invalid_request"),
    Case("image_field_missing", lambda c: c.form({}, {"eye": "left"}), 422, "invalid_request"),
    Case("image_as_text_field", lambda c: c.form({}, {"eye": "left", "image": "not a file"}), 422,
         "invalid_request"),
    Case("eye_missing", lambda c: c.form({"image": ("e.jpg", jpeg(seed=5))}, {}), 422, "eye_required"),
    Case("eye_both", up(lambda: jpeg(seed=5), eye="both"), 422, "invalid_request"),
    Case("eye_uppercase", up(lambda: jpeg(seed=5), eye="LEFT"), 422, "invalid_request"),
    Case("eye_empty", up(lambda: jpeg(seed=5), eye=""), 422, "invalid_request"),
    Case("eye_sql_injection", up(lambda: jpeg(seed=5), eye="left' OR '1'='1"), 422, "invalid_request"),
    Case("unknown_form_field", up(lambda: jpeg(seed=5), grade="0"), 422, "invalid_request"),
    Case("captured_at_future", up(lambda: jpeg(seed=5), captured_at="2999-01-01T00:00:00Z"), 422, "invalid_request"),
    Case("captured_at_not_a_date", up(lambda: jpeg(seed=5), captured_at="yesterday"), 422, "invalid_request"),
    Case("camera_201_chars", up(lambda: jpeg(seed=5), camera="c" * 201), 422, "invalid_request"),
    Case("camera_with_nul", up(lambda: jpeg(seed=5), camera="Topcon\x00NW8"), 422, "invalid_request"),
    Case("camera_unicode_valid", up(lambda: jpeg(seed=6), camera="Topcon ТРЦ 眼底 📷"), 201, "graded",
         lambda c, r: r.json()["camera"] == "Topcon ТРЦ 眼底 📷" or pytest.fail(r.text)),
    Case("filename_path_traversal_valid", up(lambda: jpeg(seed=7), filename="../../../../etc/passwd.jpg"), 201,
         "graded", key_is_uuid),
    Case("filename_absolute_path_valid", up(lambda: jpeg(seed=8), filename="/var/lib/clarity/x.jpg"), 201, "graded",
         key_is_uuid),
    Case("filename_unicode_script_valid", up(lambda: jpeg(seed=9), filename="<script>été 👁.jpg"), 201, "graded",
         key_is_uuid),
    Case("body_over_limit_content_length",
         up(lambda: jpeg(seed=1) + b"\0" * (LIMIT + 128 * 1024)), 413, "payload_too_large"),
    Case("image_over_limit_within_body_allowance", up(lambda: jpeg(seed=1) + b"\0" * LIMIT), 413,
         "payload_too_large"),
    Case("body_over_limit_chunked", lambda c: chunked_upload(c, LIMIT + 128 * 1024), 413, "payload_too_large"),
    Case("idempotency_key_with_space", up(lambda: jpeg(seed=5), idempotency_key="visit 1"), 400,
         "invalid_idempotency_key"),
    Case("idempotency_key_256_chars", up(lambda: jpeg(seed=5), idempotency_key="k" * 256), 400,
         "invalid_idempotency_key"),
    Case("idempotency_key_latin1", lambda c: c.upload(jpeg(seed=5), idempotency_key="clé".encode().decode("latin-1")),
         400, "invalid_idempotency_key"),
    Case("idempotency_key_reused_for_other_image",
         lambda c: (c.upload(jpeg(seed=10), idempotency_key="corpus-reuse"),
                    c.upload(jpeg(seed=11), idempotency_key="corpus-reuse"))[1], 409, "idempotency_key_reused"),
    Case("upload_unknown_patient", lambda c: upload(c.stack, c.clinician, NOBODY, jpeg(seed=5)), 404,
         "patient_not_found"),
    Case("upload_malformed_patient_uuid", lambda c: upload(c.stack, c.clinician, "12345", jpeg(seed=5)), 404,
         "not_found"),
    # --- patients (JSON)
    Case("name_missing", post_json("/patients", {"sex": "female"}), 422, "invalid_request"),
    Case("name_empty", post_json("/patients", {"name": ""}), 422, "invalid_request"),
    Case("name_whitespace_only", post_json("/patients", {"name": "   "}), 422, "invalid_request"),
    Case("name_201_chars", post_json("/patients", {"name": "n" * 201}), 422, "invalid_request"),
    Case("name_200_chars_valid", post_json("/patients", {"name": "n" * 200}), 201, None, same_name("n" * 200)),
    Case("name_number", post_json("/patients", {"name": 12345}), 422, "invalid_request"),
    Case("name_null", post_json("/patients", {"name": None}), 422, "invalid_request"),
    Case("name_object", post_json("/patients", {"name": {"first": "A"}}), 422, "invalid_request"),
    Case("name_with_nul", post_json("/patients", {"name": "Ada\u0000Lovelace"}), 422, "invalid_request"),
    Case("name_with_control_chars", post_json("/patients", {"name": "Ada\u001b[31mRed"}), 422, "invalid_request"),
    Case("name_unicode_valid", post_json("/patients", {"name": "Zoë Łukasiewicz-李小龍 👁‍🗨"}), 201, None,
         same_name("Zoë Łukasiewicz-李小龍 👁‍🗨")),
    Case("name_right_to_left_valid", post_json("/patients", {"name": "مريم العربية"}), 201, None,
         same_name("مريم العربية")),
    Case("name_sql_like_valid", post_json("/patients", {"name": "Robert'); DROP TABLE patient;--"}), 201, None,
         table_survives),
    Case("name_script_like_valid", post_json("/patients", {"name": "<script>alert('x')</script>"}), 201, None,
         returns_json_not_html),
    Case("birth_date_impossible", post_json("/patients", {"name": "A", "birth_date": "1961-13-45"}), 422,
         "invalid_request"),
    Case("birth_date_future", post_json("/patients", {"name": "A", "birth_date": "2999-01-01"}), 422,
         "invalid_request"),
    Case("birth_date_before_1900", post_json("/patients", {"name": "A", "birth_date": "1899-12-31"}), 422,
         "invalid_request"),
    Case("birth_date_number", post_json("/patients", {"name": "A", "birth_date": 19610304}), 422, "invalid_request"),
    Case("sex_unknown_value", post_json("/patients", {"name": "A", "sex": "yes"}), 422, "invalid_request"),
    Case("mrn_65_chars", post_json("/patients", {"name": "A", "medical_record_number": "M" * 65}), 422,
         "invalid_request"),
    Case("mrn_duplicate", lambda c: c.call("POST", "/patients", json=phi_patient("corpus")), 409,
         "duplicate_medical_record_number"),
    Case("unknown_json_field", post_json("/patients", {"name": "A", "ssn": "123-45-6789"}), 422, "invalid_request"),
    Case("malformed_json", raw("/patients", '{"name": "A",'), 400, "invalid_request"),
    Case("json_array_body", raw("/patients", "[]"), 422, "invalid_request"),
    Case("json_string_body", raw("/patients", '"A"'), 422, "invalid_request"),
    Case("empty_json_body", raw("/patients", ""), 422, "invalid_request"),
    # Within the 64 KiB JSON limit, deep enough to exhaust json.loads' recursion.
    Case("deeply_nested_json", raw("/patients", "[" * 30_000 + "]" * 30_000), 400, "invalid_request"),
    Case("json_body_as_text_plain", raw("/patients", '{"name": "A"}', "text/plain"), 415, "unsupported_media_type"),
    Case("json_over_size_limit", raw("/patients", json.dumps({"name": "A" * (LIMIT + 128 * 1024)})), 413,
         "payload_too_large"),
    Case("patch_empty", post_json(P, {}, method="PATCH"), 422, "invalid_request"),
    Case("patch_name_null", post_json(P, {"name": None}, method="PATCH"), 422, "invalid_request"),
    Case("patch_unknown_patient", post_json(f"/patients/{NOBODY}", {"sex": "male"}, method="PATCH"), 404,
         "patient_not_found"),
    # --- ids in URLs
    Case("patient_malformed_uuid", get("/patients/not-a-uuid"), 404, "not_found"),
    Case("patient_uuid_with_sql", get("/patients/1' OR '1'='1"), 404, "not_found"),
    Case("patient_unknown_uuid", get(f"/patients/{NOBODY}"), 404, "patient_not_found"),
    Case("screening_unknown_uuid", get(P + f"/screenings/{NOBODY}"), 404, "screening_not_found"),
    Case("screening_malformed_uuid", get(P + "/screenings/42"), 404, "not_found"),
    Case("image_of_unknown_screening", get(P + f"/screenings/{NOBODY}/image"), 404, "screening_not_found"),
    Case("url_path_traversal", lambda c: requests.get(f"{c.stack.url}/api/v1/patients/%2e%2e/%2e%2e/etc/passwd",
                                                      headers=c.clinician, timeout=30), 404, "not_found"),
    # --- pagination
    Case("limit_zero", get("/patients", limit=0), 422, "invalid_request"),
    Case("limit_101", get("/patients", limit=101), 422, "invalid_request"),
    Case("limit_negative", get("/patients", limit=-1), 422, "invalid_request"),
    Case("limit_not_a_number", get("/patients", limit="ten"), 422, "invalid_request"),
    Case("cursor_garbage", get("/patients", cursor="!!!not-base64!!!"), 400, "invalid_cursor"),
    Case("cursor_not_json", get("/patients", cursor=base64.urlsafe_b64encode(b"hello").decode()), 400,
         "invalid_cursor"),
    Case("cursor_wrong_types", get("/patients", cursor=cursor([1, 2])), 400, "invalid_cursor"),
    Case("cursor_uuid_not_a_string", get("/patients", cursor=cursor(["2024-01-01T00:00:00", 5])), 400,
         "invalid_cursor"),
    Case("cursor_wrong_length", get("/patients", cursor=cursor(["2024-01-01T00:00:00"])), 400, "invalid_cursor"),
    Case("cursor_201_chars", get("/patients", cursor="A" * 201), 422, "invalid_request"),
    Case("screenings_cursor_garbage", get(P + "/screenings", cursor="%%%"), 400, "invalid_cursor"),
    Case("audit_cursor_huge_int", lambda c: c.call("GET", "/audit-events", headers=c.admin,
                                                   params={"cursor": cursor([10 ** 30])}), 400, "invalid_cursor"),
    Case("audit_cursor_infinite", lambda c: c.call("GET", "/audit-events", headers=c.admin,
                                                   params={"cursor": base64.urlsafe_b64encode(b"[1e999]").decode()}),
         400, "invalid_cursor"),
    Case("audit_cursor_float", lambda c: c.call("GET", "/audit-events", headers=c.admin,
                                                params={"cursor": cursor([1.5])}), 400, "invalid_cursor"),
    Case("audit_unknown_query_parameter", lambda c: c.call("GET", "/audit-events", headers=c.admin,
                                                           params={"patient": c.patient}), 422, "invalid_request"),
    Case("audit_patient_id_malformed", lambda c: c.call("GET", "/audit-events", headers=c.admin,
                                                        params={"patient_id": "not-a-uuid"}), 422, "invalid_request"),
    # --- re-grade
    Case("regrade_version_path_traversal", post_json(S + "/grade", {"model_version": "../../etc"}), 422,
         "invalid_request"),
    Case("regrade_unknown_version_admin", lambda c: c.call("POST", path(S + "/grade")(c), headers=c.admin,
                                                           json={"model_version": "9.9"}), 422,
         "unknown_model_version"),
    Case("regrade_named_version_clinician", post_json(S + "/grade", {"model_version": "1.0"}), 403, "forbidden"),
    Case("regrade_malformed_json", raw(S + "/grade", "{"), 400, "invalid_request"),
    Case("regrade_unknown_field", post_json(S + "/grade", {"model": "1.0"}), 422, "invalid_request"),
    # --- methods and URLs
    Case("method_not_allowed", lambda c: c.call("PUT", "/patients"), 405, "method_not_allowed"),
    Case("unknown_url", get("/nowhere"), 404, "not_found"),
]


@pytest.fixture(scope="module")
def ctx(make_stack):
    stack = make_stack(name="bad-inputs", api_env={"MAX_UPLOAD_BYTES": str(LIMIT)})
    clinician, admin = stack.key("clinician"), stack.key("admin")
    patient = new_patient(stack, clinician, "corpus")
    first = upload(stack, clinician, patient, jpeg(seed=0))
    assert first.status_code == 201, first.text
    context = Ctx(stack, clinician, admin, patient, first.json()["id"])
    context.workers = sorted(stack.api.worker_pids())
    return context


def test_the_corpus_is_large_and_named_uniquely():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(ctx, case):
    response = case.send(ctx)
    assert response.status_code == case.status, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert response.headers["Content-Type"].startswith("application/json"), response.text[:300]
        error = response.json()["error"]
        assert error["code"] == case.code, error
        assert len(error["message"]) > 10 and error["request_id"] == response.headers["X-Request-ID"]
    elif response.status_code == 201 and "eye" in response.json():
        if case.code:
            assert response.json()["status"] == case.code, response.json()
        else:
            assert response.json()["status"] in ("graded", "ungradable"), response.json()
        if response.json()["status"] == "ungradable":
            assert response.json()["result"]["quality"]["reasons"], response.json()
    if case.check:
        case.check(ctx, response)


def test_still_serving_after_the_corpus(ctx):
    """The same workers that took the corpus answer /healthz and grade a good photograph, and
    nothing in gunicorn's access log was a 5xx."""
    assert sorted(ctx.stack.api.worker_pids()) == ctx.workers
    assert requests.get(f"{ctx.stack.url}/healthz", timeout=10).json() == {"status": "ok"}
    good = ctx.upload(jpeg(seed=99))
    assert good.status_code == 201 and good.json()["status"] == "graded", good.text
    statuses = [json.loads(line)["status"] for line in ctx.stack.api.log_path.read_text().splitlines()
                if line.startswith("{") and '"access"' in line]
    assert len(statuses) > len(CASES) and all(s < 500 for s in statuses), sorted(set(statuses))
