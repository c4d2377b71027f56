"""DICOM test files, made in the tests with pydicom from the sample photographs or synthetic
pictures: no patient data is committed. The identifiers are fake but PHI-shaped, so the tests
can grep every log for them.

`op_file(jpeg, ...)` -> Part 10 bytes of an Ophthalmic Photography 8 Bit image (JPEG Baseline
frame encapsulated as it is, or native / RLE / JPEG 2000 pixels). `bad_dicom()` -> the bad files
the API and the receiver must refuse, by the error code each must get.
"""
from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import pytest
from PIL import Image
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate

from tests.support.images import encode, fundus_like

# PHI-shaped values no log may contain (tests grep for them).
PATIENT_ID = "MRN-DCM-4711"
PATIENT_NAME = "Testpatient^Dicomina"
BIRTH_DATE = "19580214"
ACCESSION = "ACC-DCM-0815"
PHI_VALUES = (PATIENT_ID, "Testpatient", "Dicomina", BIRTH_DATE, ACCESSION)


def op_dataset(rows: int, columns: int, *, laterality="L", patient_id=PATIENT_ID, study_uid=None,
               sop_uid=None, sop_class=uids.OphthalmicPhotography8BitImageStorage, syntax=uids.JPEGBaseline8Bit,
               photometric="YBR_FULL_422", acquisition="20260315101112", camera=("Topcon", "TRC-NW400")) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or uids.generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or uids.generate_uid()
    ds.SeriesInstanceUID = uids.generate_uid()
    ds.Modality = "OP"
    ds.PatientID = patient_id
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION
    ds.StudyDate, ds.StudyTime = "20260315", "100000"
    if laterality:
        ds.ImageLaterality = laterality
    if acquisition:
        ds.AcquisitionDateTime = acquisition
    ds.ContentDate, ds.ContentTime = "20260315", "101500"
    ds.Manufacturer, ds.ManufacturerModelName = camera
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01" if syntax == uids.JPEGBaseline8Bit else "00"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    implicit = ds.file_meta.TransferSyntaxUID == uids.ImplicitVRLittleEndian
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def op_file(jpeg: bytes, syntax=uids.JPEGBaseline8Bit, **kw) -> bytes:
    """An OP file holding this JPEG photograph: its bytes as the frame (JPEG Baseline), or its
    decoded pixels (native, RLE, JPEG 2000)."""
    with Image.open(io.BytesIO(jpeg)) as img:
        width, height = img.size
        pixels = None if syntax == uids.JPEGBaseline8Bit else np.asarray(img.convert("RGB"))
    photometric = "YBR_FULL_422" if syntax == uids.JPEGBaseline8Bit else "RGB"
    ds = op_dataset(height, width, syntax=uids.ExplicitVRLittleEndian if pixels is not None else syntax,
                    photometric=kw.pop("photometric", photometric), **kw)
    if pixels is None:
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = pixels.tobytes()
        if syntax in (uids.RLELossless, uids.JPEG2000Lossless):
            ds.compress(syntax, pixels, **({"j2k_cr": [1]} if syntax != uids.RLELossless else {}))
        elif syntax == uids.ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
    return to_bytes(ds)


def small_jpeg(seed: int = 0, size=(800, 600)) -> bytes:
    return encode(fundus_like(size, seed=seed), "JPEG")


def bad_dicom() -> dict[str, bytes]:
    """Files every DICOM entry point must refuse, keyed by the error code they must get."""
    jpeg = small_jpeg(1)
    good = op_file(jpeg)
    bad = {"dicom_truncated": good[: len(good) // 2]}

    ds = op_dataset(600, 800)
    bad["dicom_no_pixel_data"] = to_bytes(ds)

    ds = op_dataset(600, 800, syntax=uids.ExplicitVRLittleEndian, photometric="MONOCHROME2")
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    del ds.PlanarConfiguration
    ds.PixelData = np.zeros((600, 800), np.uint16).tobytes()
    bad["dicom_bit_depth"] = to_bytes(ds)

    ds = op_dataset(600, 800)
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate([jpeg, jpeg])
    ds["PixelData"].VR = "OB"
    bad["dicom_multi_frame"] = to_bytes(ds)

    ds = op_dataset(600, 800, syntax=uids.ExplicitVRLittleEndian, photometric="MONOCHROME2")
    ds.SamplesPerPixel = 1
    del ds.PlanarConfiguration
    ds.PixelData = np.zeros((600, 800), np.uint8).tobytes()
    bad["dicom_photometric"] = to_bytes(ds)

    # A decompression bomb: the header claims a small image, the JPEG frame's own header claims
    # 65000 x 65000 pixels (only the SOF is patched; nothing that big is ever allocated here).
    bomb = bytearray(small_jpeg(2, (64, 64)))
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
    ds = op_dataset(600, 800)
    ds.PixelData = encapsulate([bytes(bomb)])
    ds["PixelData"].VR = "OB"
    bad["image_too_large"] = to_bytes(ds)

    ds = op_dataset(600, 800, sop_class=uids.CTImageStorage)
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    bad["unsupported_sop_class"] = to_bytes(ds)
    return bad


@pytest.fixture(scope="session")
def dicom_jpeg() -> bytes:
    return small_jpeg(0)


@pytest.fixture(scope="session")
def op_bytes(dicom_jpeg) -> bytes:
    return op_file(dicom_jpeg)
