"""The PDF report of an exam, for the patient's chart (ReportLab).

This is the one place the API prints patient identity next to results: the chart needs it.
For each eye: its photographs as thumbnails with their quality verdicts, the Grad-CAM overlay
of the photograph that decided the eye's grade, the grade in ICDR words; then the outcome
and next step in the products' wording, and the model. A model trained on synthetic data gets
a red banner on top of every page and a line in every footer.
"""
from __future__ import annotations

import io
import logging
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageOps
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle
from xml.sax.saxutils import escape

from . import codes, explanation
from .errors import ApiError
from .models import Patient
from .outcome import ExamResult
from .storage import get_storage
from .torchserve import TorchServeUnavailable

log = logging.getLogger(__name__)

THUMB_PX = 360          # thumbnails are shrunk to this before embedding: the PDF stays small
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu")


def _fonts() -> tuple[str, str]:
    """DejaVu when installed (names in any script print), else the PDF's built-in Helvetica."""
    try:
        if "DejaVuSans" not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont("DejaVuSans", str(_DEJAVU / "DejaVuSans.ttf")))
            pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(_DEJAVU / "DejaVuSans-Bold.ttf")))
        return "DejaVuSans", "DejaVuSans-Bold"
    except Exception:
        return "Helvetica", "Helvetica-Bold"


def _styles():
    regular, bold = _fonts()
    base = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=base["BodyText"], fontName=regular, fontSize=9.5, leading=12)
    return {
        "title": ParagraphStyle("title", parent=body, fontName=bold, fontSize=16, leading=20),
        "h2": ParagraphStyle("h2", parent=body, fontName=bold, fontSize=12, leading=15, spaceBefore=6),
        "body": body,
        "small": ParagraphStyle("small", parent=body, fontSize=7.5, leading=9),
        "bold": ParagraphStyle("bold", parent=body, fontName=bold),
        "banner": ParagraphStyle("banner", parent=body, fontName=bold, fontSize=11, leading=14,
                                 textColor=colors.white, alignment=TA_CENTER),
        "outcome": ParagraphStyle("outcome", parent=body, fontName=bold, fontSize=12, leading=15),
        "fonts": (regular, bold),
    }


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _photograph(screening) -> bytes | None:
    try:
        return get_storage().get(screening.image_key, sha256=screening.image_sha256)
    except Exception as exc:  # a missing object must not cost the whole report
        log.warning("report photograph unavailable", extra={"screening_id": str(screening.id),
                                                           "error_type": type(exc).__name__})
        return None


def _thumbnail(data: bytes | None, width_mm: float) -> Image | None:
    if data is None:
        return None
    try:
        img = PILImage.open(io.BytesIO(data))
        img.draft("RGB", (THUMB_PX, THUMB_PX))
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((THUMB_PX, THUMB_PX))
    except Exception:
        return None
    return _flowable(img, width_mm)


def _flowable(img: PILImage.Image, width_mm: float) -> Image:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    out.seek(0)
    width = width_mm * mm
    return Image(out, width=width, height=width * img.height / img.width)


def _overlay(screening, data: bytes | None, width_mm: float) -> tuple[Image | None, str | None]:
    """(the Grad-CAM overlay, None) or (None, why it is missing)."""
    try:
        img = explanation.for_screening(screening, data, as_image=True)
    except TorchServeUnavailable:
        return None, "Grad-CAM overlay unavailable: the model server did not answer."
    except ApiError as exc:
        return None, f"Grad-CAM overlay unavailable: {exc.message}"
    except Exception as exc:
        log.warning("report overlay failed", extra={"screening_id": str(screening.id),
                                                   "error_type": type(exc).__name__})
        return None, "Grad-CAM overlay unavailable."
    img.thumbnail((900, 900))
    return _flowable(img, width_mm), None


def _photo_caption(screening, s) -> Paragraph:
    g = screening.latest_grading
    words = f"{codes.FIELD_WORDS.get(screening.field, screening.field)}; "
    if g is None:
        words += "grading pending"
    elif g.gradable:
        words += f"gradable; {escape(codes.ICDR_GRADES.get(g.grade, '-'))}"
    else:
        reasons = "; ".join(r.get("message") or r.get("code") for r in (g.quality or {}).get("reasons") or [])
        words += f"UNGRADABLE: {escape(reasons or 'quality too low')}"
    return Paragraph(words, s["small"])


