"""DICOM Part 10 photographs: what the upload route and the C-STORE receiver need from a file.

`read(data)` checks a Part 10 file and returns a `DicomImage`: the eye, capture time and camera
from the header, the UIDs that group and deduplicate it, the patient identifiers (for matching
only; they are never logged and never repr'd), and `model_input()`: the bytes TorchServe grades.

Where DICOM becomes pixels, and why: here in the API, not in the TorchServe handler. The handler
decodes JPEG, PNG and TIFF under its own limits and quality gate (handlers/fundus.py); keeping
pydicom out of the .mar keeps the model server small and its input contract unchanged.
- JPEG Baseline (what fundus cameras write): the frame is a complete JPEG stream, sent as it is.
  No decode and no re-encode here; TorchServe decodes it once, as it would an uploaded JPEG.
- Native (explicit/implicit VR little endian), RLE and JPEG 2000: pydicom (with the pylibjpeg
  plugins) decodes the pixels and they are re-encoded losslessly as PNG.
The stored object is always the original DICOM bytes; `model_input()` is recomputed from them
whenever a photograph is graded (upload, re-grade, `flask grade-pending`, the receiver).

Every refusal is an ApiError with its own code; `DICOM_STATUS` maps those codes to C-STORE
failure statuses for the receiver. Messages name SOP classes and transfer syntaxes (public
UIDs), never a value that identifies a patient.
"""
from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as uids
from pydicom.valuerep import DA, DT, TM

from handlers import image_limits

from . import images
from .errors import ApiError

CONTENT_TYPE = "application/dicom"

# pydicom logs (and warns) about malformed elements, and such messages can quote an element's
# value: a patient's name or ID must not reach the logs that way. Only its errors pass.
logging.getLogger("pydicom").setLevel(logging.ERROR)

# Colour photographs the model can grade. OP 8 bit is what fundus cameras write; VL Photographic
# and Secondary Capture are what some sites' cameras and capture stations write instead.
SOP_CLASSES = (
    uids.OphthalmicPhotography8BitImageStorage,
    uids.VLPhotographicImageStorage,
    uids.SecondaryCaptureImageStorage,
)
JPEG_BASELINE = uids.JPEGBaseline8Bit
TRANSFER_SYNTAXES = (
    JPEG_BASELINE,
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.RLELossless,
)
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
EYES = {"L": "left", "R": "right"}
SEXES = {"F": "female", "M": "male", "O": "other"}

# ApiError code -> C-STORE failure status (PS3.4 C.4.2.1.4: A7xx out of resources, A9xx data set
# does not match SOP class, Cxxx cannot understand). The code itself goes in ErrorComment.
DICOM_STATUS = {
    "unsupported_sop_class": 0x0122,
    "unsupported_transfer_syntax": 0xA900,
    "dicom_unreadable": 0xC000,
    "dicom_truncated": 0xC001,
    "dicom_no_pixel_data": 0xC002,
    "dicom_bit_depth": 0xA901,
    "dicom_multi_frame": 0xA902,
    "dicom_photometric": 0xA903,
    "image_too_large": 0xA904,
    "image_too_small": 0xA905,
    "dicom_frame_mismatch": 0xC003,
    "undecodable_image": 0xC004,
    "dicom_missing_uid": 0xA906,
    "dicom_missing_patient_id": 0xA907,
    "laterality_missing": 0xA908,
}


class PatientHeader:
    """The header's patient identifiers. Used to find or create the patient, never printed:
    repr() and str() show nothing, so an accidental log line carries no PHI."""

    __slots__ = ("patient_id", "name", "birth_date", "sex", "accession_number")

    def __init__(self, patient_id, name, birth_date, sex, accession_number):
        self.patient_id, self.name, self.birth_date = patient_id, name, birth_date
        self.sex, self.accession_number = sex, accession_number

    def __repr__(self) -> str:
        return "PatientHeader(<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True)
class DicomImage:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    transfer_syntax: str
    width: int
    height: int
    eye: str | None
    captured_at: datetime | None
    camera: str | None
    patient: PatientHeader = field(repr=False)
    _frame: bytes | None = field(default=None, repr=False)  # JPEG Baseline: the frame as sent
    _pixels: np.ndarray | None = field(default=None, repr=False)  # other syntaxes: RGB uint8

    def model_input(self) -> tuple[bytes, str]:
        """(bytes, content type) for TorchServe: the JPEG frame, or the pixels as lossless PNG."""
        if self._frame is not None:
            return self._frame, "image/jpeg"
        buf = io.BytesIO()
        # compress_level 1: a 10 MP PNG in ~0.5 s instead of ~3 s at the default level, a bit larger.
        Image.fromarray(self._pixels, "RGB").save(buf, "PNG", compress_level=1)
        return buf.getvalue(), "image/png"


