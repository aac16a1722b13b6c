"""The DataFlow-MM serving faces: `generate_from_input_messages` on both, and `APIVLMServing_openai`
(DataFlow-MM's constructor) over our OpenAI engine against a real `vllm serve` on 127.0.0.1."""
import json
import os

import pytest

from persqa_ray.compat import APIVLMServing_openai, FileStorage, LocalModelVLMServing_vllm, PersQAGenerate
from persqa_ray.compat.serving import ServingError, conversation_request
from tests.compat.test_dataflow_examples import FORM, make_workdir
from tests.conftest import API_KEY


def test_conversations_in_both_styles_become_one_request(tmp_path):
    make_workdir(tmp_path)
    img = str(tmp_path / "test" / "example1.jpg")
    serving = LocalModelVLMServing_vllm(hf_model_name_or_path=str(tmp_path))  # nothing starts until used
    # DataFlow's local style: ShareGPT turns, "<image>" tokens where the images go.
    r = conversation_request([{"from": "human", "value": "<image><image>Who is <mam>?"}], [img, img],
                             "sys", serving.decoder)
    assert (r.system_prompt, r.user_prompt, r.history) == ("sys", "Who is <mam>?", ())
    assert len(r.images) == 2 and r.images[0].ndim == 3 and r.images[0].shape[0] * r.images[0].shape[1] <= 1003520
    # The API style with history: earlier turns kept, a system turn replaces the system prompt.
    r = conversation_request([{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": [{"type": "text", "text": "And <mam>?"}]}],
                             [], "sys", serving.decoder)
    assert (r.system_prompt, r.user_prompt) == ("be brief", "And <mam>?")
    assert r.history == (("user", "Hi"), ("assistant", "Hello")) and r.images == []
    with pytest.raises(ServingError, match="end with a user turn"):
        conversation_request([{"from": "gpt", "value": "x"}], [], "s", serving.decoder)
    with pytest.raises(ServingError, match="missing_image"):
        conversation_request([{"from": "human", "value": "<image>x"}], [str(tmp_path / "nope.jpg")], "s",
                             serving.decoder)


@pytest.mark.slow
def test_local_serving_answers_messages_and_prompts(tmp_path, tiny_model, engine):
    make_workdir(tmp_path)
    img = str(tmp_path / "test" / "example2.jpg")
    serving = LocalModelVLMServing_vllm(hf_model_name_or_path=tiny_model)
    serving._engine = engine  # the session's engine (same model): no second start-up
    try:
        out = serving.generate_from_input_messages(
            [[{"from": "human", "value": "<image>What is <mam> doing?"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Describe <mam>."}],
             [{"from": "human", "value": "<image>What now?"}]],
            image_list=[[img], None, [str(tmp_path / "gone.jpg")]])
        assert len(out) == 3 and out[0] and out[1] and out[2] == ""  # the unreadable image: that row only
        prompt = serving.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
            tokenize=False, add_generation_prompt=True)
        assert all(isinstance(t, str) and t for t in serving.generate_from_input([prompt], image_inputs=[[img]]))
        with pytest.raises(ValueError, match="video"):
            serving.generate_from_input(["x"], video_inputs=[["a.mp4"]])
    finally:
        serving._engine = None  # not ours to shut down


def test_api_serving_needs_its_key_variable(monkeypatch):
    monkeypatch.delenv("DF_API_KEY", raising=False)
    with pytest.raises(EnvironmentError, match="DF_API_KEY"):
        APIVLMServing_openai(api_url="http://127.0.0.1:9/v1")


@pytest.mark.slow
def test_api_serving_and_the_operator_over_vllm_serve(tmp_path, monkeypatch, vllm_server):
    """DataFlow-MM's APIVLMServing_openai constructor, pointed at `vllm serve`: both serving calls
    answer, and the operator produces tag-first rows through it (the server's structured output)."""
    rows_in = make_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DF_API_KEY", API_KEY)
    serving = APIVLMServing_openai(api_url=vllm_server["base_url"], key_name_of_api_key="DF_API_KEY",
                                   model_name="tiny", max_workers=4, timeout=60, max_tokens=16, structured="vllm")
    try:
        texts = serving.generate_from_input(["What is in this photo?", "And here?"], system_prompt="Be brief.",
                                            image_inputs=[["./test/example1.jpg"], ["./test/missing.jpg"]])
        assert texts[0] and texts[1] == ""
        msgs = serving.generate_from_input_messages([[{"role": "user", "content": "Describe it."}]],
                                                    image_list=[["./test/example3.jpg"]])
        assert len(msgs) == 1 and msgs[0]
        storage = FileStorage(first_entry_file_name="data/example.jsonl", cache_path="./cache_local",
                              file_name_prefix="pers_qa", cache_type="jsonl")
        storage.step()
        assert PersQAGenerate(serving).run(storage=storage, multi_modal_key="image", output_key="pers_qa") == \
            ["pers_qa"]
    finally:
        serving.cleanup()
    out = [json.loads(line) for line in open("cache_local/pers_qa_step1.jsonl")]
    assert len(out) == len(rows_in)
    assert all(r["status"] == "ok" and FORM.match(r["pers_qa"]) for r in out[:3]), [r["error"] for r in out]
    assert out[3]["status"] == "missing_image" and out[3]["pers_qa"] is None
    assert API_KEY not in json.dumps(out) and os.environ["DF_API_KEY"] == API_KEY
