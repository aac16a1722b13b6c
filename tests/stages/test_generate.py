"""Generate stage over a real engine: k QA rows per ok row, one row per failed row, retries."""
import asyncio
import contextlib

import numpy as np
import psutil
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data

from persqa_ray import schema
from persqa_ray.engines.base import EngineSpec, run_sync
from persqa_ray.personalization.concepts import Concept, ConceptRegistry
from persqa_ray.personalization.options import PersonalizationOptions
from persqa_ray.stages.generate import GenerateOptions, GenerateStage
from persqa_ray.stages.items import build_items
from persqa_ray.stages.qa_work import request_seed


def decoded_batch(k, ro=None, **extra_columns):
    arr = np.asarray(Image.fromarray(data.chelsea()).resize((224, 140)))
    rows = {"row_id": ["r0", "r1", "r2"], "image": [["a.jpg"], ["a.jpg", "b.jpg"], ["gone.jpg"]],
            "caption": ["cat", "two", "x"], "status": [schema.OK, schema.OK, schema.MISSING_IMAGE],
            "error": [None, None, "gone.jpg: no such file"], **extra_columns}
    t = build_items(pa.table(rows), ro or PersonalizationOptions("mam", 0, k, "en"))
    px = [[arr.tobytes()], [arr.tobytes(), arr.tobytes()], []]
    sh = [[[140, 224]], [[140, 224], [140, 224]], []]
    return (t.append_column(schema.PIXELS, pa.array(px, pa.list_(pa.large_binary())))
            .append_column(schema.SHAPES, pa.array(sh, pa.list_(pa.list_(pa.int32())))))


def opts(**kw):
    base = dict(engine=EngineSpec("vllm"), model_name="tiny", prompt_version="v", seed=0,
                pers_qa_format="Question: {question} Answer: {answer}", max_retries=1, guided_prefix=True)
    base.update(kw)
    return GenerateOptions(**base)


def generate(batch, engine, pers=None, **kw):
    """The stage as an engine actor runs it (its async call), over the shared engine."""
    stage = GenerateStage(opts(**kw), pers or PersonalizationOptions("mam", 0, 1, "en"), engine=engine)
    return run_sync(stage(batch))


def test_k_rows_per_ok_row_and_one_per_error(engine):
    out = generate(decoded_batch(k=2), engine)
    rows = out.to_pylist()
    assert [(r["row_id"], r["qa_index"]) for r in rows] == [("r0", 0), ("r0", 1), ("r1", 0), ("r1", 1), ("r2", 0)]
    ok = [r for r in rows if r["row_id"] != "r2"]
    assert all(r["status"] == schema.OK and r["answer"].startswith("<mam>") for r in ok)
    assert all(r["pers_qa"] == f"Question: {r['question']} Answer: {r['answer']}" for r in ok)
    assert len({r["question"] for r in rows if r["row_id"] == "r0"}) == 2
    err = rows[-1]
    assert err["status"] == schema.MISSING_IMAGE and err["question"] is None and err["answer"] is None
    assert err["error"] == "gone.jpg: no such file"
    assert all(r["caption"] for r in rows)  # input columns kept
    assert not [c for c in out.column_names if c.startswith(schema.INTERNAL_PREFIX)]
    assert out.schema.field("num_input_tokens").type == pa.int32()
    assert rows[2]["num_input_tokens"] > rows[0]["num_input_tokens"]  # two images cost more tokens


def test_unguided_random_text_is_retried_then_flagged(engine):
    # Without structured output the random-weight model practically never starts with <mam>:
    # every QA row is re-asked max_retries times, then recorded as invalid_output with the reason.
    out = generate(decoded_batch(k=1), engine, guided_prefix=False, max_retries=2)
    rows = [r for r in out.to_pylist() if r["row_id"] != "r2"]
    assert all(r["status"] == schema.INVALID_OUTPUT for r in rows)
    assert all(r["attempts"] == 3 and "does not start with <mam>" in r["error"] for r in rows)
    assert all(r["answer"] is None and r["pers_qa"] is None for r in rows)


def test_request_seed_stable_and_distinct():
    assert request_seed(0, "r", 0, 0) == request_seed(0, "r", 0, 0)
    assert len({request_seed(0, "r", q, a) for q in range(3) for a in range(3)}) == 9


