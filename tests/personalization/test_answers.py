import pytest

from persqa_ray.personalization.answers import check_answer, format_pers_qa, substitute_phrase


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


@pytest.mark.parametrize("text, reason", [
    ("<mam> I can't tell from this image.", "refusal"),
    ("<mam> I'm sorry, but I cannot help.", "refusal"),
    ("<mam> is, as an AI, not something I can describe.", "refusal"),
    ("<mam>抱歉，我无法回答。", "refusal"),
    ("<mam>作为一个人工智能，我不能识别。", "refusal"),
    ("<mam> is the cat on the sofa.", "calls the subject 'the cat'"),
    ("<mam> The Cat sits.", "calls the subject 'the cat'"),
    ("<mam> What is she doing?", "repeats the question"),
    ("<mam> what is", "repeats the question"),
])
def test_answer_checks_name_the_reason(text, reason):
    answer, why = check_answer(text, "<mam>", question="<mam> What is she doing?", class_phrase="the cat")
    assert answer is None and reason in why


@pytest.mark.parametrize("text", [
    "<mam> is smiling at the camera.",
    "<mam> says she can't wait for the launch.",   # a refusal phrase later on is not a refusal
    "<mam> is doing what she always does.",
])
def test_answer_checks_let_real_answers_through(text):
    assert check_answer(text, "<mam>", question="<mam> What is she doing?", class_phrase="the cat") == (text, None)


def test_repeated_question_in_chinese():
    answer, why = check_answer("<mam>在做什么？", "<mam>", question="<mam>在做什么？")
    assert answer is None and "repeats the question" in why
    assert check_answer("<mam>正在微笑看向镜头。", "<mam>", question="<mam>在做什么？")[1] is None


def test_substitution_puts_the_tag_back():
    assert substitute_phrase("The cat is on the sofa; the cat's tail is up.", "the cat", "<bo>") == \
        "<bo> is on the sofa; <bo>'s tail is up."
    assert substitute_phrase("这只动物正坐着。", "这只动物", "<mam>") == "<mam>正坐着。"
    assert substitute_phrase(None, "the cat", "<bo>") is None
