"""Decode stage (CPU actor pool): fetch bytes, decode once, orient, RGB, resize to the token budget.

What leaves this stage is raw RGB uint8 pixels already at the size the model's processor wants
(sides multiples of `resize_factor`, pixel count within [min_pixels, max_pixels]), so nothing
downstream decodes or resizes again. Any failure becomes the row's status; nothing raises.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any


import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from persqa_ray import schema
from persqa_ray.io.filesystems import filesystem, is_url, scheme_of

# EXIF orientations that swap width and height.
_TRANSPOSED = {5, 6, 7, 8}


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int
    min_pixels: int
    factor: int
    max_aspect_ratio: float
    max_decode_pixels: int
    max_image_bytes: int
    max_images: int
    allowed_roots: tuple[str, ...]
    allowed_schemes: tuple[str, ...]
    storage_options: dict


class ImageFailure(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def target_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: sides multiples of `factor`, area within bounds, aspect kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _pad_to_aspect(im: Image.Image, max_ratio: float) -> Image.Image:
    """Pad (never crop) an extremely elongated image so the model accepts it."""
    w, h = im.size
    if max(w, h) / min(w, h) <= max_ratio:
        return im
    if w > h:
        size = (w, math.ceil(w / max_ratio))
    else:
        size = (math.ceil(h / max_ratio), h)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(im, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size and a.max() > 0 else 1.0
        im = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")  # palette transparency -> alpha
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


class ImageDecoder:
    """Decodes one reference; holds the filesystem handles of one actor."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self._roots = tuple(os.path.realpath(r) for r in opts.allowed_roots)
        # Our own header check (below) bounds decoding; PIL's global limit would raise a warning or
        # an error of its own at a different threshold.
        Image.MAX_IMAGE_PIXELS = None

    def _read_bytes(self, ref: str) -> bytes:
        o = self.opts
        scheme = scheme_of(ref)
        if scheme not in o.allowed_schemes:
            raise ImageFailure(schema.PATH_NOT_ALLOWED, f"{ref}: scheme '{scheme}' is not in input.allowed_schemes")
        if not is_url(ref):
            real = os.path.realpath(ref)
            if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self._roots):
                raise ImageFailure(schema.PATH_NOT_ALLOWED, f"{ref}: outside input.allowed_roots")
            if os.path.isdir(real):
                raise ImageFailure(schema.BAD_IMAGE, f"{ref}: is a directory")
            try:
                size = os.path.getsize(real)
            except FileNotFoundError:
                raise ImageFailure(schema.MISSING_IMAGE, f"{ref}: no such file") from None
            if size > o.max_image_bytes:
                raise ImageFailure(schema.IMAGE_TOO_LARGE, f"{ref}: {size} bytes > input.max_image_bytes")
            with open(real, "rb") as f:
                return f.read()
        try:
            fs, p = filesystem(ref, o.storage_options)
            info = fs.info(p)
            if info.get("type") == "directory":
                raise ImageFailure(schema.BAD_IMAGE, f"{ref}: is a directory")
            if (info.get("size") or 0) > o.max_image_bytes:
                raise ImageFailure(schema.IMAGE_TOO_LARGE, f"{ref}: {info['size']} bytes > input.max_image_bytes")
            with fs.open(p, "rb") as f:
                return f.read()
        except ImageFailure:
            raise
        except FileNotFoundError:
            raise ImageFailure(schema.MISSING_IMAGE, f"{ref}: no such object") from None
        except Exception as e:  # noqa: BLE001 - network/permission errors of any backend
            raise ImageFailure(schema.MISSING_IMAGE, f"{ref}: cannot fetch ({type(e).__name__})") from None

    def decode(self, ref: str) -> np.ndarray:
        o = self.opts
        data = self._read_bytes(ref)
        if not data:
            raise ImageFailure(schema.BAD_IMAGE, f"{ref}: empty file")
        try:
            im = Image.open(io.BytesIO(data))
            width, height = im.size  # header only: nothing decoded yet
            if width * height > o.max_decode_pixels:
                raise ImageFailure(schema.IMAGE_TOO_LARGE, f"{ref}: {width}x{height} declared, over "
                                   f"image.max_decode_pixels={o.max_decode_pixels} (refused before decoding)")
            orientation = im.getexif().get(274, 1)
            if orientation in _TRANSPOSED:
                width, height = height, width
            th, tw = target_size(height, width, o.factor, o.min_pixels, o.max_pixels)
            if im.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller:
                # the biggest single saving for camera-sized photos.
                side = max(th, tw)
                im.draft("RGB", (side, side))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im = _pad_to_aspect(im, o.max_aspect_ratio)
            th, tw = target_size(im.height, im.width, o.factor, o.min_pixels, o.max_pixels)
            if im.size != (tw, th):
                im = im.resize((tw, th), Image.BICUBIC, reducing_gap=3.0)
            return np.asarray(im, dtype=np.uint8)
        except ImageFailure:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageFailure(schema.BAD_IMAGE, f"{ref}: cannot decode ({type(e).__name__}: {e})") from None


class DecodeStage:
    """Ray Data callable class: one per actor; batches in and out as pyarrow tables."""

    def __init__(self, opts: DecodeOptions, stats: Any = None):
        self.decoder = ImageDecoder(opts)
        self.max_images = opts.max_images
        if stats is not None:
            import ray
            stats.actor_started.remote("decode", ray.get_runtime_context().get_node_id())

    def _decode_row(self, refs: list[str]) -> tuple[list[bytes], list[list[int]]]:
        if len(refs) > self.max_images:
            raise ImageFailure(schema.TOO_MANY_IMAGES,
                               f"{len(refs)} images > engine.max_images_per_prompt={self.max_images}")
        pixels, shapes = [], []
        for i, ref in enumerate(refs):
            try:
                arr = self.decoder.decode(ref)
            except ImageFailure as e:
                if len(refs) > 1:
                    raise ImageFailure(e.status, f"image {i + 1} of {len(refs)}: {e}") from None
                raise
            pixels.append(arr.tobytes())
            shapes.append([arr.shape[0], arr.shape[1]])
        return pixels, shapes

    def __call__(self, batch: pa.Table) -> pa.Table:
        statuses = batch.column("status").to_pylist()
        errors = batch.column("error").to_pylist()
        all_pixels, all_shapes = [], []
        for i, refs in enumerate(batch.column("image").to_pylist()):
            pixels, shapes = [], []
            if statuses[i] == schema.OK:
                try:
                    pixels, shapes = self._decode_row(refs or [])
                except ImageFailure as e:
                    statuses[i], errors[i] = e.status, str(e)
                except Exception as e:  # noqa: BLE001 - a bug on one row must not stop the job
                    statuses[i], errors[i] = schema.BAD_IMAGE, f"unexpected {type(e).__name__}: {e}"
            all_pixels.append(pixels)
            all_shapes.append(shapes)
        batch = batch.set_column(batch.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        return (batch.append_column(schema.PIXELS, pa.array(all_pixels, pa.list_(pa.large_binary())))
                .append_column(schema.SHAPES, pa.array(all_shapes, pa.list_(pa.list_(pa.int32())))))