def _eye_section(eye: str, result, s) -> list:
    parts = [Paragraph(codes.EYE_WORDS[eye], s["h2"])]
    if result.status == "graded":
        verdict = (f"Grade: <b>{escape(result.label)}</b> (ICDR {result.grade}); "
                   f"{'referable' if result.referable else 'not referable'}. Image quality: gradable.")
    elif result.status == "pending":
        verdict = "Grading pending: no gradable photograph yet."
    elif result.status == "missing":
        verdict = "No photograph of this eye was taken at this exam."
    else:
        verdict = "<b>Ungradable</b>: no photograph of this eye passed the quality check."
    if result.quality_reasons:
        verdict += " Quality problems: " + escape("; ".join((r.get("message") or r["code"]).rstrip(".")
                                                          for r in result.quality_reasons)) + "."
    parts.append(Paragraph(verdict, s["body"]))
    if not result.images:
        return parts
    photos = {screening.id: _photograph(screening) for screening in result.images}
    cells = [[_thumbnail(photos[sc.id], 38) or Paragraph("image unavailable", s["small"]), _photo_caption(sc, s)]
             for sc in result.images]
    rows = []
    for i in range(0, len(cells), 2):  # two thumbnails a row, each over its caption
        pair = cells[i:i + 2] + [["", ""]] * (2 - len(cells[i:i + 2]))
        rows += [[pair[0][0], pair[1][0]], [pair[0][1], pair[1][1]]]
    thumbs = Table(rows, colWidths=[41 * mm, 41 * mm], hAlign="LEFT")
    thumbs.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 1)]))
    right = []
    if result.deciding is not None:
        overlay, problem = _overlay(result.deciding, photos[result.deciding.id], 94)
        right = [overlay or Paragraph(escape(problem), s["body"]), Paragraph(
            f"Grad-CAM overlay of the photograph that decided this eye's grade "
            f"({codes.FIELD_WORDS.get(result.deciding.field)}): where the model looked, blue (low) to red (high).",
            s["small"])]
    layout = Table([[thumbs, right]], colWidths=[84 * mm, 96 * mm], hAlign="LEFT")
    layout.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    parts.append(KeepTogether([Spacer(1, 1 * mm), layout]))
    return parts


def _banner(text: str, s) -> Table:
    table = Table([[Paragraph(escape(text), s["banner"])]], colWidths=[180 * mm])
    table.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#b00020")),
                               ("BOX", (0, 0), (-1, -1), 2, colors.HexColor("#6d0014")),
                               ("TOPPADDING", (0, 0), (-1, -1), 6), ("BOTTOMPADDING", (0, 0), (-1, -1), 6)]))
    return table


def synthetic(result: ExamResult) -> bool:
    return bool(result.model and result.model.get("synthetic_training_data")) or any(
        s.latest_grading is not None and s.latest_grading.synthetic_training_data for s in result.images)


def render(patient: Patient, result: ExamResult) -> bytes:
    s = _styles()
    exam = result.exam
    warn = synthetic(result)
    banner_text = ("NOT FOR CLINICAL USE. The grading model was trained on synthetic images only; "
                   "these results must not be used to diagnose or treat anyone.")
    story = []
    if warn:
        story += [_banner(banner_text, s), Spacer(1, 4 * mm)]
    story.append(Paragraph("Diabetic retinopathy screening report", s["title"]))
    identity = [
        ["Patient", escape(patient.name), "Exam time", _when(exam.performed_at)],
        ["Birth date", patient.birth_date.isoformat() if patient.birth_date else "-",
         "Accession number", escape(exam.accession_number or "-")],
        ["Sex", patient.sex or "-", "Exam id", str(exam.id)],
        ["Medical record number", escape(patient.mrn or "-"), "Report made",
         _when(datetime.now(timezone.utc).replace(tzinfo=None))],
    ]
    table = Table([[Paragraph(c, s["bold"] if i % 2 == 0 else s["body"]) for i, c in enumerate(row)]
                   for row in identity], colWidths=[36 * mm, 54 * mm, 32 * mm, 58 * mm], hAlign="LEFT")
    table.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
                               ("VALIGN", (0, 0), (-1, -1), "TOP")]))
    story += [Spacer(1, 2 * mm), table, Spacer(1, 4 * mm)]

    outcome_table = Table([[Paragraph(f"Outcome: {escape(result.message)}", s["outcome"])]], colWidths=[180 * mm])
    shade = {"refer": "#fde2e1", "retake": "#fff4cc", "pending": "#e8eaf6"}.get(result.outcome, "#e3f4e1")
    outcome_table.setStyle(TableStyle([("BACKGROUND", (0, 0), (-1, -1), colors.HexColor(shade)),
                                       ("BOX", (0, 0), (-1, -1), 1, colors.black)]))
    story += [outcome_table, Paragraph(f"Source: {escape(codes.OUTCOME_SOURCE)}.", s["small"])]

    for eye in ("right", "left"):  # ophthalmic convention: right eye first
        story += _eye_section(eye, result.eyes[eye], s)

    story.append(Paragraph("Model", s["h2"]))
    if result.model:
        model = result.model
        story.append(Paragraph(
            f"{escape(model['name'])} version {escape(model['version'])}; trained on "
            f"{'SYNTHETIC images (not for clinical use)' if model['synthetic_training_data'] else 'real images'}.",
            s["body"]))
    else:
        story.append(Paragraph("No photograph has been graded yet.", s["body"]))
    if result.disclaimer:
        story.append(Paragraph(escape(result.disclaimer), s["body"]))
    if warn:
        story += [Spacer(1, 4 * mm), _banner(banner_text, s)]

    regular, bold = s["fonts"]

    def decorate(canvas, doc):
        canvas.saveState()
        if warn:
            canvas.setFillColor(colors.HexColor("#b00020"))
            canvas.setFont(bold, 8.5)
            canvas.drawCentredString(A4[0] / 2, 10 * mm,
                                     "NOT FOR CLINICAL USE: model trained on synthetic data only.")
        canvas.setFillColor(colors.grey)
        canvas.setFont(regular, 7.5)
        canvas.drawRightString(A4[0] - 15 * mm, 6 * mm, f"Clarity in Care - exam {exam.id} - page {doc.page}")
        canvas.restoreState()

    out = io.BytesIO()
    doc = SimpleDocTemplate(out, pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=14 * mm,
                            bottomMargin=18 * mm, title="Diabetic retinopathy screening report",
                            author="Clarity in Care", subject=f"exam {exam.id}", invariant=False)
    doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return out.getvalue()
