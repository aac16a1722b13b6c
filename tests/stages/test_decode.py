
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from persqa_ray import schema
from persqa_ray.stages.decode import DecodeOptions, DecodeStage, ImageDecoder, ImageFailure, target_size


def options(root, **kw):
    base = dict(max_pixels=224 * 224, min_pixels=56 * 56, factor=28, max_aspect_ratio=150.0,
                max_decode_pixels=100_000_000, max_image_bytes=10_000_000, max_images=4,
                allowed_roots=(str(root),), allowed_schemes=("file", "s3"), storage_options={})
    base.update(kw)
    return DecodeOptions(**base)


@pytest.fixture
def photo(tmp_path):
    p = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(p, quality=90)
    return p


def test_target_size_matches_qwen_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    for h, w in [(512, 512), (3000, 4000), (480, 640), (1, 1), (30, 2000), (7, 9)]:
        assert target_size(h, w, 28, 3136, 1003520) == smart_resize(h, w, 28, 3136, 1003520)


def test_resize_to_budget_and_factor(tmp_path, photo):
    arr = ImageDecoder(options(tmp_path)).decode(str(photo))
    h, w, c = arr.shape
    assert c == 3 and arr.dtype == np.uint8
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 224 * 224
    # Content survives: the astronaut photo's mean colour is close after resize.
    assert abs(arr.mean() - data.astronaut().mean()) < 6


def test_large_jpeg_uses_draft_and_still_fits(tmp_path):
    p = tmp_path / "big.jpg"
    Image.fromarray(data.astronaut()).resize((4000, 3000)).save(p, quality=85)
    arr = ImageDecoder(options(tmp_path)).decode(str(p))
    assert arr.shape[0] * arr.shape[1] <= 224 * 224 and arr.shape[1] > arr.shape[0]


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (400, 200), (255, 0, 0))
    exif = im.getexif()
    exif[274] = 6  # rotate 90 CW when displayed: displayed image is portrait
    im.save(p, exif=exif)
    arr = ImageDecoder(options(tmp_path)).decode(str(p))
    assert arr.shape[0] > arr.shape[1]


def test_tiny_image_scaled_up_to_min_pixels(tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (0, 255, 0)).save(p)
    arr = ImageDecoder(options(tmp_path)).decode(str(p))
    assert arr.shape[0] * arr.shape[1] >= 56 * 56 and arr[0, 0, 1] == 255


def test_modes_converted_to_rgb(tmp_path):
    cases = {"gray.png": Image.new("L", (64, 64), 128), "rgba.png": Image.new("RGBA", (64, 64), (0, 0, 255, 0)),
             "cmyk.jpg": Image.new("CMYK", (64, 64), (0, 0, 0, 0)),
             "p16.png": Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))}
    for name, im in cases.items():
        im.save(tmp_path / name)
        arr = ImageDecoder(options(tmp_path)).decode(str(tmp_path / name))
        assert arr.ndim == 3 and arr.shape[2] == 3, name
    transparent = ImageDecoder(options(tmp_path)).decode(str(tmp_path / "rgba.png"))
    assert transparent.min() == 255  # fully transparent pixels composite onto white


@pytest.mark.parametrize("setup, status", [
    (lambda d: None, schema.MISSING_IMAGE),
    (lambda d: (d / "x.jpg").write_bytes(b""), schema.BAD_IMAGE),
    (lambda d: (d / "x.jpg").write_bytes(b"<html>404 not found</html>"), schema.BAD_IMAGE),
    (lambda d: (d / "x.jpg").mkdir(), schema.BAD_IMAGE),
])
def test_failures_have_status(tmp_path, setup, status):
    setup(tmp_path)
    with pytest.raises(ImageFailure) as e:
        ImageDecoder(options(tmp_path)).decode(str(tmp_path / "x.jpg"))
    assert e.value.status == status and str(e.value)


def test_path_outside_roots_refused(tmp_path, photo):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with pytest.raises(ImageFailure) as e:
        ImageDecoder(options(allowed)).decode(str(allowed / ".." / photo.name))
    assert e.value.status == schema.PATH_NOT_ALLOWED
    with pytest.raises(ImageFailure) as e:
        ImageDecoder(options(allowed)).decode("http://127.0.0.1/x.jpg")
    assert e.value.status == schema.PATH_NOT_ALLOWED


