import pyarrow as pa

from persqa_ray import schema
from persqa_ray.stages.requests import RequestOptions, build_requests, plan_questions


def opts(**kw):
    base = dict(tag_name="mam", seed=0, questions_per_image=1, language="en")
    base.update(kw)
    return RequestOptions(**base)


def batch(n=3):
    return pa.table({"row_id": [f"r{i}" for i in range(n)], "image": [["a.jpg"]] * (n - 1) + [["a.jpg", "b.jpg"]],
                     "status": [schema.OK] * n, "error": [None] * n})


def test_single_and_multi_image_rows_get_k_questions():
    out = build_requests(batch(), opts(questions_per_image=2))
    qs = out.column(schema.QUESTIONS).to_pylist()
    assert [len(q) for q in qs] == [2, 2, 2]  # the two-image row still gets k QA, not k per image
    assert all("<mam>" in q for row in qs for q in row)
    assert out.column("tag").to_pylist() == ["<mam>"] * 3 and out.column("concept").to_pylist() == ["mam"] * 3
    prompts = out.column(schema.PROMPTS).to_pylist()
    assert all(p.startswith(q) and "starting your answer with <mam>" in p for qr, pr in zip(qs, prompts)
               for q, p in zip(qr, pr))


def test_same_seed_same_questions_other_tag():
    a = build_requests(batch(), opts()).column(schema.TEMPLATE_IDS).to_pylist()
    b = build_requests(batch(), opts()).column(schema.TEMPLATE_IDS).to_pylist()
    assert a == b
    q, ids, _ = plan_questions(opts(tag_name="bo"), "r0")
    assert "<bo>" in q[0] and ids == a[0]  # the tag changes the text, not the draw


def test_system_prompt_mentions_tag():
    sp = opts(tag_name="bo").render_system_prompt()
    assert "<bo>" in sp and "{tag}" not in sp
