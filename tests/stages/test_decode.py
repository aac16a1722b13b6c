
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
