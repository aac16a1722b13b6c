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
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from persqa_ray import schema
from persqa_ray.io.filesystems import filesystem, is_url, normalize_url, scheme_of, under_root
from persqa_ray.stages.base import Stage

if TYPE_CHECKING:
    from persqa_ray.pipeline.plan import Plan

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
    formats: tuple[str, ...] = schema.IMAGE_FORMATS

    @classmethod
    def from_config(cls, cfg, roots: tuple[str, ...]) -> "DecodeOptions":
        i = cfg.image
        return cls(max_pixels=i.max_pixels, min_pixels=i.min_pixels, factor=i.resize_factor,
                   max_aspect_ratio=i.max_aspect_ratio, max_decode_pixels=i.max_decode_pixels,
                   max_image_bytes=cfg.input.max_image_bytes, max_images=cfg.engine.max_images_per_prompt,
                   allowed_roots=tuple(roots), allowed_schemes=tuple(s.lower() for s in cfg.input.allowed_schemes),
                   storage_options=dict(cfg.input.storage_options), formats=tuple(f.upper() for f in i.formats))

    def limits(self) -> dict:
        """What the report needs to open images as this run did (recorded in _run.json)."""
        return {"allowed_roots": list(self.allowed_roots), "allowed_schemes": list(self.allowed_schemes),
                "max_image_bytes": self.max_image_bytes, "max_decode_pixels": self.max_decode_pixels,
                "formats": list(self.formats)}


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


def fitted_size(width: int, height: int, o: "DecodeOptions") -> tuple[tuple[int, int], tuple[int, int]]:
    """((content w, h), (canvas w, h)) for an image of width x height: the canvas is what the
    model gets (smart_resize of the image, or of the image padded to max_aspect_ratio when it is
    more elongated); the content is the image scaled into it, aspect kept when padded. Computed
    from the size alone, so an elongated image is scaled down before it is padded: padding a
    1,000,000 x 99 image at full size would allocate 1,000,000 x 6,667 pixels."""
    ratio = max(width, height) / min(width, height)
    if ratio <= o.max_aspect_ratio:
        th, tw = target_size(height, width, o.factor, o.min_pixels, o.max_pixels)
        return (tw, th), (tw, th)
    if width > height:
        pw, ph = width, math.ceil(width / o.max_aspect_ratio)
    else:
        pw, ph = math.ceil(height / o.max_aspect_ratio), height
    th, tw = target_size(ph, pw, o.factor, o.min_pixels, o.max_pixels)
    # Rounding the short side down to the factor can push the ratio back over the limit (12264 x 56
    # for a 1,000,000 x 99 image): shorten the long side until it fits.
    if tw > th * o.max_aspect_ratio:
        tw = max(o.factor, math.floor(th * o.max_aspect_ratio / o.factor) * o.factor)
    elif th > tw * o.max_aspect_ratio:
        th = max(o.factor, math.floor(tw * o.max_aspect_ratio / o.factor) * o.factor)
    scale = min(tw / width, th / height)
    return (min(tw, max(1, round(width * scale))), min(th, max(1, round(height * scale)))), (tw, th)


