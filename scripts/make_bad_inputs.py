"""Generate the catalog of bad (and awkward-but-valid) inputs: tests/data/bad/ by default.

Everything is made here from real photos in scikit-image, PIL and a few raw bytes; nothing binary
is committed. OUT/_expected.json (underscore: not read as a shard) maps each case to the status the pipeline must give it; the
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
    ("unreachable_s3", "s3:// object on an endpoint nobody listens on", "missing_image"),
    ("duplicate_id_first", "first row with id 'dup'", "ok"),
    ("duplicate_id_second", "second row with id 'dup' (gets its own id, flagged)", "duplicate_row_id"),
    ("malformed_json_line", "a JSONL line that is not JSON", "bad_record"),
    ("json_not_object", "a JSONL line holding a list", "bad_record"),
    ("missing_image_column", "Parquet shard without the image column (each of its 2 rows)", "missing_column"),
]
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
    }
    lines = []
    for case, ref in rows.items():
        rec = {"id": "dup" if case.startswith("duplicate_id") else case, "case": case, "image": ref}
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
