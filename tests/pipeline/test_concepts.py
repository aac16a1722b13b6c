"""The concept pass as a Ray Data aggregation over a real local Ray: subject types by majority and
the most similar concepts by mean embedding, per concept, from rows spread over several shards."""
import json

import ray

from persqa_ray.pipeline import plan
from persqa_ray.pipeline.concepts import most_similar
from persqa_ray.pipeline.run import _prepare


def test_most_similar_ranks_by_cosine_and_never_itself():
    import numpy as np
    names = ["a", "b", "c"]
    got = most_similar(names, np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), block=2)
    assert got == {"a": ("b", "c"), "b": ("a", "c"), "c": ("b", "a")}


def test_types_and_similar_concepts_from_the_input(tmp_path):
    # Two shards; "cat1" and "cat2" point one way, "mug" and "cup" the other; "dog" is near the cats.
    vec = {"cat1": [1, 0.1, 0], "cat2": [0.9, 0.2, 0], "dog": [0.7, 0.5, 0], "mug": [0, 0.1, 1], "cup": [0, 0.2, 0.9]}
    kinds = {"cat1": "animal", "cat2": "animal", "dog": "animal", "mug": "object", "cup": "object"}
    for s, names in enumerate((["cat1", "mug", "dog"], ["cat2", "cup", "cat1"])):
        rows = [{"image": "x.jpg", "who": n, "kind": kinds[n] if i else None, "emb": [v + 0.01 * i for v in vec[n]]}
                for n in names for i in range(3)]
        rows.append({"image": "x.jpg", "who": ["cat1", "mug"], "kind": "person", "emb": [5, 5, 5]})  # ignored
        (tmp_path / f"s{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"input": {"path": str(tmp_path), "concept_column": "who", "subject_type_column": "kind",
                     "embedding_column": "emb"},
           "prompt": {"recognition": True, "recognition_negatives": "similar", "tag_vocab_check": "off"},
           "engine": {"kind": "standin"}, "output": {"path": str(tmp_path / "out")}}
    try:
        p, _ = _prepare(plan(cfg))
    finally:
        ray.shutdown()
    reg = p.personalization.registry
    assert sorted(reg.known) == ["cat1", "cat2", "cup", "dog", "mug"]
    assert dict(reg.types) == kinds   # the multi-concept row's "person" counts for no concept
    similar = dict(reg.similar)
    assert similar["cat1"][:2] == ("cat2", "dog") and similar["mug"][0] == "cup" and similar["cup"][0] == "mug"
    assert reg.negatives == "similar"
