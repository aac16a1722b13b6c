import pytest

from persqa_ray.config import ConfigError, describe_fields, load_config

BASE = {"input": {"path": "in"}, "output": {"path": "out"}}


def test_defaults_and_override_types():
    cfg = load_config(BASE, ["engine.batch_size=8", "output.partition_by=[status, concept]",
                             "prompt.tag=bo", "engine.temperature=0"])
    assert cfg.engine.batch_size == 8
    assert cfg.output.partition_by == ["status", "concept"]
    assert cfg.prompt.tag == "bo" and cfg.engine.temperature == 0.0
    assert cfg.prompt.questions_per_image == 1 and cfg.image.max_pixels == 1003520


@pytest.mark.parametrize("override, field", [
    ("engine.batch_size=0", "engine.batch_size"),
    ("engine.kind=sglang", "engine.kind"),
    ("prompt.tag=<mam>", "prompt.tag"),
    ("output.partition_by=[answer]", "output.partition_by"),
    ("output.pers_qa_format=Q: {question}", "output.pers_qa_format"),
    ("engine.top_p=1.5", "engine.top_p"),
    ("engine.bogus=1", "engine.bogus"),
    ("image.min_pixels=99999999", "image.min_pixels"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [override])
    assert field in str(e.value)


def test_missing_required_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="output"):
        load_config({"input": {"path": "x"}})
    p = tmp_path / "c.yaml"
    p.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_described():
    rows = describe_fields()
    assert len(rows) > 40
    undocumented = [name for name, _, desc in rows if not desc.strip()]
    assert undocumented == []


def test_shipped_configs_validate(repo_root):
    for name in ("demo.yaml", "gpu.yaml", "cluster.yaml"):
        cfg = load_config(repo_root / "configs" / name)
        assert cfg.engine.kind == "vllm"


def test_masked_hides_every_credential_like_value():
    from persqa_ray.config import masked
    tree = {"input": {"storage_options": {"key": "K", "client_kwargs": {"endpoint_url": "http://x"}}},
            "engine": {"env": {"HF_TOKEN": "T"}, "engine_kwargs": {"x": 1}, "api_key_env": "MY_KEY_VAR",
                       "max_tokens": 128, "model": "m"},
            "extra": {"aws_secret_access_key": "S", "session_token": "ST", "password": "P", "tokens": 3}}
    m = masked(tree)
    assert m["input"]["storage_options"] == {"key": "***", "client_kwargs": {"endpoint_url": "***"}}
    assert m["engine"]["env"] == {"HF_TOKEN": "***"} and m["engine"]["engine_kwargs"] == {"x": "***"}
    assert m["engine"]["api_key_env"] == "MY_KEY_VAR" and m["engine"]["max_tokens"] == 128  # names, not secrets
    assert m["extra"] == {"aws_secret_access_key": "***", "session_token": "***", "password": "***", "tokens": 3}


def test_engine_fields_belong_to_their_kind_and_new_families_are_checked():
    with pytest.raises(ConfigError, match="engine.base_url: unknown field for engine.kind 'vllm'"):
        load_config(BASE, ["engine.base_url=http://127.0.0.1:8000/v1"])
    cfg = load_config(BASE, ["engine.kind=openai", "engine.base_url=http://127.0.0.1:8000/v1"])
    assert cfg.engine.kind == "openai" and cfg.engine.structured == "vllm" and cfg.engine.gpus is None
    with pytest.raises(ConfigError, match="^engine.base_url: Field required"):
        load_config(BASE, ["engine.kind=openai"])
    with pytest.raises(ConfigError, match="^prompt.recognition_negatives: 'similar' needs input.embedding_column"):
        load_config(BASE, ["prompt.recognition_negatives=similar"])
    with pytest.raises(ConfigError, match="^prompt.max_reference_images: 4 reference image"):
        load_config(BASE, ["prompt.reference_images_in_prompt=true", "prompt.max_reference_images=4"])
    assert load_config(BASE, ["prompt.reference_images_in_prompt=true", "prompt.max_reference_images=3"])
