"""The input's concepts, before work starts: which tags the model's vocabulary already knows
(prompt.tag_vocab_check), and a read-only pass over the input (no images) that finds the
concepts recognition needs for its 'No' pairs, each concept's subject type (the majority of its
rows' subject-type column) and, with input.embedding_column, the concepts most similar to each.

The pass is a Ray Data aggregation: each read task sums its shard per concept (rows, type votes,
embedding sums), a group-by over concepts merges the shards, and the driver receives one row per
concept (O(concepts), never O(rows)).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import pyarrow as pa

from persqa_ray import schema
from persqa_ray.io.readers import ReadOptions, read_shard
from persqa_ray.personalization.concepts import load_tokenizer, vocab_collision
from persqa_ray.personalization.templates import SUBJECT_TYPES
from persqa_ray.pipeline.cluster import in_own_worker

if TYPE_CHECKING:
    from persqa_ray.config import PersQAConfig
    from persqa_ray.pipeline.plan import Plan

log = logging.getLogger("persqa_ray")
TOP_SIMILAR = 8  # similar concepts kept per concept (negative_for draws among the first 3 present)
_VOTES = [f"n_{st}" for st in SUBJECT_TYPES]


def tag_problems(cfg: "PersQAConfig", names: list[str]) -> list[tuple[str, str]]:
    """(concept name, problem) for tags the model's tokenizer already knows (prompt.tag_vocab_check)."""
    if cfg.prompt.tag_vocab_check == "off" or cfg.engine.kind != "vllm" or not names:
        return []
    tokenizer = load_tokenizer(cfg.engine.model)
    if tokenizer is None:
        return []
    configured = cfg.prompt.concepts
    out = []
    for name in dict.fromkeys(names):
        tag_name = (configured[name].tag or name) if name in configured else name
        problem = vocab_collision(tokenizer, tag_name)
        if problem:
            out.append((name, problem))
    return out


def _accumulate(acc: dict, table: pa.Table, column: str, type_column: Optional[str], emb_column: Optional[str]):
    n = table.num_rows
    col = (lambda c: table.column(c).to_pylist() if c and c in table.column_names else [None] * n)
    for value, st, emb in zip(col(schema.CONCEPTS), col(type_column), col(emb_column)):
        names = value or [""]
        for name in names:
            a = acc.setdefault(name, {"n": 0, "votes": dict.fromkeys(SUBJECT_TYPES, 0), "emb": None, "emb_n": 0})
            a["n"] += 1
        if len(names) != 1:
            continue  # a multi-concept row says nothing about one concept's type or look
        a = acc[names[0]]
        if isinstance(st, str) and st.strip().lower() in SUBJECT_TYPES:
            a["votes"][st.strip().lower()] += 1
        if isinstance(emb, str):  # input columns carry nested values as JSON text (io/readers._column)
            try:
                emb = json.loads(emb)
            except ValueError:
                emb = None
        if isinstance(emb, (list, tuple)) and emb and all(isinstance(x, (int, float)) for x in emb):
            v = np.asarray(emb, dtype=np.float64)
            if a["emb"] is None or a["emb"].shape == v.shape:
                a["emb"] = v if a["emb"] is None else a["emb"] + v
                a["emb_n"] += 1


def concept_stats_batch(batch: dict, opts: ReadOptions, column: str, type_column: Optional[str] = None,
                        emb_column: Optional[str] = None) -> Iterator[pa.Table]:
    """map_batches UDF: one shard's per-concept partial sums (a blank value is the default concept,
    '')."""
    for shard, fmt in zip(batch["shard"], batch["format"]):
        acc: dict = {}
        for table in read_shard(str(shard), str(fmt), opts):
            _accumulate(acc, table, column, type_column, emb_column)
        names = sorted(acc)
        yield pa.table({"concept": pa.array(names, pa.string()), "n": [acc[k]["n"] for k in names],
                        **{f"n_{st}": [acc[k]["votes"][st] for k in names] for st in SUBJECT_TYPES},
                        "emb": pa.array([None if acc[k]["emb"] is None else acc[k]["emb"].tolist() for k in names],
                                        pa.list_(pa.float64())),
                        "emb_n": [acc[k]["emb_n"] for k in names]})


def merge_partials(group: pa.Table) -> pa.Table:
    """map_groups UDF: one concept's partial sums from every shard, summed."""
    embs = [np.asarray(e) for e in group.column("emb").to_pylist() if e is not None]
    emb = np.sum(embs, axis=0).tolist() if embs and len({e.shape for e in embs}) == 1 else None
    row = {"concept": [group.column("concept")[0].as_py()],
           **{c: [int(sum(group.column(c).to_pylist()))] for c in ["n", *_VOTES, "emb_n"]},
           "emb": pa.array([emb], pa.list_(pa.float64()))}
    return pa.table(row)


