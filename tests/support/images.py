"""In-memory test images: fundus-like and non-fundus pictures, degraded samples and bad bytes.

Everything is deterministic (seeded) and built with Pillow and numpy, so any test can import it:
`from tests.support.images import fundus_like, bad_inputs, encode`.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 92)
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------ pictures

def fundus_like(size=(800, 600), seed: int = 0, diameter: float = 1.06,
                center: tuple = (0.5, 0.5)) -> Image.Image:
    """A synthetic colour fundus photograph: an orange-red disc (diameter x frame height, so cut at the
    top and bottom like most cameras) on black, with vignetting, an optic disc, a macula, branching
    vessels, a camera notch and fine texture. It passes the quality gate. The disc's centre is at
    `center` (fractions of width and height) and its radius is diameter * height / 2."""
    rng = np.random.default_rng(seed)
    w, h = size
    cx, cy, r = center[0] * w, center[1] * h, diameter * h / 2
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy) / r
    shade = np.clip(1.0 - 0.45 * d ** 2, 0, 1)
    base = np.array([205, 95, 35], np.float32) * rng.uniform(0.9, 1.1, 3)
    img = Image.fromarray(np.clip(shade[..., None] * base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    side = rng.choice([-1, 1])
    ox, oy = cx + side * 0.45 * r, cy + rng.uniform(-0.05, 0.05) * r
    _ellipse(draw, ox, oy, 0.13 * r, (245, 205, 120))                    # optic disc
    _ellipse(draw, cx - side * 0.15 * r, cy, 0.12 * r, (120, 50, 20))     # macula
    for _ in range(10):  # vessel trees leaving the optic disc
        _vessel(draw, rng, ox, oy, rng.uniform(0, 2 * np.pi), 0.012 * r, 0.35 * r, 3)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    a = np.asarray(img, np.float32) + rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    a *= (d <= 1.0)[..., None]
    notch = (np.abs(xx - (cx + 0.75 * r)) < 0.04 * r) & (np.abs(yy - (cy - 0.62 * r)) < 0.04 * r)
    a[notch] = 0
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _ellipse(draw, x, y, r, fill):
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _vessel(draw, rng, x, y, angle, width, length, depth):
    colour = (140, 35, 25) if rng.random() < 0.5 else (170, 45, 30)
    steps = 12
    for _ in range(steps):
        angle += rng.normal(0, 0.15)
        nx, ny = x + np.cos(angle) * length / steps, y + np.sin(angle) * length / steps
        draw.line((x, y, nx, ny), fill=colour, width=max(1, round(width)))
        x, y = nx, ny
    if depth:
        for turn in (-0.5, 0.5):
            _vessel(draw, rng, x, y, angle + turn, width * 0.7, length * 0.8, depth - 1)


def ordinary_photo(size=(800, 600), seed: int = 1, porthole: bool = False) -> Image.Image:
    """A natural-looking outdoor scene: sky gradient, sun, hills, a house, trees, textured grass.
    With porthole=True it is vignetted to a bright circle on black, which mimics a fundus's geometry,
    so only its colours give it away."""
    rng = np.random.default_rng(seed)
    w, h = size
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = (1 - t) * np.array([70, 130, 210], np.float32) + t * np.array([190, 215, 240], np.float32)
    img = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    _ellipse(draw, 0.8 * w, 0.18 * h, 0.06 * h, (255, 240, 170))
    hill = [(0, 0.62 * h)] + [(x, 0.6 * h + 0.05 * h * np.sin(x / w * 7 + seed)) for x in range(0, w + 1, 20)]
    draw.polygon(hill + [(w, h), (0, h)], fill=(80, 140, 60))
    draw.rectangle((0.2 * w, 0.45 * h, 0.38 * w, 0.7 * h), fill=(200, 190, 170))    # house
    draw.polygon([(0.18 * w, 0.45 * h), (0.29 * w, 0.33 * h), (0.4 * w, 0.45 * h)], fill=(150, 50, 40))
    draw.rectangle((0.27 * w, 0.58 * h, 0.31 * w, 0.7 * h), fill=(90, 60, 40))
    for x in rng.uniform(0.45, 0.95, 6) * w:                                       # trees
        y = rng.uniform(0.55, 0.7) * h
        draw.rectangle((x - 4, y, x + 4, y + 0.08 * h), fill=(90, 60, 30))
        _ellipse(draw, x, y, rng.uniform(0.04, 0.07) * h, (30, 90, 40))
    a = np.asarray(img, np.float32)
    a += rng.normal(0, 6, a.shape).astype(np.float32) * (np.arange(h) > 0.6 * h)[:, None, None]
    if porthole:
        yy, xx = np.mgrid[:h, :w]
        d = np.hypot(xx - w / 2, yy - h / 2) / (0.5 * h)
        a *= np.clip(1.4 - 1.4 * d ** 4, 0, 1)[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))


def document_page(size=(850, 1100)) -> Image.Image:
    """A scanned text page: black text on slightly grey paper."""
    img = Image.new("RGB", size, (245, 244, 240))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=22)
    draw.text((60, 50), "Referral letter", fill=(0, 0, 0), font=ImageFont.load_default(size=36))
    words = "the patient was seen in clinic today and fundus photographs were taken of both eyes".split()
    for i, y in enumerate(range(130, size[1] - 60, 34)):
        line = " ".join(words[(i * 3 + j) % len(words)] for j in range(9))
        draw.text((60, y), line, fill=(15, 15, 15), font=font)
    return img


def blank_frame(size=(800, 600), value: int = 0) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


# ------------------------------------------------------------------ degradations of a real photograph

def blurred(img: Image.Image, fraction: float = 0.01) -> Image.Image:
    """Out of focus: Gaussian blur with sigma = fraction of the image width."""
    return img.filter(ImageFilter.GaussianBlur(fraction * img.width))


def darkened(img: Image.Image, factor: float = 0.08) -> Image.Image:
    return Image.eval(img, lambda v: int(v * factor))


def overexposed(img: Image.Image, factor: float = 3.0) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def hazy(img: Image.Image, factor: float = 0.25) -> Image.Image:
    """Low contrast inside the retina only (cataract-like haze), the black border untouched."""
    retina = img.convert("L").point(lambda v: 255 if v > 20 else 0)
    return Image.composite(ImageEnhance.Contrast(img).enhance(factor), img, retina)


def sliver(img: Image.Image, fraction: float = 0.2) -> Image.Image:
    """Only the left `fraction` of the frame: an edge of the retina on black."""
    return img.crop((0, 0, round(img.width * fraction), img.height))


# ------------------------------------------------------------------ bad and awkward bytes

def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header claiming width x height, with a tiny IDAT: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def truncated_jpeg(img: Image.Image | None = None, keep: float = 0.5) -> bytes:
    data = encode(img or fundus_like((400, 300)))
    return data[: int(len(data) * keep)]


def exif_rotated_jpeg() -> bytes:
    """Stored 200x120, left half red and right half blue, with EXIF orientation 6 (rotate 90 CW):
    displayed it is 120x200 with red on top."""
    img = Image.new("RGB", (200, 120), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, exif=exif)


def animated_gif() -> bytes:
    frames = [Image.new("P", (96, 96), i) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    """Three pages: red, green, blue. The first page (red) is the one decoded."""
    pages = [Image.new("RGB", (96, 96), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def png16() -> bytes:
    """16-bit grayscale PNG (mode I;16): a left-to-right ramp from 0 to 65535."""
    ramp = np.linspace(0, 65535, 128).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (96, 1))), "PNG")


MINIMAL_PDF = (b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
               b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def bad_inputs() -> dict:
    """name -> (bytes, expected code, expected HTTP status) for inputs that must be rejected."""
    small = fundus_like((160, 120))
    return {
        "zero_bytes": (b"", "empty_image", 400),
        "text_named_jpg": (b"this is not a photograph\n" * 20, "not_an_image", 415),
        "pdf": (MINIMAL_PDF, "not_an_image", 415),
        "html": (b"<!DOCTYPE html><html><body>hello</body></html>", "not_an_image", 415),
        "truncated_jpeg": (truncated_jpeg(), "truncated_image", 422),
        "jpeg_header_only": (encode(small)[:200], "truncated_image", 422),
        "truncated_png": (encode(small, "PNG")[:2000], "truncated_image", 422),
        "png_bomb_40000": (png_bomb(), "image_too_large", 413),
        "png_bomb_9000": (png_bomb(9000, 9000), "image_too_large", 413),
        "png_bomb_10000": (png_bomb(10000, 10000), "image_too_large", 413),  # Pillow warns here
        "tiny_1x1": (encode(Image.new("RGB", (1, 1), (200, 80, 30)), "PNG"), "image_too_small", 422),
        "animated_gif": (animated_gif(), "unsupported_format", 415),
        "bmp": (encode(small, "BMP"), "unsupported_format", 415),
        "webp": (encode(small, "WEBP"), "unsupported_format", 415),
    }


def awkward_inputs() -> dict:
    """name -> bytes of images that must decode (to RGB) although they are not plain RGB JPEGs."""
    small = fundus_like((160, 120))
    rgba = small.convert("RGBA")
    rgba.putalpha(200)
    return {
        "cmyk_jpeg": encode(small.convert("CMYK")),
        "grayscale_jpeg": encode(small.convert("L")),
        "png16": png16(),
        "palette_png": encode(small.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba_png": encode(rgba, "PNG"),
        "grayscale_alpha_png": encode(small.convert("LA"), "PNG"),
        "multipage_tiff": multipage_tiff(),
        "exif_rotated_jpeg": exif_rotated_jpeg(),
        "progressive_jpeg": encode(small, progressive=True),
    }
