from bastion.config import MeteringConfig
from bastion.metering import Usage, input_bound, plausible, usage_from

CFG = MeteringConfig(base_tokens=10, item_tokens=5, image_tokens=1000)


def test_bound_counts_utf8_bytes_and_allowances():
    ascii_body = {"model": "m", "input": "hello"}
    assert input_bound(ascii_body, 1, CFG) == 10 + 5 + 5
    text = "héllo wörld ✓"
    body = {"model": "m", "input": text}
    assert input_bound(body, 1, CFG) == 10 + 5 + len(text.encode())


def test_images_count_a_flat_allowance_not_their_bytes():
    image = {"type": "input_image", "image_url": "data:image/png;base64," + "A" * 100_000}
    body = {"model": "m", "input": [{"role": "user", "content": [image]}]}
    assert input_bound(body, 1, CFG) < 1200


def test_deep_nesting_does_not_recurse():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    assert input_bound({"model": "m", "input": deep}, 1, CFG) > 0


def test_usage_shapes():
    assert usage_from({"usage": {"input_tokens": 3, "output_tokens": 4}}, "responses")
    chat = usage_from({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "chat")
    assert chat is not None and (chat.input_tokens, chat.output_tokens) == (3, 4)
    assert usage_from({"usage": None}, "chat") is None
    assert usage_from({"usage": {"prompt_tokens": -1, "completion_tokens": 4}}, "chat") is None
    assert usage_from({"usage": {"prompt_tokens": True, "completion_tokens": 4}}, "chat") is None


def test_every_media_part_counts_the_models_allowance_not_its_url():
    """Video and audio count like images: a short URL can carry a long clip."""
    parts = [
        {"type": "video_url", "video_url": {"url": "https://x/v.mp4"}},
        {"type": "audio_url", "audio_url": {"url": "https://x/a.wav"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "https://x/i.png"}},
        {"type": "input_image", "image_url": "https://x/i.png"},
        {"type": "input_file", "file_id": "f"},
    ]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    assert input_bound(body, 1, CFG) >= 6 * CFG.image_tokens
    qwen_vl = 16_384  # Qwen2.5-VL's default pixel limit allows this many tokens per image
    assert input_bound(body, 1, CFG, media_tokens=qwen_vl) >= 6 * qwen_vl


def test_the_reference_vision_model_bounds_an_image_at_16384_tokens():
    from bastion.config import load_config

    config = load_config(env={})
    assert config.models["Qwen2.5-VL-72B-Instruct"].image_tokens == 16_384
    assert config.models["gpt-oss-120b"].image_tokens == config.metering.image_tokens


def test_cached_and_reasoning_tokens_are_read_from_both_shapes():
    responses = {
        "usage": {
            "input_tokens": 100, "output_tokens": 50,
            "input_tokens_details": {"cached_tokens": 64},
            "output_tokens_details": {"reasoning_tokens": 20},
        }
    }  # fmt: skip
    chat = {
        "usage": {
            "prompt_tokens": 100, "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 20},
        }
    }  # fmt: skip
    for obj, endpoint in ((responses, "responses"), (chat, "chat")):
        usage = usage_from(obj, endpoint)
        assert usage is not None and (usage.cached_tokens, usage.reasoning_tokens) == (64, 20)
    bare = usage_from({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "chat")
    assert bare is not None and (bare.cached_tokens, bare.reasoning_tokens) == (0, 0)
    junk = {"usage": {"input_tokens": 3, "output_tokens": 4, "input_tokens_details": "x"}}
    assert usage_from(junk, "responses").cached_tokens == 0  # type: ignore[union-attr]


def test_a_report_above_what_the_request_could_use_is_not_plausible():
    ok = Usage(100, 16, cached_tokens=50, reasoning_tokens=10)
    assert plausible(ok, input_bound=100, output_cap=16)
    assert plausible(Usage(150, 16), input_bound=100, output_cap=16)  # a miscounted bound
    assert not plausible(Usage(100, 17), input_bound=100, output_cap=16)
    assert not plausible(Usage(10**9, 1), input_bound=100, output_cap=16)
    assert not plausible(Usage(10, 1, cached_tokens=11), input_bound=100, output_cap=16)
    assert not plausible(Usage(10, 1, reasoning_tokens=2), input_bound=100, output_cap=16)
