"""Demo input from real photos shipped inside scikit-image (no network needed).

Writes OUT/images/*.jpg (plus one deliberately broken file), OUT/shard-000.jsonl (seed-style rows:
lists of relative paths, a bare string path, a two-image row, a photo of two concepts, a broken and
a missing image), OUT/shard-001.parquet (more rows), and OUT/_concepts/ (a concepts table with two
reference images each for <chelsea> and <eileen>). Deterministic: the same files every time.

    python scripts/make_demo_data.py [OUT] [--rows N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name in skimage.data, subject type, concept) - photos of a person, an animal, objects. Concept
# names are rare words (they become tags like <eileen>; common words would clash with the vocabulary).
PHOTOS = [("astronaut", "person", "eileen"), ("chelsea", "animal", "chelsea"), ("coffee", "object", "espresso"),
          ("rocket", "object", "saturnv"), ("camera", "person", "lumiere"), ("horse", "animal", "bucephalus"),
          ("hubble_deep_field", "object", "hubble"), ("immunohistochemistry", "object", "ihc"),
          ("coins", "object", "coinage"), ("retina", "object", "retina")]
BROKEN = "broken.jpg"      # a truncated JPEG: exists, cannot be decoded -> bad_image
MISSING = "missing.jpg"    # never written -> missing_image


def write_images(images_dir: Path) -> list[tuple[str, str, str]]:
    import numpy as np
    from PIL import Image
    from skimage import data

    images_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, subject, concept in PHOTOS:
        path = images_dir / f"{name}.jpg"
        if not path.exists():
            arr = getattr(data, name)()
            im = Image.fromarray(np.asarray(arr))
            im.convert("RGB").save(path, quality=90)
        out.append((path.name, subject, concept))
    broken = images_dir / BROKEN
    if not broken.exists():
        good = (images_dir / "astronaut.jpg").read_bytes()
        broken.write_bytes(good[: len(good) // 8])  # header intact, data cut off
    return out


def write_concepts(out: Path) -> Path:
    """_concepts/concepts.jsonl: <chelsea> (the cat) and <eileen> (the astronaut) with two reference
    images each (crops of their photos, so they look like the concept and are not the query image),
    plus their class phrases and subject types: the registry RAP's database is exported from."""
    from PIL import Image
    d = out / "_concepts"  # underscore: not listed as an input shard
    d.mkdir(parents=True, exist_ok=True)
    crops = {"chelsea": [(0, 0, 300, 300), (120, 0, 451, 300)], "eileen": [(80, 0, 400, 330), (0, 60, 512, 512)]}
    photo = {"chelsea": "chelsea.jpg", "eileen": "astronaut.jpg"}
    rows = []
    for name, boxes in crops.items():
        refs = []
        for i, box in enumerate(boxes, start=1):
            path = d / f"{name}_{i}.jpg"
            if not path.exists():
                Image.open(out / "images" / photo[name]).convert("RGB").crop(box).save(path, quality=90)
            refs.append(path.name)
        rows.append({"concept": name, "class_phrase": "the cat" if name == "chelsea" else "the astronaut",
                     "subject_type": "animal" if name == "chelsea" else None, "reference_images": refs})
    table = d / "concepts.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return table


def write_pair(images_dir: Path) -> str:
    """One photo of two concepts side by side (the astronaut left, the cat right): a multi-concept row."""
    from PIL import Image
    path = images_dir / "eileen_and_chelsea.jpg"
    if not path.exists():
        left, right = (Image.open(images_dir / n).convert("RGB").resize((320, 320))
                       for n in ("astronaut.jpg", "chelsea.jpg"))
        pair = Image.new("RGB", (640, 320))
        pair.paste(left, (0, 0))
        pair.paste(right, (320, 0))
        pair.save(path, quality=90)
    return path.name


def make(out: Path, rows: int = 12) -> dict:
    """Create the demo set with `rows` ordinary rows plus the special ones; returns a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    photos = write_images(out / "images")
    pair = write_pair(out / "images")
    write_concepts(out)
    # Every third row leaves its subject type empty: the VLM detects it when the config asks.
    ordinary = [{"image": [f"images/{photos[i % len(photos)][0]}"],
                 "subject": None if i % 3 == 2 else photos[i % len(photos)][1],
                 "concept": photos[i % len(photos)][2], "source": "skimage"} for i in range(rows)]
    jsonl_rows = ordinary[: rows // 2] + [
        {"image": "images/coffee.jpg", "subject": "object", "concept": "espresso", "source": "bare string path"},
        {"image": ["images/astronaut.jpg", "images/chelsea.jpg"], "subject": "person", "concept": "eileen",
         "source": "two images"},
        {"image": [f"images/{pair}"], "concept": ["eileen", "chelsea"], "source": "two concepts"},
        {"image": [f"images/{BROKEN}"], "subject": "object", "source": "broken file"},
        {"image": [f"images/{MISSING}"], "subject": "object", "source": "missing file"},
    ]
    parquet_rows = ordinary[rows // 2:]
    with open(out / "shard-000.jsonl", "w", encoding="utf-8") as f:
        for r in jsonl_rows:
            f.write(json.dumps(r) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(parquet_rows), out / "shard-001.parquet")
    return {"rows": len(jsonl_rows) + len(parquet_rows), "jsonl_rows": len(jsonl_rows),
            "parquet_rows": len(parquet_rows), "expected_errors": {"bad_image": 1, "missing_image": 1}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="demo_data")
    ap.add_argument("--rows", type=int, default=12, help="ordinary single-image rows")
    a = ap.parse_args()
    m = make(Path(a.out), a.rows)
    print(f"demo data in {Path(a.out).resolve()}: {m['rows']} rows "
          f"({m['jsonl_rows']} JSONL + {m['parquet_rows']} Parquet; one broken, one missing image), "
          "_concepts/concepts.jsonl")
