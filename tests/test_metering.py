from bastion.config import MeteringConfig
from bastion.metering import input_bound, usage_from

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
