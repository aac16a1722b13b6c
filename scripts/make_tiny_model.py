"""Build a tiny random-weight Qwen2-VL as a normal Hugging Face model directory (offline).

Used by the demo, the tests and the CPU benchmark: vLLM loads it like any Qwen2-VL (images in,
text out). Its answers are random text; with structured output they still match the format.
Deterministic (fixed seeds, fixed corpus) and cached: an existing complete directory is reused.

    python scripts/make_tiny_model.py [OUT_DIR]      # default: models/tiny-qwen2-vl
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

VERSION = "3"  # bump when the model's shape or files change; stale caches are rebuilt
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2-VL's chat template, reduced to what vLLM and our requests use: system/user/assistant
# turns, string or list content, images rendered as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Processor bounds: small images keep the tiny ViT cheap (at most 64 image tokens per image).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224

_WORDS = (
    "the a an is are was on in at with of and to his her its their this that what where who how "
    "person man woman child cat dog bird cup mug rocket coffee table chair street park room sky "
    "wearing holding sitting standing smiling looking walking lying playing drinking red blue green "
    "white black brown yellow orange gray striped wooden metal glass plastic round square tall small "
    "large old young happy calm hair shirt jacket hat glasses fur tail ear eye nose face photo image "
    "camera background front side near next yes no it he she they color shape made material "
    "doing wear look like kind breed posture expression scene outdoors indoors day night light"
).split()
_ZH = ("的 是 在 有 一 个 人 猫 狗 杯 子 火 箭 咖 啡 穿 着 戴 看 向 镜 头 微 笑 正 坐 站 红 蓝 绿 白 黑 色 "
       "头 发 衣 服 什 么 哪 里 做 这 张 照 片 中 吗 不").split()


def _corpus() -> list[str]:
    import random
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        n = rng.randint(4, 14)
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(n)) + rng.choice([".", "?", "!"]))
        lines.append("".join(rng.choice(_ZH) for _ in range(rng.randint(3, 10))) + "。")
    lines += ["Question: What is <mam> doing? Answer: <mam> is smiling at the camera."] * 50
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    torch.manual_seed(0)
    tok = build_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tok) + 63) // 64) * 64
    text_config = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False)
    vision_config = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)

    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    video_processor = None
    try:  # transformers 5 wants a video processor object; vLLM never uses it (video limit 0)
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        video_processor = Qwen2VLVideoProcessor()
    except Exception:  # noqa: BLE001 - optional part
        pass
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    GenerationConfig(bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                     pad_token_id=ids["<|endoftext|>"]).save_pretrained(tmp)
    (tmp / "persqa_tiny.json").write_text(json.dumps(
        {"version": VERSION, "parameters": sum(p.numel() for p in model.parameters()),
         "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure(out: Path) -> Path:
    """Build unless a complete model of this VERSION is already there."""
    stamp = out / "persqa_tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == VERSION:
        return out
    return build(out)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "models/tiny-qwen2-vl").resolve()
    path = ensure(target)
    info = json.loads((path / "persqa_tiny.json").read_text())
    print(f"tiny Qwen2-VL at {path} ({info['parameters']:,} parameters)")