def looks_like_dicom(data: bytes) -> bool:
    """The Part 10 preamble: 128 bytes, then `DICM`."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _fail(status: int, code: str, message: str):
    raise ApiError(status, code, message)


def _uid_name(value) -> str:
    value = str(value or "")
    name = uids.UID(value).name if value else ""
    return f"{name} ({value})" if name and name != value else (value or "none")


def read(data: bytes, *, check_pixels: bool = True) -> DicomImage:
    """Check one Part 10 file; ApiError (415/422) with a specific code for anything unusable.

    `check_pixels`: for JPEG Baseline, decode the frame at 1/8 scale so a truncated or corrupt
    frame is refused now (the receiver must not answer success for a file no one can grade).
    Other syntaxes are always decoded here: their pixels are needed for the PNG anyway."""
    if not looks_like_dicom(data):
        _fail(415, "unsupported_media_type", "This is not a DICOM Part 10 file (no DICM preamble).")
    try:
        # pydicom reads a cut file without raising: it warns and returns what it found, so its
        # warnings are what tell a truncated file from one that simply lacks an element.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
            for elem in ds.iterall():  # parse every element now, while warnings are caught
                pass
        if any("end of file" in str(w.message).lower() or "truncat" in str(w.message).lower() for w in caught):
            raise EOFError
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "")
        syntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
    except (EOFError, OSError, struct.error):
        _fail(422, "dicom_truncated", "The DICOM file ends early (truncated).")
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any parser failure is the file's fault
        _fail(422, "dicom_unreadable", f"The DICOM file cannot be read ({type(exc).__name__}).")
    if sop_class not in SOP_CLASSES:
        _fail(415, "unsupported_sop_class",
              f"SOP class {_uid_name(sop_class)} is not accepted; send Ophthalmic Photography 8 Bit, "
              "VL Photographic or Secondary Capture colour images.")
    if syntax not in TRANSFER_SYNTAXES:
        _fail(415, "unsupported_transfer_syntax",
              f"Transfer syntax {_uid_name(syntax)} is not accepted; send JPEG Baseline, explicit or "
              "implicit VR little endian, JPEG 2000 or RLE.")
    try:
        if "PixelData" not in ds:
            _fail(422, "dicom_no_pixel_data", "The DICOM file has no pixel data.")
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits, samples = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel") or 1)
        photometric = str(ds.get("PhotometricInterpretation") or "")
    except ApiError:
        raise
    except (EOFError, OSError):
        _fail(422, "dicom_truncated", "The DICOM file ends early (truncated).")
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        _fail(422, "dicom_unreadable", f"The image attributes cannot be read ({type(exc).__name__}).")
    if frames != 1:
        _fail(422, "dicom_multi_frame", f"The file holds {frames} frames; send one photograph per file.")
    if bits != 8:
        _fail(422, "dicom_bit_depth", f"{bits}-bit pixels are not accepted; the model grades 8-bit colour photographs.")
    if samples != 3 or photometric not in COLOUR:
        _fail(422, "dicom_photometric", f"Photometric interpretation {photometric or 'none'} with {samples} "
              "sample(s) per pixel is not accepted; the model grades colour (RGB or YBR) photographs.")
    if problem := image_limits.size_problem(columns, rows):
        _fail(image_limits.SIZE_STATUS, *problem)

    frame = pixels = None
    if syntax == JPEG_BASELINE:
        frame = _jpeg_frame(ds, rows, columns, check_pixels)
    else:
        pixels = _decode(ds, rows, columns)
    for name in ("SOPInstanceUID", "StudyInstanceUID"):
        if not ds.get(name):
            _fail(422, "dicom_missing_uid", f"The header has no {name}.")
    return DicomImage(
        sop_class_uid=sop_class, sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID), transfer_syntax=syntax, width=columns, height=rows,
        eye=_eye(ds), captured_at=_captured_at(ds), camera=_camera(ds), patient=_patient(ds),
        _frame=frame, _pixels=pixels)


def _jpeg_frame(ds, rows: int, columns: int, check_pixels: bool) -> bytes:
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, EOFError, OSError, struct.error):
        _fail(422, "dicom_truncated", "The encapsulated pixel data ends early (truncated).")
    if frame.endswith(b"\xff\xd9\x00"):  # DICOM pads fragments to an even length
        frame = frame[:-1]
    # The frame goes through the same header checks as an uploaded JPEG, so a frame whose own
    # size is a decompression bomb is refused before anything decodes it.
    try:
        info = images.inspect(frame)
    except ApiError as exc:
        if exc.code == "unsupported_media_type":
            _fail(422, "undecodable_image", "The pixel data is not a JPEG stream.")
        raise
    if info.format != "JPEG":
        _fail(422, "undecodable_image", "The pixel data is not a JPEG stream.")
    if (info.width, info.height) != (columns, rows):
        _fail(422, "dicom_frame_mismatch",
              f"The JPEG frame is {info.width}x{info.height} but the header says {columns}x{rows}.")
    if check_pixels:
        images.verify_decodable(frame, info)
    return frame


def _decode(ds, rows: int, columns: int) -> np.ndarray:
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = rows * columns * 3
        if len(ds.PixelData) < expected:
            _fail(422, "dicom_truncated", f"The pixel data holds {len(ds.PixelData)} bytes, not {expected}.")
    try:
        # Native YBR_FULL and JPEG 2000's YBR_ICT/RCT come back as RGB; RLE YBR_FULL is converted.
        array = ds.pixel_array
        if str(ds.PhotometricInterpretation) in ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420"):
            array = pydicom.pixels.convert_color_space(array, str(ds.PhotometricInterpretation), "RGB")
    except (ValueError, RuntimeError, EOFError, OSError, NotImplementedError) as exc:
        _fail(422, "undecodable_image", f"The pixel data cannot be decoded ({type(exc).__name__}).")
    if array.shape != (rows, columns, 3):
        _fail(422, "dicom_frame_mismatch", f"The pixel data decodes to {array.shape}, not {rows}x{columns}x3.")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _text(ds, name: str) -> str:
    value = ds.get(name)
    return str(value).strip() if value not in (None, "") else ""


def _eye(ds) -> str | None:
    for name in ("ImageLaterality", "Laterality"):
        value = _text(ds, name).upper()
        if value in EYES:
            return EYES[value]
    return None  # absent, B (both) or U (unpaired): the header does not say which eye


def _captured_at(ds) -> datetime | None:
    """AcquisitionDateTime, else ContentDate + ContentTime; naive UTC. A value without an offset
    is taken as UTC, as a form `captured_at` without one is. Unparseable values are ignored."""
    try:
        if _text(ds, "AcquisitionDateTime"):
            return _utc(DT(_text(ds, "AcquisitionDateTime")))
        if _text(ds, "ContentDate"):
            day = DA(_text(ds, "ContentDate"))
            time = TM(_text(ds, "ContentTime")) if _text(ds, "ContentTime") else None
            moment = datetime.combine(day, time) if time is not None else datetime(day.year, day.month, day.day)
            return _utc(moment)
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return datetime(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
                    moment.microsecond)


def _camera(ds) -> str | None:
    camera = " ".join(p for p in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if p)
    return camera[:200] or None


def _patient(ds) -> PatientHeader:
    name = ds.get("PatientName")
    if name:
        parts = [name.given_name, name.middle_name, name.family_name]
        name = " ".join(p for p in parts if p) or str(name).replace("^", " ").strip()
    birth = None
    if _text(ds, "PatientBirthDate"):
        try:
            day = DA(_text(ds, "PatientBirthDate"))
            birth = day if day is None else datetime(day.year, day.month, day.day).date()
        except (ValueError, TypeError):
            birth = None
    return PatientHeader(_text(ds, "PatientID") or None, name or None, birth,
                         SEXES.get(_text(ds, "PatientSex").upper(), "unknown" if _text(ds, "PatientSex") else None),
                         _text(ds, "AccessionNumber") or None)


@dataclass(frozen=True)
class Photo:
    """What an upload route records for one photograph, whether it came as DICOM or not."""
    content_type: str
    eye: str
    captured_at: datetime | None
    camera: str | None
    dicom: DicomImage | None = field(default=None, repr=False)


def is_dicom_upload(data: bytes, mimetype: str | None) -> bool:
    return looks_like_dicom(data) or (mimetype or "").lower() == CONTENT_TYPE


def photo_from_upload(data: bytes, mimetype: str | None, form: dict, patient) -> Photo:
    """The photograph's eye, time and camera: from the DICOM header when it is DICOM (a form
    `eye` must agree with it), from the form otherwise. `patient` is the patient of the URL; a
    header PatientID that differs from the patient's record number is refused (wrong patient)."""
    if not is_dicom_upload(data, mimetype):
        info = images.inspect(data)
        if not form.get("eye"):
            _fail(422, "eye_required", "Say which eye the photograph shows: eye=left or eye=right.")
        return Photo(info.content_type, form["eye"], form.get("captured_at"), form.get("camera"))
    image = read(data)
    if image.eye and form.get("eye") and form["eye"] != image.eye:
        _fail(422, "eye_contradicts_header",
              f"The form says eye={form['eye']} but the DICOM header's laterality says {image.eye}.")
    eye = image.eye or form.get("eye")
    if not eye:
        _fail(422, "laterality_missing",
              "The DICOM header has no ImageLaterality or Laterality (L or R); send eye=left or eye=right.")
    mrn = getattr(patient, "mrn", None)
    if mrn and image.patient.patient_id and image.patient.patient_id != mrn:
        _fail(422, "patient_mismatch", "The DICOM header's PatientID is not this patient's record number.")
    return Photo(CONTENT_TYPE, eye, form.get("captured_at") or image.captured_at,
                 form.get("camera") or image.camera, image)