def most_similar(names: list[str], means: np.ndarray, top: int = TOP_SIMILAR, block: int = 1024) -> dict:
    """concept -> the others by cosine similarity of their mean embeddings, most similar first
    (computed a block of concepts at a time: memory block x concepts, not concepts squared)."""
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    out = {}
    for start in range(0, len(names), block):
        sims = unit[start:start + block] @ unit.T
        for i, row in enumerate(sims):
            row[start + i] = -np.inf  # never itself
            order = np.argsort(-row, kind="stable")[:top]
            out[names[start + i]] = tuple(names[j] for j in order if np.isfinite(row[j]))
    return out


def _aggregate(shards, read, column: str, type_column: Optional[str], emb_column: Optional[str]) -> list[dict]:
    """Per concept, over the whole input (in a worker of its own: cluster.in_own_worker)."""
    from persqa_ray.pipeline.executors import shard_dataset
    ds = shard_dataset(shards).map_batches(
        concept_stats_batch, batch_size=1, batch_format="numpy",
        fn_kwargs={"opts": read, "column": column, "type_column": type_column, "emb_column": emb_column})
    merged = ds.groupby("concept").map_groups(merge_partials, batch_format="pyarrow")
    return [r for b in merged.iter_batches(batch_size=None, batch_format="pyarrow") for r in b.to_pylist()]


def _column(name: str) -> str:
    return schema.input_column_name(name)


def discover_concepts(p: "Plan") -> "Plan":
    """Only when input.concept_column is set and recognition, the vocabulary check or text QA
    needs the input's concepts."""
    cfg, pers = p.config, p.personalization
    if not pers.concept_column or not (pers.recognition or cfg.prompt.tag_vocab_check != "off"
                                       or pers.text_qa_per_concept):
        return p
    emb = cfg.input.embedding_column and _column(cfg.input.embedding_column)
    rows = in_own_worker(_aggregate, p.shards, p.read, pers.concept_column, pers.subject_type_column, emb)
    for r in rows:
        r["concept"] = r["concept"] or cfg.prompt.tag
    known = sorted({r["concept"] for r in rows})
    types = tuple(sorted((r["concept"], max(SUBJECT_TYPES, key=lambda st: r[f"n_{st}"])) for r in rows
                         if any(r[v] for v in _VOTES)))
    with_emb = [r for r in rows if r["emb"] is not None and r["emb_n"]]
    similar = {}
    if with_emb and len({len(r["emb"]) for r in with_emb}) == 1:
        means = np.asarray([np.asarray(r["emb"]) / r["emb_n"] for r in with_emb])
        similar = most_similar([r["concept"] for r in with_emb], means)
    invalid, warnings = [], list(p.warnings)
    registered = {c.name for c in pers.registry.registered}
    for name, problem in tag_problems(cfg, [n for n in known if n not in registered]):
        if cfg.prompt.tag_vocab_check == "error":
            invalid.append((name, f"concept {name!r}: {problem}"))
        else:
            warnings.append(f"concept {name!r} (input): {problem}")
    registry = dataclasses.replace(pers.registry, known=tuple(known), invalid=tuple(invalid), types=types,
                                   similar=tuple(sorted(similar.items())))
    log.info("concepts in the input: %d (%d with a subject type, %d with an embedding)", len(known), len(types),
             len(similar))
    return dataclasses.replace(p, personalization=dataclasses.replace(pers, concepts=registry), warnings=warnings)


def with_concept_rows(p: "Plan") -> "Plan":
    """prompt.text_qa_per_concept: one more shard, of one row per concept with reference images
    (among the input's concepts when the concept pass found them), for its text-only questions."""
    from persqa_ray.io.concept_rows import concept_shard
    pers = p.personalization
    if not pers.text_qa_per_concept:
        return p
    known = set(pers.registry.known)
    rows = tuple((c.name, c.reference_images) for c in pers.registry.registered
                 if c.reference_images and (not known or c.name in known))
    if not rows:
        log.warning("prompt.text_qa_per_concept: no concept has reference images; no text-only QA is asked")
        return dataclasses.replace(p, warnings=[*p.warnings, "prompt.text_qa_per_concept: no concept has "
                                                "reference images (prompt.concepts.NAME.reference_images)"])
    return dataclasses.replace(p, shards=[*p.shards, concept_shard()],
                               read=dataclasses.replace(p.read, concept_rows=rows))
