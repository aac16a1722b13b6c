"""Demo input from real photos shipped inside scikit-image (no network needed).

Writes OUT/images/*.jpg (plus one deliberately broken file), OUT/shard-000.jsonl (seed-style rows:
lists of relative paths, a bare string path, a two-image row, a broken and a missing image) and
OUT/shard-001.parquet (more rows). Deterministic: the same files every time.

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


def make(out: Path, rows: int = 12) -> dict:
    """Create the demo set with `rows` ordinary rows plus the special ones; returns a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    photos = write_images(out / "images")
    # Every third row leaves its subject type empty: the VLM detects it when the config asks.
    ordinary = [{"image": [f"images/{photos[i % len(photos)][0]}"],
                 "subject": None if i % 3 == 2 else photos[i % len(photos)][1],
                 "concept": photos[i % len(photos)][2], "source": "skimage"} for i in range(rows)]
    jsonl_rows = ordinary[: rows // 2] + [
        {"image": "images/coffee.jpg", "subject": "object", "concept": "espresso", "source": "bare string path"},
        {"image": ["images/astronaut.jpg", "images/chelsea.jpg"], "subject": "person", "concept": "eileen",
         "source": "two images"},
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
          f"({m['jsonl_rows']} JSONL + {m['parquet_rows']} Parquet; one broken, one missing image)")
