"""OpenAI's input bound, part by part: each kind of content adds exactly what the hold assumes.

A counter of one token per character stands in for tiktoken, so each figure can be worked out by hand.
"""

import json

import pytest

from agentkeys.providers.base import MalformedRequest
from agentkeys.providers.openai import (
    IMAGE_TOKEN_ALLOWANCE,
    TOKENS_PER_MESSAGE,
    content_part_tokens,
    content_tokens,
    response_item_tokens,
)


def count(text: str) -> int:
    return len(text)


@pytest.mark.parametrize("kind", ["image_url", "input_image", "image"])
def test_an_image_part_is_held_at_the_image_allowance(kind):
    assert content_part_tokens(count, {"type": kind, "image_url": {"url": "x" * 500}}) == IMAGE_TOKEN_ALLOWANCE


@pytest.mark.parametrize("kind", ["file", "input_file"])
def test_a_file_part_cannot_be_bounded(kind):
    with pytest.raises(MalformedRequest, match="file parts"):
        content_part_tokens(count, {"type": kind, "file_id": "f"})


def test_a_text_part_is_its_text_and_one():
    assert content_part_tokens(count, {"type": "text", "text": "hello"}) == 6
    assert content_part_tokens(count, {"type": "input_text", "text": ""}) == 1


@pytest.mark.parametrize("part", [{"type": "text", "text": 5}, {"type": "other", "data": "abc"}, "plain", 7])
def test_any_other_part_is_its_json(part):
    assert content_part_tokens(count, part) == len(json.dumps(part))


def test_content_is_text_parts_or_json():
    assert content_tokens(count, "abc") == 3
    assert content_tokens(count, [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]) == 3 + 2
    assert content_tokens(count, {"a": 1}) == len(json.dumps({"a": 1}))
    assert content_tokens(count, None) == 0
    assert content_tokens(count, 12) == 0


def test_an_item_reference_is_unseen_input():
    unseen = set()
    assert response_item_tokens(count, {"type": "item_reference", "id": "x" * 100}, unseen) == TOKENS_PER_MESSAGE
    assert unseen == {"item_reference"}


def test_reasoning_is_held_at_its_bytes():
    item = {"type": "reasoning", "encrypted_content": "é" * 10}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + len(
        json.dumps(item, ensure_ascii=False).encode()
    )
    assert unseen == set()


def test_a_message_item_is_its_parts_and_its_other_fields():
    item = {"role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    unseen = set()
    expected = TOKENS_PER_MESSAGE + 6 + len(json.dumps({"role": "user"}))
    assert response_item_tokens(count, item, unseen) == expected
    assert response_item_tokens(count, {"type": "message", **item}, set()) == expected + len(', "type": "message"')
    assert unseen == set()


def test_a_message_item_with_a_file_has_unseen_input_and_the_rest_counted():
    item = {"role": "user", "content": [{"type": "input_file", "file_id": "f"}, {"type": "input_text", "text": "hi"}]}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + 3 + len(json.dumps({"role": "user"}))
    assert unseen == {"input_file"}


def test_any_other_item_is_every_field_counted():
    item = {"type": "function_call_output", "call_id": "c1", "output": "result"}
    unseen = set()
    assert response_item_tokens(count, item, unseen) == TOKENS_PER_MESSAGE + len("function_call_output") + 2 + 6
    assert unseen == set()
    with_text_content = {"type": "message", "role": "assistant", "content": "hi"}
    assert response_item_tokens(count, with_text_content, set()) == TOKENS_PER_MESSAGE + 7 + 9 + 2


def test_an_item_that_is_not_an_object_is_malformed():
    with pytest.raises(MalformedRequest, match="input item"):
        response_item_tokens(count, "text", set())