def test_decompression_bomb_refused_before_decode(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(p)  # 144 MP declared, tiny file
    with pytest.raises(ImageFailure) as e:
        ImageDecoder(options(tmp_path)).decode(str(p))
    assert e.value.status == schema.IMAGE_TOO_LARGE and "before decoding" in str(e.value)


def test_stage_batch_keeps_rows_and_marks_failures(tmp_path, photo):
    batch = pa.table({
        "row_id": ["a", "b", "c", "d"],
        "image": [[str(photo)], [str(photo), str(photo)], [str(tmp_path / "nope.jpg")], []],
        "status": [schema.OK, schema.OK, schema.OK, schema.NO_IMAGE],
        "error": [None, None, None, "the image list is empty"],
    })
    out = DecodeStage(options(tmp_path))(batch)
    assert out.num_rows == 4
    assert out.column("status").to_pylist() == [schema.OK, schema.OK, schema.MISSING_IMAGE, schema.NO_IMAGE]
    shapes = out.column(schema.SHAPES).to_pylist()
    pixels = out.column(schema.PIXELS).to_pylist()
    assert len(pixels[1]) == 2 and len(pixels[2]) == 0
    h, w = shapes[0][0]
    assert len(pixels[0][0]) == h * w * 3  # raw RGB, nothing encoded
    assert "nope.jpg" in out.column("error").to_pylist()[2]


def test_too_many_images(tmp_path, photo):
    batch = pa.table({"row_id": ["a"], "image": [[str(photo)] * 5], "status": [schema.OK], "error": [None]})
    out = DecodeStage(options(tmp_path, max_images=4))(batch)
    assert out.column("status").to_pylist() == [schema.TOO_MANY_IMAGES]


def _decode_in_subprocess(path, root, cap_gib):
    """Decode one image in a fresh process under an address-space cap (the decode actor's memory)."""
    import subprocess
    import sys
    cap = int(cap_gib * 2**30)
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
            "from persqa_ray.stages.decode import DecodeOptions, ImageDecoder\n"
            f"o = DecodeOptions(max_pixels=1003520, min_pixels=3136, factor=28, max_aspect_ratio=150.0, "
            f"max_decode_pixels=100_000_000, max_image_bytes=64 * 2**20, max_images=4, allowed_roots=({str(root)!r},), "
            "allowed_schemes=('file',), storage_options={})\n"
            f"print(ImageDecoder(o).decode({str(path)!r}).shape)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size", [(1_000_000, 99), (99, 1_000_000)], ids=["wide", "tall"])
def test_elongated_image_is_resized_before_padding(tmp_path, size):
    """A 1,000,000 x 99 PNG (9.9e7 pixels, under the bomb limit) used to be padded at full size
    to 1,000,000 x 6,667 (6.7e9 pixels, ~19 GiB): now it is resized first, so it decodes within
    a 2 GiB address space; the model gets a canvas within max_aspect_ratio and the pixel budget."""
    Image.MAX_IMAGE_PIXELS = None
    p = tmp_path / "long.png"
    Image.new("L", size, 90).save(p)
    proc = _decode_in_subprocess(p, tmp_path, cap_gib=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    h, w, c = eval(proc.stdout.strip())  # a shape tuple printed by the child
    assert c == 3 and max(h, w) / min(h, w) <= 150 and h * w <= 1003520 and h % 28 == 0 == w % 28
    assert (w > h) == (size[0] > size[1])


def test_16bit_image_scaled_after_resize(tmp_path):
    ramp = np.linspace(0, 65535, 3000, dtype=np.uint16)[None, :].repeat(2000, 0)
    p = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(p)
    arr = ImageDecoder(options(tmp_path)).decode(str(p))
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    assert arr[:, :3].mean() < 10 and arr[:, -3:].mean() > 245  # the full 16-bit range mapped to 0..255


def test_only_allowed_formats_are_opened(tmp_path, photo):
    eps = tmp_path / "looks_like.jpg"
    Image.open(photo).resize((64, 64)).save(eps, "EPS")  # PostScript: would need Ghostscript to open
    with pytest.raises(ImageFailure, match="allowed format") as e:
        ImageDecoder(options(tmp_path)).decode(str(eps))
    assert e.value.status == schema.BAD_IMAGE
    tiff = tmp_path / "a.tiff"
    Image.open(photo).save(tiff)
    assert ImageDecoder(options(tmp_path)).decode(str(tiff)).shape[2] == 3
    with pytest.raises(ImageFailure, match="allowed format"):
        ImageDecoder(options(tmp_path, formats=("PNG",))).decode(str(tiff))


def test_url_references_are_held_to_url_roots():
    """Roots apply to URLs (bucket and prefix) after '..' is resolved: a relative reference in an
    S3 shard that climbs into another bucket, or an absolute URL elsewhere, is refused before any
    request; one under the root is fetched (moto_server on 127.0.0.1)."""
    import io as _io
    import os

    from tests.e2e.cluster import S3Server
    s3 = S3Server()
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        s3.make_bucket("inputs")
        s3.make_bucket("other-bucket")
        buf = _io.BytesIO()
        Image.fromarray(data.chelsea()).save(buf, "JPEG")
        fs = s3.fs()
        for key in ("inputs/in/img/cat.jpg", "other-bucket/secret.jpg"):
            with fs.open(key, "wb") as f:
                f.write(buf.getvalue())
        dec = ImageDecoder(options("/nonexistent", allowed_roots=("s3://inputs/in",),
                                   storage_options=s3.storage_options))
        assert dec.decode("s3://inputs/in/img/cat.jpg").shape[2] == 3
        for ref in ("s3://inputs/in/../../other-bucket/secret.jpg", "s3://other-bucket/secret.jpg",
                    "s3://inputs/in-other/x.jpg", "S3://inputs/in/./../../other-bucket/secret.jpg"):
            with pytest.raises(ImageFailure, match="outside input.allowed_roots") as e:
                dec.decode(ref)
            assert e.value.status == schema.PATH_NOT_ALLOWED
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_default_roots_of_s3_shards_are_their_prefixes(tmp_path):
    from persqa_ray.pipeline import plan
    cfg = {"input": {"path": "s3://inputs/in/"}, "engine": {"kind": "standin", "model": "s"},
           "output": {"path": str(tmp_path / "out")}}
    p = plan(cfg, shards=[("s3://inputs/in/a.jsonl", "jsonl"), ("s3://inputs/in/sub/b.jsonl", "jsonl")])
    assert p.decode.allowed_roots == ("s3://inputs/in", "s3://inputs/in/sub")
