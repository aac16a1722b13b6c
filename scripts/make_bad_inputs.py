"""Generate the catalog of bad (and awkward-but-valid) inputs: tests/data/bad/ by default.

Everything is made here from real photos in scikit-image, PIL and a few raw bytes; nothing binary
is committed. OUT/_expected.json (underscore: not read as a shard) maps each case to the status
the pipeline must give it; the
README's failure table is this list.

    python scripts/make_bad_inputs.py [OUT]
"""
from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

# (case, what it is, expected status). The order is the README table's.
CASES = [
    ("missing_file", "path to a file that does not exist", "missing_image"),
    ("zero_byte", "zero-byte .jpg", "bad_image"),
    ("truncated_jpeg", "JPEG cut to 1/8 of its bytes", "bad_image"),
    ("truncated_png", "PNG cut in the middle of its data", "bad_image"),
    ("random_bytes", "random bytes named .jpg", "bad_image"),
    ("text_file", "a text file named .png", "bad_image"),
    ("html_error_page", "an HTML 404 page saved as .jpg", "bad_image"),
    ("wrong_extension", "a valid PNG named .jpg", "ok"),
    ("cmyk_jpeg", "CMYK JPEG", "ok"),
    ("png_16bit", "16-bit grayscale PNG", "ok"),
    ("palette_transparency", "palette PNG with a transparent colour", "ok"),
    ("grayscale", "8-bit grayscale JPEG", "ok"),
    ("animated_gif", "animated GIF (first frame is used)", "ok"),
    ("webp", "WebP", "ok"),
    ("one_pixel", "1x1 image (scaled up to the model's minimum)", "ok"),
    ("bomb_header", "PNG header declaring 60000x60000 pixels (refused before decoding)", "image_too_large"),
    ("elongated", "4000x10 image, aspect ratio 400 (padded)", "ok"),
    ("exif_rotated", "JPEG with EXIF orientation 6 (rotated on decode)", "ok"),
    ("null_image", "image column is null", "no_image"),
    ("empty_list", "image column is []", "no_image"),
    ("one_good_one_bad", "two images, the second missing", "missing_image"),
    ("number_as_path", "image column holds 12345", "bad_record"),
    ("list_with_number", "image list holds a number", "bad_record"),
    ("directory_path", "path of a directory", "bad_image"),
    ("outside_roots_relative", "../../etc/passwd", "path_not_allowed"),
    ("outside_roots_absolute", "/etc/hostname", "path_not_allowed"),
    ("scheme_not_allowed", "http://127.0.0.1:9/x.jpg", "path_not_allowed"),
    ("too_many_images", "5 images where the engine takes 4", "too_many_images"),
    ("non_utf8_text", "a text column with invalid UTF-8 bytes (replaced, row succeeds)", "ok"),
    ("unreachable_s3", "s3:// object (under a configured root) on an endpoint nobody listens on", "missing_image"),
    ("duplicate_id_first", "first row with id 'dup'", "ok"),
    ("duplicate_id_second", "second row with id 'dup' (gets its own id, flagged)", "duplicate_row_id"),
    ("malformed_json_line", "a JSONL line that is not JSON", "bad_record"),
    ("json_not_object", "a JSONL line holding a list", "bad_record"),
    ("missing_image_column", "Parquet shard without the image column (each of its 2 rows)", "missing_column"),
    ("wide_under_limit", "1,000,000x99 grayscale PNG, 9.9e7 pixels (resized, then padded)", "ok"),
    ("tall_under_limit", "99x1,000,000 grayscale PNG, 9.9e7 pixels (resized, then padded)", "ok"),
    ("png_16bit_large", "6000x4000 16-bit grayscale PNG (scaled after the resize)", "ok"),
    ("cmyk_jpeg_large", "3000x2000 CMYK JPEG", "ok"),
    ("animated_webp", "animated WebP (first frame is used)", "ok"),
    ("tiff", "TIFF", "ok"),
    ("bmp", "BMP", "ok"),
    ("eps_named_jpg", "an EPS (PostScript) file named .jpg: never opened (image.formats)", "bad_image"),
    ("ico_file", "an ICO icon: not an allowed format", "bad_image"),
    ("html_markup_name", "a valid PNG whose file name is HTML markup (escaped in the report)", "ok"),
    ("readable_outside_roots", "a readable photo outside the input directory (never shown in the report)",
     "path_not_allowed"),
    ("file_url_outside_roots", "file:///etc/hostname", "path_not_allowed"),
    ("symlink_out_of_roots", "a symlink in the input directory pointing outside it", "path_not_allowed"),
    ("s3_other_bucket", "s3:// object in a bucket that is not the input's (allowed_roots)", "path_not_allowed"),
    ("overlong_jsonl_line", "a JSONL line over input.max_record_bytes (the test sets 64 KiB)", "bad_record"),
    ("id_10000_chars", "an id column value of 10,000 characters", "ok"),
]
MARKUP_NAME = "<svg onload=alert(1)>.png"
CORRUPT_SHARD = "corrupt.parquet"  # cannot be parsed at all: named in the summary's shard_errors


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make(out: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from skimage import data

    img = out / "images"
    img.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    cat = Image.fromarray(data.chelsea())
    photo.save(img / "good.jpg", quality=90)
    (img / "zero.jpg").write_bytes(b"")
    good_jpg = (img / "good.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(good_jpg[: len(good_jpg) // 8])
    buf = io.BytesIO()
    cat.save(buf, "PNG")
    (img / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (img / "text.png").write_text("this is not an image\n")
    (img / "error.jpg").write_text("<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>")
    cat.save(img / "png_named.jpg", "PNG")
    photo.convert("CMYK").save(img / "cmyk.jpg")
    Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257)).save(img / "gray16.png")
    pal = cat.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.save(img / "palette.png", transparency=0)
    photo.convert("L").save(img / "gray.jpg")
    frames = [photo.resize((128, 128)), cat.resize((128, 128))]
    frames[0].save(img / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cat.save(img / "cat.webp", "WEBP")
    Image.new("RGB", (1, 1), (10, 200, 30)).save(img / "one.png")
    (img / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    Image.new("RGB", (4000, 10), (200, 30, 30)).save(img / "elongated.png")
    rot = photo.resize((300, 200))
    exif = rot.getexif()
    exif[274] = 6
    rot.save(img / "rotated.jpg", exif=exif)
    (img / "a_directory.jpg").mkdir(exist_ok=True)
    Image.MAX_IMAGE_PIXELS = None  # we make these on purpose
    Image.new("L", (1_000_000, 99), 90).save(img / "wide.png")
    Image.new("L", (99, 1_000_000), 90).save(img / "tall.png")
    ramp = np.linspace(0, 65535, 6000, dtype=np.uint16)[None, :].repeat(4000, 0)
    Image.fromarray(ramp).save(img / "gray16_large.png")
    photo.resize((3000, 2000)).convert("CMYK").save(img / "cmyk_large.jpg", quality=85)
    frames[0].save(img / "anim.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cat.save(img / "cat.tiff")
    cat.save(img / "cat.bmp")
    photo.resize((64, 64)).save(img / "postscript.jpg", "EPS")
    cat.resize((32, 32)).save(img / "icon.ico")
    cat.resize((64, 48)).save(img / MARKUP_NAME)
    outside = out.parent / f"{out.name}-private"
    outside.mkdir(exist_ok=True)
    photo.save(outside / "private.jpg")
    link = img / "link_out.jpg"
    if not link.is_symlink():
        link.symlink_to(outside / "private.jpg")

    p = "images/"
    rows = {
        "missing_file": p + "does_not_exist.jpg", "zero_byte": p + "zero.jpg",
        "truncated_jpeg": p + "truncated.jpg", "truncated_png": p + "truncated.png",
        "random_bytes": p + "random.jpg", "text_file": p + "text.png", "html_error_page": p + "error.jpg",
        "wrong_extension": p + "png_named.jpg", "cmyk_jpeg": p + "cmyk.jpg", "png_16bit": p + "gray16.png",
        "palette_transparency": p + "palette.png", "grayscale": p + "gray.jpg", "animated_gif": p + "anim.gif",
        "webp": p + "cat.webp", "one_pixel": p + "one.png", "bomb_header": p + "bomb.png",
        "elongated": p + "elongated.png", "exif_rotated": p + "rotated.jpg", "null_image": None,
        "empty_list": [], "one_good_one_bad": [p + "good.jpg", p + "nope.jpg"], "number_as_path": 12345,
        "list_with_number": [p + "good.jpg", 7], "directory_path": p + "a_directory.jpg",
        "outside_roots_relative": "../../etc/passwd", "outside_roots_absolute": "/etc/hostname",
        "scheme_not_allowed": "http://127.0.0.1:9/x.jpg", "too_many_images": [p + "good.jpg"] * 5,
        "non_utf8_text": p + "good.jpg", "unreachable_s3": "s3://persqa-unreachable/x.jpg",
        "duplicate_id_first": p + "good.jpg", "duplicate_id_second": p + "good.jpg",
        "wide_under_limit": p + "wide.png", "tall_under_limit": p + "tall.png",
        "png_16bit_large": p + "gray16_large.png", "cmyk_jpeg_large": p + "cmyk_large.jpg",
        "animated_webp": p + "anim.webp", "tiff": p + "cat.tiff", "bmp": p + "cat.bmp",
        "eps_named_jpg": p + "postscript.jpg", "ico_file": p + "icon.ico", "html_markup_name": p + MARKUP_NAME,
        "readable_outside_roots": str(outside / "private.jpg"), "file_url_outside_roots": "file:///etc/hostname",
        "symlink_out_of_roots": p + "link_out.jpg", "s3_other_bucket": "s3://persqa-other-bucket/secret.jpg",
        "overlong_jsonl_line": p + "good.jpg", "id_10000_chars": p + "good.jpg",
    }
    lines = []
    for case, ref in rows.items():
        rec = {"id": "dup" if case.startswith("duplicate_id") else case, "case": case, "image": ref}
        if case == "id_10000_chars":
            rec["id"] = "i" * 10_000
        if case == "overlong_jsonl_line":
            rec["caption"] = "x" * 100_000  # over the 64 KiB the catalog test sets as input.max_record_bytes
        line = json.dumps(rec).encode()
        if case == "non_utf8_text":
            line = line[:-1] + b', "caption": "caf\xe9 \xff\xfe"}'
        lines.append(line)
    lines.insert(5, b'{"id": "malformed_json_line", "case": "malformed_json_line", "image": ')
    lines.insert(9, b'["json_not_object", 1, 2]')
    lines.insert(12, b"")  # a blank line is not a row
    (out / "cases.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"id": ["nocol-1", "nocol-2"], "case": ["missing_image_column"] * 2,
                             "caption": ["x", "y"]}), out / "no_image_column.parquet")
    (out / CORRUPT_SHARD).write_bytes(b"PAR1" + b"\x00garbage" * 50)
    expected = {"cases": [{"case": c, "description": d, "status": s} for c, d, s in CASES],
                "rows_in": len(rows) + 2 + 2,  # JSONL cases + the two unparseable lines + Parquet rows
                "corrupt_shard": CORRUPT_SHARD}
    (out / "_expected.json").write_text(json.dumps(expected, indent=2))
    return expected


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/bad")
    e = make(target)
    print(f"{len(e['cases'])} cases, {e['rows_in']} input rows in {target.resolve()}")
