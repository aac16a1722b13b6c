"""The input's concepts, before work starts: which tags the model's vocabulary already knows
(prompt.tag_vocab_check), and a read-only pass over the concept column that finds the concepts
recognition needs for its 'No' pairs."""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from persqa_ray.io.readers import concept_values_batch
from persqa_ray.personalization.concepts import load_tokenizer, vocab_collision

if TYPE_CHECKING:
    from persqa_ray.config import PersQAConfig
    from persqa_ray.pipeline.plan import Plan

log = logging.getLogger("persqa_ray")


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


def discover_concepts(p: "Plan") -> "Plan":
    """The input's concepts, found by a read-only pass over the concept column (Ray tasks; no
    images are read): recognition needs them for 'No' pairs, and each new concept's tag is
    checked against the vocabulary before work starts. Only when input.concept_column is set
    and recognition or the vocabulary check is on."""
    from persqa_ray.pipeline.executors import shard_dataset
    cfg, pers = p.config, p.personalization
    if not pers.concept_column or not (pers.recognition or cfg.prompt.tag_vocab_check != "off"):
        return p
    ds = shard_dataset(p.shards).map_batches(concept_values_batch, batch_size=1, batch_format="numpy",
                                             fn_kwargs={"opts": p.read, "column": pers.concept_column})
    # Each shard batch already yields its distinct values: a union here, no shuffle needed.
    known = sorted({b or cfg.prompt.tag for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                    for b in batch.column("concept").to_pylist()})
    invalid, warnings = [], list(p.warnings)
    registered = {c.name for c in pers.registry.registered}
    for name, problem in tag_problems(cfg, [n for n in known if n not in registered]):
        if cfg.prompt.tag_vocab_check == "error":
            invalid.append((name, f"concept {name!r}: {problem}"))
        else:
            warnings.append(f"concept {name!r} (input): {problem}")
    registry = dataclasses.replace(pers.registry, known=tuple(known), invalid=tuple(invalid))
    log.info("concepts in the input: %d", len(known))
    return dataclasses.replace(p, personalization=dataclasses.replace(pers, concepts=registry), warnings=warnings)