def test_subject_type_detected_by_the_vlm_picks_the_families(engine):
    # The real tiny model answers the classification request under a choice constraint, so the
    # label is always one of the three; the open questions are then drawn for that type.
    ro = PersonalizationOptions("mam", 0, 3, "en", detect_subject_type=True, recognition=True)
    out = generate(decoded_batch(3, ro), engine, ro).to_pylist()
    rows = [r for r in out if r["row_id"] != "r2"]
    assert len(rows) == 8   # 3 open + 1 recognition (one concept: no negative) per ok row
    for r in rows:
        assert r["subject_type_source"] == "detected" and r["subject_type"] in ("person", "animal", "object")
    for rid in ("r0", "r1"):
        mine = [r for r in rows if r["row_id"] == rid]
        st = mine[0]["subject_type"]
        families = {r["template_id"].rsplit("-", 1)[0] for r in mine if r["qa_type"] == "open"}
        assert families == {"en-act", "en-scn", f"en-app-{st[0]}"}
        assert [r["qa_type"] for r in mine] == ["open", "open", "open", "recognition"]
        assert mine[3]["answer"] == "Yes, <mam> is in this photo." and mine[3]["label"] == "yes"
    # the detection request's tokens are counted on the row's first QA row
    assert rows[0]["num_input_tokens"] > rows[1]["num_input_tokens"]


def test_recognition_check_asks_yes_no_and_substitution_puts_tags_in(engine):
    reg = ConceptRegistry(default="mam", registered=(Concept("bo", "<bo>", "the dog", "animal"),),
                          known=("bo", "mam"))
    ro = PersonalizationOptions("mam", 0, 1, "en", concepts=reg, concept_column="who", recognition=True,
                        recognition_check=True, substitute=True)
    batch = decoded_batch(1, ro, who=["bo", None, "bo"])
    rows = generate(batch, engine, ro).to_pylist()
    ok = [r for r in rows if r["row_id"] != "r2"]
    assert [r["qa_type"] for r in ok] == ["open", "recognition", "recognition"] * 2
    for r in ok:
        if r["qa_type"] == "recognition":
            assert r["model_label"] in ("yes", "no") and r["num_output_tokens"] >= 1
            assert r["image_concept"] != r["concept"] if r["label"] == "no" else r["image_concept"] == r["concept"]
        else:
            assert r["status"] == schema.OK, r["error"]
            assert r["answer"].startswith(r["tag"]) and r["tag"] in r["question"]
            assert "the dog" not in r["answer"].lower() and "the person" not in r["answer"].lower()
    assert ok[0]["tag"] == "<bo>" and ok[3]["tag"] == "<mam>"
    assert {r["concept"] for r in ok if r["label"] == "no"} == {"bo", "mam"}


