import copy

import pytest
import yaml

from persqa_ray.personalization.templates import (
    LANGUAGES,
    SUBJECT_TYPES,
    TEMPLATE_DIR,
    TemplateError,
    draw_questions,
    lint,
    load_templates,
    parse_templates,
)


def family_counts(ts) -> dict[str, int]:
    """Templates per family, recognition included."""
    out: dict[str, int] = {}
    for t in ts.templates:
        out[t.family] = out.get(t.family, 0) + 1
    return {**out, "recognition": len(ts.recognition.templates)}


@pytest.mark.parametrize("language", LANGUAGES)
def test_packaged_templates_lint_clean(language):
    ts = load_templates(language)
    assert lint(ts) == [] and ts.language == language
    counts = family_counts(ts)
    assert set(counts) == {"activity", "scene", "appearance_person", "appearance_animal", "appearance_object",
                           "recognition"}
    assert all(n >= 5 for n in counts.values())
    assert all(t.id.startswith(f"{language}-") for t in ts.templates + ts.recognition.templates)


def test_languages_have_the_same_families_and_chinese_text():
    en, zh = load_templates("en"), load_templates("zh")
    assert family_counts(en) == family_counts(zh)
    assert "{tag}在做什么？" in [t.text for t in zh.templates]          # the Chinese seed's question
    assert "What is {tag} doing?" in [t.text for t in en.templates]   # the English seed's question
    assert zh.pers_qa_format == "Question: {question}, Answer: {answer}"
    assert all(any("\u4e00" <= c <= "\u9fff" for c in t.text) for t in zh.templates)


def test_draw_is_reproducible_and_seeded():
    ts = load_templates("en")
    a = [t.id for t in draw_questions(ts, 0, "row-1", 3)]
    assert a == [t.id for t in draw_questions(ts, 0, "row-1", 3)]
    firsts = {draw_questions(ts, 0, f"row-{i}", 1)[0].id for i in range(50)}
    assert len(firsts) > 3
    assert [t.id for t in draw_questions(ts, 1, "row-1", 3)] != a or \
        [t.id for t in draw_questions(ts, 2, "row-1", 3)] != a


@pytest.mark.parametrize("subject_type", SUBJECT_TYPES)
def test_k_distinct_spread_over_exactly_the_subject_types_families(subject_type):
    ts = load_templates("en")
    for i in range(40):
        chosen = draw_questions(ts, 0, f"r{i}", 3, subject_type=subject_type)
        assert len({t.id for t in chosen}) == 3
        # k=3 over the three eligible families: one question of each
        assert {t.family for t in chosen} == {"activity", "scene", f"appearance_{subject_type}"}
    many = draw_questions(ts, 0, "r", 15, subject_type=subject_type)
    assert len(many) == 15 and len({t.id for t in many}) == 15  # all of them, none twice
    assert draw_questions(ts, 0, "r", 16, subject_type=subject_type) == many  # no more exist


def test_unknown_subject_type_gets_only_universal_families():
    ts = load_templates("en")
    chosen = draw_questions(ts, 0, "r", 4, subject_type=None)
    assert len({t.id for t in chosen}) == 4 and {t.family for t in chosen} == {"activity", "scene"}


def _raw(language="en"):
    return yaml.safe_load((TEMPLATE_DIR / f"{language}.yaml").read_text(encoding="utf-8"))


def test_lint_catches_problems():
    bad = _raw()
    fam = bad["families"]["activity"]["templates"]
    fam.append({"id": fam[0]["id"], "text": "Who is with {tag}?"})                       # duplicate id
    fam.append({"id": "x-2", "text": fam[1]["text"].upper()})                            # duplicate text
    fam.append({"id": "x-3", "text": "No placeholder here?"})                             # missing tag
    fam.append({"id": "x-4", "text": "Where is {tga}?"})                                  # typo placeholder
    # Yo'LLaVA's bug: two adjacent Python string literals with the comma missing are joined.
    fam.append({"id": "x-5", "text": "Can you see {tag} in this photo?" "Is {tag} in this image?"})
    fam.append({"id": "x-6", "text": "Is {tag} here? Is {tag} there?"})                  # two questions
    bad["recognition"]["yes_answer"] = "Yes."                                             # label answer, no tag
    with pytest.raises(TemplateError) as e:
        parse_templates(bad)
    msg = str(e.value)
    assert f"duplicate template id {fam[0]['id']}" in msg and "duplicate template text" in msg
    assert "x-3: no {tag} placeholder" in msg and "x-4: unknown placeholder {tga}" in msg
    assert "x-5: two sentences run together" in msg and "x-6: two sentences run together" in msg
    assert "recognition.yes_answer: no {tag} placeholder" in msg


def test_lint_catches_joined_chinese_and_bad_labels():
    bad = _raw("zh")
    bad["families"]["scene"]["templates"].append({"id": "zh-x", "text": "{tag}在哪里？" "{tag}在做什么？"})
    bad["classify"]["labels"] = {"person": "person", "animal": "animal"}
    with pytest.raises(TemplateError) as e:
        parse_templates(bad)
    assert "zh-x: two sentences run together" in str(e.value) and "classify.labels" in str(e.value)


def test_malformed_file_and_language_mismatch(tmp_path):
    broken = copy.deepcopy(_raw())
    del broken["recognition"]
    with pytest.raises(TemplateError, match="malformed template file"):
        parse_templates(broken)
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(_raw("zh"), allow_unicode=True), encoding="utf-8")
    with pytest.raises(TemplateError, match="a 'zh' template file, but prompt.language is 'en'"):
        load_templates("en", str(p))