def _pad(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Center a (small, already resized) image on a white canvas of `size` (never crops)."""
    if im.size == size:
        return im
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(im, ((size[0] - im.width) // 2, (size[1] - im.height) // 2))
    return canvas


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of an image that is already at its (small) target size: high bit depths are scaled by
    their maximum, transparency is flattened onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        hi = float(a.max()) if a.size and a.max() > 0 else 1.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")  # palette transparency -> alpha
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


class ImageDecoder:
    """Decodes one reference; holds the filesystem handles of one actor."""

    def __init__(self, opts: DecodeOptions):
        self.opts = opts
        self._roots = tuple(os.path.realpath(r) for r in opts.allowed_roots if not is_url(r))
        self._url_roots = tuple(normalize_url(r) for r in opts.allowed_roots if is_url(r))
        # Our own header check (below) bounds decoding; PIL's global limit would raise a warning or
        # an error of its own at a different threshold.
        Image.MAX_IMAGE_PIXELS = None
        Image.init()  # register every plugin, so each name in image.formats is known to Image.open

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
        ref = normalize_url(ref)  # checked and fetched in the same form: '..' cannot leave a root
        if not under_root(ref, self._url_roots):
            raise ImageFailure(schema.PATH_NOT_ALLOWED, f"{ref}: outside input.allowed_roots")
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
            try:
                # Only the formats a VLM dataset uses: an EPS file named .jpg never reaches Ghostscript.
                im = Image.open(io.BytesIO(data), formats=list(o.formats))
            except UnidentifiedImageError:
                raise ImageFailure(schema.BAD_IMAGE, f"{ref}: not an image of an allowed format "
                                   f"(image.formats: {', '.join(o.formats)})") from None
            return self._fit(ref, im)
        except ImageFailure:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ImageFailure(schema.BAD_IMAGE, f"{ref}: cannot decode ({type(e).__name__}: {e})") from None

    def _fit(self, ref: str, im: Image.Image) -> np.ndarray:
        """Decode once and bring to the model's size, smallest first: resize (in the file's own
        mode), then orient, convert to RGB and pad, so no full-resolution copy is ever made."""
        o = self.opts
        width, height = im.size  # header only: nothing decoded yet
        if width * height > o.max_decode_pixels:
            raise ImageFailure(schema.IMAGE_TOO_LARGE, f"{ref}: {width}x{height} declared, over "
                               f"image.max_decode_pixels={o.max_decode_pixels} (refused before decoding)")
        transposed = im.getexif().get(274, 1) in _TRANSPOSED
        ow, oh = (height, width) if transposed else (width, height)  # as the model will see it
        (cw, ch), canvas = fitted_size(ow, oh, o)
        if im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller:
            # the biggest single saving for camera-sized photos.
            side = max(canvas)
            im.draft(im.mode if im.mode in ("RGB", "L", "CMYK") else "RGB", (side, side))
        if im.mode in ("P", "1"):
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")  # no good resampling in these modes
        size = (ch, cw) if transposed else (cw, ch)
        if im.size != size:
            # reducing_gap: a fast box reduction first (not available for 16/32-bit modes)
            gap = None if im.mode.startswith(("I", "F")) else 3.0
            im = im.resize(size, Image.BICUBIC, reducing_gap=gap)
        im = _pad(_to_rgb(ImageOps.exif_transpose(im)), canvas)
        return np.asarray(im, dtype=np.uint8)


class ReferenceImages:
    """Reference images of concepts, decoded once per actor (the generate stage's): under the same
    roots and limits as inputs, kept in a small LRU (a concept's images are asked for by every row
    of that concept). A failure is remembered too, so a bad file is not read again per row."""

    def __init__(self, opts: DecodeOptions, capacity: int = 256):
        self.decoder, self.capacity = ImageDecoder(opts), capacity
        self._cache: dict[str, Any] = {}

    def get(self, ref: str) -> np.ndarray:
        if ref not in self._cache:
            try:
                self._cache[ref] = self.decoder.decode(ref)
            except ImageFailure as e:
                self._cache[ref] = e
            except Exception as e:  # noqa: BLE001 - one bad reference must not stop the job
                self._cache[ref] = ImageFailure(schema.BAD_IMAGE, f"{ref}: unexpected {type(e).__name__}: {e}")
            if len(self._cache) > self.capacity:
                self._cache.pop(next(iter(self._cache)))
        value = self._cache.pop(ref)
        self._cache[ref] = value  # most recently used last
        if isinstance(value, ImageFailure):
            raise value
        return value


class DecodeStage:
    """Ray Data callable class: one per actor; batches in and out as pyarrow tables."""

    def __init__(self, opts: DecodeOptions, stats: Any = None):
        self.decoder = ImageDecoder(opts)
        self.max_images = opts.max_images
        if stats is not None:
            import ray
            stats.actor_started.remote("decode", ray.get_runtime_context().get_node_id())

    def _decode_row(self, refs: list[str], n_references: int = 0) -> tuple[list[bytes], list[list[int]]]:
        if len(refs) + n_references > self.max_images:
            shown = f"{len(refs)} images" + (f" and {n_references} reference image(s)" if n_references else "")
            raise ImageFailure(schema.TOO_MANY_IMAGES,
                               f"{shown} > engine.max_images_per_prompt={self.max_images}")
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
        n_refs = [len(r or []) for r in batch.column(schema.REF_IMAGES).to_pylist()] \
            if schema.REF_IMAGES in batch.column_names else [0] * batch.num_rows
        for i, refs in enumerate(batch.column("image").to_pylist()):
            pixels, shapes = [], []
            if statuses[i] == schema.OK:
                try:
                    pixels, shapes = self._decode_row(refs or [], n_refs[i])
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


def decode_stage(p: "Plan", stats: Any = None) -> Stage:
    i = p.config.image
    return Stage("decode", DecodeStage, {"opts": p.decode, "stats": stats}, needs=("image", "status", "error"),
                 adds=(schema.PIXELS, schema.SHAPES), batch_size=i.batch_size, pool=i.concurrency,
                 num_cpus=i.num_cpus, resources=dict(i.resources))
