import pytest

from persqa_ray.stages.validate import check_answer, format_pers_qa


@pytest.mark.parametrize("text, ok", [
    ("<mam> is smiling at the camera.", True),
    ("  <mam>'s hat is red.\n", True),
    ("<mam>正在微笑看向镜头。", True),
    ("She is smiling.", False),
    ("", False),
    (None, False),
    ("<mam>", False),
    ("<mam> ...", False),
    ("The <mam> is here", False),
])
def test_check_answer(text, ok):
    answer, reason = check_answer(text, "<mam>")
    assert (answer is not None) == ok
    assert (reason is None) == ok


def test_pers_qa_seed_forms():
    q, a = "<mam> What is she doing?", "<mam> is smiling at the camera."
    assert format_pers_qa("Question: {question} Answer: {answer}", q, a) == \
        "Question: <mam> What is she doing? Answer: <mam> is smiling at the camera."
    assert format_pers_qa("Question: {question}, Answer: {answer}", "<mam>在做什么？", "<mam>正在微笑看向镜头。") == \
        "Question: <mam>在做什么？, Answer: <mam>正在微笑看向镜头。"
    assert format_pers_qa("Q: {question} A: {answer}", "q", "{weird} braces") == "Q: q A: {weird} braces"
