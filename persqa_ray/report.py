"""`persqa-ray report`: one self-contained HTML file to look at a run.

A gallery of sampled rows (JPEG thumbnails embedded as data URLs: tag, subject type, question,
answer, status), the run summary, and inline SVG plots (rows per status, answer lengths,
questions per template, QA rows committed over time). No JavaScript library, no network: the
file opens anywhere, including a headless browser in the tests.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import random
from typing import Any, Optional

import pyarrow.compute as pc

from persqa_ray import schema
from persqa_ray.io.commits import iter_records, output_root
from persqa_ray.io.dataset import iter_output
from persqa_ray.io.filesystems import filesystem, is_url
from persqa_ray.io.summary import read_summary

THUMB_PX = 192
# The columns the report shows or plots: one read of these, not of the whole output.
_COLUMNS = ["row_id", "qa_index", "status", "error", "image", "reference_images", "tag", "subject_type", "qa_type",
            "negative_kind", "question", "answer", "template_id"]


# Rows that reached these statuses had their images decoded by the run itself (within its roots,
# schemes and size limits); no other row's reference is ever opened by the report.
DECODED_STATUSES = {schema.OK, schema.INVALID_OUTPUT, schema.ENGINE_ERROR}


@functools.lru_cache(maxsize=1)
def _placeholder() -> str:
    """The grey "no image" card, encoded once (every refused or missing row shares it)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (THUMB_PX, THUMB_PX * 3 // 4), (200, 200, 200))
    ImageDraw.Draw(im).text((12, THUMB_PX // 3), "no image", fill=(90, 90, 90))
    return _data_url(im)


def _data_url(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def run_decoder(output: str, storage_options: Optional[dict], remote: bool):
    """The run's own image limits (recorded in its _run.json) at thumbnail size, or None when the
    output does not record them. Remote references only with `remote` (and then only the object
    stores the run allowed: never http)."""
    from persqa_ray.io.outputs import read_limits
    from persqa_ray.stages.decode import DecodeOptions, ImageDecoder
    limits = read_limits(output, storage_options)
    if not limits:
        return None
    schemes = [s for s in limits["allowed_schemes"] if s == "file" or (remote and s not in ("http", "https", "ftp"))]
    return ImageDecoder(DecodeOptions(
        max_pixels=THUMB_PX * THUMB_PX, min_pixels=1, factor=1, max_aspect_ratio=1000.0,
        max_decode_pixels=limits["max_decode_pixels"], max_image_bytes=limits["max_image_bytes"], max_images=1,
        allowed_roots=tuple(limits["allowed_roots"]), allowed_schemes=tuple(schemes),
        storage_options=dict(storage_options or {}), formats=tuple(limits["formats"])))


def _thumbnail(ref: Optional[str], status: str, decoder) -> tuple[str, bool]:
    """(data URL, real image?): only for rows the run decoded, through the run's own limits;
    a grey placeholder otherwise (a refused reference is never opened)."""
    from PIL import Image
    if decoder is None or not ref or status not in DECODED_STATUSES:
        return _placeholder(), False
    try:
        im = Image.fromarray(decoder.decode(ref))
    except Exception:  # noqa: BLE001 - a file gone since the run: shown as missing
        return _placeholder(), False
    im.thumbnail((THUMB_PX, THUMB_PX))
    return _data_url(im), True


def _bars(title: str, items: list[tuple[str, float]]) -> str:
    """A horizontal bar chart as inline SVG."""
    if not items:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p class=muted>nothing recorded</p></figure>"
    top = max(v for _, v in items) or 1
    row_h, label_w, bar_w = 20, 170, 300
    parts = [f'<svg width="{label_w + bar_w + 70}" height="{row_h * len(items) + 6}" role="img">']
    for i, (label, value) in enumerate(items):
        y = i * row_h + 3
        w = max(1, int(bar_w * value / top))
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{html.escape(str(label))[:28]}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w}" height="{row_h - 5}" fill="#4a7bd0"/>'
                     f'<text x="{label_w + w + 4}" y="{y + 14}">{value:g}</text>')
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def _line(title: str, points: list[tuple[float, float]], xlabel: str, ylabel: str) -> str:
    if len(points) < 2:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p class=muted>not recorded</p></figure>"
    w, h, pad = 460, 200, 40
    xmax = max(x for x, _ in points) or 1
    ymax = max(y for _, y in points) or 1
    coords = " ".join(f"{pad + (w - 2 * pad) * x / xmax:.1f},{h - pad - (h - 2 * pad) * y / ymax:.1f}"
                      for x, y in points)
    return (f"<figure><figcaption>{html.escape(title)}</figcaption><svg width='{w}' height='{h}' role='img'>"
            f"<polyline points='{coords}' fill='none' stroke='#4a7bd0' stroke-width='2'/>"
            f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#888'/>"
            f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#888'/>"
            f"<text x='{w - pad}' y='{h - 12}' text-anchor='end'>{html.escape(xlabel)} (max {xmax:.0f})</text>"
            f"<text x='{pad + 4}' y='{pad - 8}'>{html.escape(ylabel)} (max {ymax:.0f})</text></svg></figure>")


def _histogram(values: dict[int, int], bins: int = 10) -> list[tuple[str, float]]:
    """`values`: how often each value occurs (bounded by the distinct values, not the rows)."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for v, n in values.items():
        counts[(v - lo) // step] = counts.get((v - lo) // step, 0) + n
    return [(f"{lo + b * step}–{lo + (b + 1) * step - 1}", counts.get(b, 0)) for b in range(max(counts) + 1)]


def _commit_timeline(output: str, storage_options: Optional[dict]) -> list[tuple[float, float]]:
    fs, root = output_root(output, storage_options)
    records = sorted((rec["committed_at"], rec["counts"].get("qa_rows", 0)) for rec in iter_records(fs, root)
                     if "committed_at" in rec)
    if len(records) < 2:
        return []
    t0, total, points = records[0][0], 0, []
    for t, n in records:
        total += n
        points.append((t - t0, total))
    return points


class _Scan:
    """One streaming pass over the output (a commit record at a time): status and template
    counts, answer lengths, and a seeded reservoir sample of rows per qa_type for the gallery, so
    every family shows up. Memory: the samples, one block, and a count per distinct answer length."""

    def __init__(self, sample: int, seed: int):
        self.k, self.rng = sample, random.Random(seed)
        self.n = 0
        self.seen: dict[str, int] = {}
        self.reservoirs: dict[str, list] = {}
        self.statuses: dict[str, int] = {}
        self.templates: dict[str, int] = {}
        self.lengths: dict[int, int] = {}

    def add(self, t) -> None:
        for col, counts in (("status", self.statuses), ("template_id", self.templates)):
            for r in pc.value_counts(t.column(col).drop_null()).to_pylist():
                counts[r["values"]] = counts.get(r["values"], 0) + r["counts"]
        for a in t.column("answer").to_pylist():
            if a:
                self.lengths[len(a)] = self.lengths.get(len(a), 0) + 1
        for r in t.to_pylist():
            self.n += 1
            kind = r.get("qa_type") or "-"
            seen = self.seen[kind] = self.seen.get(kind, 0) + 1
            sample = self.reservoirs.setdefault(kind, [])
            if len(sample) < self.k:
                sample.append((self.n, r))
            else:
                j = self.rng.randrange(seen)
                if j < self.k:
                    sample[j] = (self.n, r)

    def picks(self) -> list:
        """Up to k rows, taken in turn from each qa_type's sample, in output order."""
        queues = [list(v) for _, v in sorted(self.reservoirs.items())]
        out: list = []
        while len(out) < self.k and any(queues):
            for q in queues:
                if q and len(out) < self.k:
                    out.append(q.pop(0))
        return sorted(out, key=lambda x: x[0])


def _card(r: dict, decoder, cache: dict) -> tuple[str, int]:
    """One gallery card: the row's images (reference images first, then the query image; a
    text-only row shows the reference images its answer looked at) and its QA. Returns the card
    and how many of its thumbnails are real images."""
    status = r.get("status") or ""
    text_only = r.get("qa_type") == "text"  # its images are the concept's reference images
    refs = list((r.get("image") if text_only else r.get("reference_images")) or [])
    query = [] if text_only else (r.get("image") or [None])[:1]
    thumbs, real = [], 0
    for ref in (refs + query)[:4] or [None]:
        key = (ref, status in DECODED_STATUSES)
        if key not in cache:
            cache[key] = _thumbnail(ref, status, decoder)
        src, is_real = cache[key]
        real += is_real
        thumbs.append(f"<img class=thumb data-shown='{int(is_real)}' alt='{html.escape(str(ref))}' src='{src}'>")
    text = {k: html.escape(str(r.get(k) if r.get(k) is not None else "–"))
            for k in ("tag", "subject_type", "question", "answer", "qa_type", "template_id", "error")}
    kind = f" · {html.escape(r['negative_kind'])} negative" if r.get("negative_kind") else ""
    card = (f"<div class=card><div class=thumbs>{''.join(thumbs)}</div>"
            f"<div><div class=meta><span class='status{'' if status == 'ok' else ' err'}'>{html.escape(status)}</span>"
            f" {text['tag']} · {text['subject_type']} · {text['qa_type']}{kind} · <code>{text['template_id']}</code>"
            f"</div><p class=q>{text['question']}</p>"
            f"<p class=a>{text['answer'] if status == 'ok' else text['error']}</p></div></div>")
    return card, real


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}h1{margin:0 0 4px}.muted{color:#777}
.plots{display:flex;flex-wrap:wrap;gap:24px}figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}
svg text{font-size:12px;fill:#333}table.summary td{padding:2px 10px 2px 0;vertical-align:top}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px;margin-top:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px;display:flex;gap:10px}
.card img{width:120px;height:auto;object-fit:contain;border-radius:4px;align-self:flex-start}
.thumbs{display:flex;flex-direction:column;gap:4px}
.meta{font-size:12px;color:#555}.q{font-weight:600;margin:4px 0}.a{margin:0}
.status{display:inline-block;padding:0 6px;border-radius:4px;background:#e3f1e3}
.status.err{background:#f6dcdc}code{font-size:12px}
"""
# Marks every thumbnail the browser actually decoded (a headless test reads these marks back).
_SCRIPT = """window.addEventListener('load',()=>{for(const im of document.querySelectorAll('img.thumb'))
{if(im.complete&&im.naturalWidth>0)im.setAttribute('data-loaded','1');}
document.body.setAttribute('data-ready','1');});"""


def build_report(output: str, out: str = "report.html", sample: int = 24, seed: int = 0,
                 storage_options: Optional[dict] = None, remote_images: bool = False) -> dict[str, Any]:
    """Write the report; returns {path, rows, sampled, real_images}."""
    summary = read_summary(output, storage_options)
    scan = _Scan(sample, seed)
    for t in iter_output(output, _COLUMNS, storage_options):
        if "status" in t.column_names:
            scan.add(t)
    n = scan.n
    if not n:
        from persqa_ray.export import ExportError
        raise ExportError(f"{output}: no output rows found")
    picks = scan.picks()
    statuses = [{"values": k, "counts": v} for k, v in scan.statuses.items()]
    answers_lengths = scan.lengths
    templates = [{"values": k, "counts": v} for k, v in scan.templates.items()]

    cards, real, cache = [], 0, {}
    decoder = run_decoder(output, storage_options, remote_images)
    for _, r in picks:
        card, shown = _card(r, decoder, cache)
        cards.append(card)
        real += shown

    keys = ("rows_in", "rows_ok", "rows_error", "qa_rows", "qa_rows_ok", "errors_by_status", "qa_rows_by_type",
            "rows_by_subject_type", "recognition_labels", "negatives_by_kind", "recognition_disagreements",
            "text_qa_concepts", "seconds",
            "rows_per_second", "output_tokens_per_second", "model", "warnings")
    cell = (lambda v: html.escape(json.dumps(v, ensure_ascii=False)))
    summary_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{cell(summary[k])}</td></tr>"
                           for k in keys if k in summary)
    plots = "".join([
        _bars("Rows per status", [(s["values"], s["counts"]) for s in statuses]),
        _bars("Answer length (characters)", _histogram(answers_lengths)),
        _bars("Questions per template", sorted(((t["values"], t["counts"]) for t in templates),
                                               key=lambda kv: -kv[1])[:15]),
        _line("QA rows committed over time", _commit_timeline(output, storage_options), "seconds", "QA rows"),
    ])
    doc = (f"<!doctype html><html lang=en><head><meta charset='utf-8'><title>persqa_ray report</title>"
           f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>"
           f"<h1>persqa_ray run report</h1><p class=muted>{html.escape(output)} · {n} output rows · "
           f"{len(picks)} sampled</p>"
           f"<h2>Summary</h2><table class=summary>{summary_rows or '<tr><td>no _summary.json</td></tr>'}</table>"
           f"<h2>Plots</h2><div class=plots>{plots}</div>"
           f"<h2>Sampled rows</h2><div class=gallery>{''.join(cards)}</div></body></html>")
    fs, p = filesystem(out if is_url(out) else out, storage_options)
    with fs.open(p, "w", encoding="utf-8") as f:
        f.write(doc)
    return {"path": out, "rows": n, "sampled": len(picks), "real_images": real}