class Recorder:
    """The real engine, with the requests it was given kept for the test to read."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    async def agenerate(self, requests):
        self.requests += list(requests)
        return await self.engine.agenerate(requests)


def test_reference_images_come_first_with_their_captions(engine, tmp_path):
    from persqa_ray.stages.decode import DecodeOptions
    refs = []
    for i, box in enumerate([(0, 0, 300, 300), (120, 0, 451, 300)]):
        refs.append(str(tmp_path / f"ref{i}.jpg"))
        Image.fromarray(data.chelsea()).crop(box).save(refs[-1])
    chelsea = Concept("chelsea", "<chelsea>", "the cat", "animal", tuple(refs))
    pers = PersonalizationOptions("mam", 0, 1, "en", concepts=ConceptRegistry(default="mam", registered=(chelsea,)),
                                  concept_column="who", reference_images_in_prompt=True, max_reference_images=2)
    batch = decoded_batch(1, pers, who=["chelsea", None, "chelsea"])
    decode = DecodeOptions(max_pixels=50176, min_pixels=3136, factor=28, max_aspect_ratio=150.0,
                           max_decode_pixels=10**8, max_image_bytes=1 << 26, max_images=4,
                           allowed_roots=(str(tmp_path),), allowed_schemes=("file",), storage_options={})
    rec = Recorder(engine)
    stage = GenerateStage(opts(), pers, engine=rec, references=decode)
    rows = run_sync(stage(batch)).to_pylist()
    first = rec.requests[0]   # row r0: one query image, two reference images of <chelsea>
    assert len(first.all_images()) == 3 and first.all_images()[2] is first.images[0]
    assert [cap for _, cap in first.references] == ["This is <chelsea>."] * 2
    assert first.references[0][0].shape != first.references[1][0].shape          # the two crops, in order
    prompt = engine.render_prompt(first)
    assert prompt.count("<|vision_start|>") == 3
    assert prompt.index("This is <chelsea>.") < prompt.rindex("<|vision_start|>") < prompt.index(first.user_prompt)
    assert rows[0]["status"] == schema.OK and rows[0]["reference_images"] == refs
    assert rows[0]["answer"].startswith("<chelsea>") and rows[1]["reference_images"] == []   # <mam>: none
    # the engine saw them: row r0 (its image and two references) has more prompt tokens than r1 (two images)
    assert rows[0]["num_input_tokens"] > rows[1]["num_input_tokens"]


def stage_with_its_own_engine(tiny_model, async_engine: bool, request_timeout_s: float):
    """A stage that builds (and may rebuild) its own real engine, and that engine's EngineCore
    process: this process's children started after the engine's snapshot (the worker is a
    grandchild; the faults below are EngineCore's)."""
    spec = EngineSpec("vllm", dict(async_engine=async_engine, model=tiny_model, enforce_eager=True, max_model_len=2048,
                                   max_images_per_prompt=4, max_tokens=16, seed=0,
                                   request_timeout_s=request_timeout_s))
    stage = GenerateStage(opts(engine=spec, max_engine_restarts=1), PersonalizationOptions("mam", 0, 1, "en"))
    core = [p for p in psutil.Process().children() if p.pid not in stage.engine._children_before]
    return stage, core


@pytest.mark.slow
@pytest.mark.parametrize("async_engine", [True, False], ids=["async", "offline"])
def test_a_batch_that_comes_while_the_engine_restarts_is_answered_by_the_new_engine(tiny_model, async_engine):
    """CI saw this race (test_killed_engine_process_is_recreated, 2026-12-05): the engine process
    dies, one batch restarts the engine (its shutdown runs in a thread, the loop stays free), and a
    batch that reaches the actor meanwhile was sent to the stopped engine, whose `alive()` raised
    AttributeError: the actor failed and the run stopped (the offline engine, stopped, said it was alive:
    the batch's rows became engine_error). Such a batch must wait for the new engine."""
    # request_timeout_s as a run sets it (config default 600 s), lower: an engine killed before its
    # first request leaves vLLM's requests waiting (its output task was never started) until then.
    stage, core = stage_with_its_own_engine(tiny_model, async_engine, request_timeout_s=120)
    old = stage.engine
    try:
        async def two_batches():
            await stage(decoded_batch(k=1))  # mid-run, as on CI: the engine has answered before it dies
            for p in core:
                p.kill()
            first = asyncio.create_task(stage(decoded_batch(k=1)))
            while old._engine() is not None:  # the first batch found the engine dead and is stopping it
                assert not first.done()
                await asyncio.sleep(0)
            assert stage.engine is old  # the window: stopped, not yet replaced
            second = await stage(decoded_batch(k=1))
            assert stage.engine is not old and stage.engine.alive()  # in the loop the engine runs on
            return await first, second

        first, second = asyncio.run(two_batches())
        assert stage.engine_restarts == 1
        for out in (first, second):
            assert [(r["row_id"], r["status"]) for r in out.to_pylist()] == [
                ("r0", schema.OK), ("r1", schema.OK), ("r2", schema.MISSING_IMAGE)]
    finally:
        stage.engine.shutdown()


@pytest.mark.slow
def test_a_frozen_offline_engine_times_out_and_is_restarted(tiny_model):
    """engine.async_engine: false and the engine process frozen (SIGSTOP) mid-batch: the call ends
    after request_timeout_s (vLLM's offline client would wait forever), the engine is rebuilt and
    the batch retried on it."""
    stage, frozen = stage_with_its_own_engine(tiny_model, async_engine=False, request_timeout_s=5)
    old = stage.engine
    try:
        run_sync(stage(decoded_batch(k=1)))  # the engine has answered before it freezes
        for p in frozen:
            p.suspend()
        out = run_sync(stage(decoded_batch(k=1)))
        assert old.hung and not old.alive() and stage.engine_restarts == 1 and stage.engine is not old
        assert [(r["row_id"], r["status"]) for r in out.to_pylist()] == [
            ("r0", schema.OK), ("r1", schema.OK), ("r2", schema.MISSING_IMAGE)]
    finally:
        for p in frozen:
            with contextlib.suppress(psutil.Error):
                p.kill()
        stage.engine.shutdown()


def test_a_dead_engine_shutdown_neither_hangs_the_restart_nor_waits_for_the_loop_threads():
    """The restart once stopped for good after "engine died; recreating it". Its shutdown of the dead
    engine now runs in a thread of its own (the loop's shared pool can be full of in-flight work)
    and is waited for at most `wait_s`."""
    import asyncio
    import threading
    import time

    from persqa_ray.stages.generate import _shut_down_dead

    release = threading.Event()

    class Engine:
        def __init__(self, hangs: bool):
            self.hangs, self.stopped = hangs, False

        def shutdown(self):
            if self.hangs:
                release.wait(60)
            self.stopped = True

    async def restart_with_a_full_pool(engine):
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(None, release.wait, 60) for _ in range(64)]  # every shared thread
        t0 = time.monotonic()
        await _shut_down_dead(engine, wait_s=2.0)
        took, stopped = time.monotonic() - t0, engine.stopped
        release.set()
        await asyncio.gather(*busy)
        return took, stopped

    took, stopped = asyncio.run(restart_with_a_full_pool(Engine(hangs=False)))
    assert took < 1.5 and stopped  # old: asyncio.to_thread waited for a free shared thread (60 s here)
    release.clear()
    took, stopped = asyncio.run(restart_with_a_full_pool(Engine(hangs=True)))
    assert 1.9 < took < 5 and not stopped  # gave up waiting, the restart goes on
