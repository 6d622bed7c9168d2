"""OpenAI's free object endpoints the SDKs call on their own: the Agents SDK's trace ingest and the
Conversations API. Neither is billed; a conversation's items are billed as input when a response uses
them, and a response continued by `previous_response_id` brings in what the earlier one held."""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field

# What a continuation of a response (or a conversation) this mock never answered brings in.
UNKNOWN_CONTEXT_TOKENS = 500

CONVERSATION = re.compile(r"^/v1/conversations(?:/(?P<id>[^/]+)(?P<items>/items(?:/(?P<item>[^/]+))?)?)?$")


@dataclass
class Contexts:
    """The tokens each response and conversation carries into a call that continues it."""

    responses: dict[str, int] = field(default_factory=dict)
    conversations: dict[str, int] = field(default_factory=dict)
    items: dict[str, list[dict]] = field(default_factory=dict)
    traces: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def inherited(self, body: dict) -> int:
        """The input tokens a Responses call inherits from `previous_response_id` or `conversation`."""
        with self.lock:
            if body.get("previous_response_id"):
                return self.responses.get(body["previous_response_id"], UNKNOWN_CONTEXT_TOKENS)
            conversation = conversation_id(body.get("conversation"))
            if conversation:
                return self.conversations.get(conversation, UNKNOWN_CONTEXT_TOKENS)
            return 0

    def remember(self, response_id: str, body: dict, input_tokens: int, output_tokens: int) -> None:
        """A response's whole context (its input and its output) is what a continuation brings in."""
        with self.lock:
            self.responses[response_id] = input_tokens + output_tokens
            conversation = conversation_id(body.get("conversation"))
            if conversation:
                self.conversations[conversation] = input_tokens + output_tokens

    def add_items(self, conversation: str, items: list, count) -> list[dict]:
        added = [{"id": f"msg_mock{uuid.uuid4().hex}", **item} for item in items if isinstance(item, dict)]
        with self.lock:
            self.items.setdefault(conversation, []).extend(added)
            tokens = sum(4 + count(str(item.get("content", ""))) for item in added)
            self.conversations[conversation] = self.conversations.get(conversation, 0) + tokens
        return added

    def clear(self) -> None:
        with self.lock:
            self.responses.clear()
            self.conversations.clear()
            self.items.clear()
            self.traces.clear()


def conversation_id(given) -> str | None:
    """The Responses API's `conversation`: an id, or an object with one."""
    if isinstance(given, str):
        return given
    if isinstance(given, dict) and isinstance(given.get("id"), str):
        return given["id"]
    return None


def answer(method: str, path: str, body, contexts: Contexts, count) -> tuple[int, dict | None] | None:
    """(status, JSON body) for a trace or conversation request; None for any other path."""
    if (method, path) == ("POST", "/v1/traces/ingest"):
        with contexts.lock:
            contexts.traces.append(body if isinstance(body, dict) else {})
        return 204, None
    found = CONVERSATION.match(path)
    if not found:
        return None
    conversation, body = found["id"], body if isinstance(body, dict) else {}
    if conversation is None:
        if method != "POST":
            return None
        conversation = f"conv_mock{uuid.uuid4().hex}"
        contexts.add_items(conversation, body.get("items") or [], count)
        return 200, conversation_object(conversation, body.get("metadata"))
    if found["items"] and found["item"] is None:
        if method == "POST":
            added = contexts.add_items(conversation, body.get("items") or [], count)
            return 200, item_list(added)
        with contexts.lock:
            return 200, item_list(list(contexts.items.get(conversation, [])))
    if method == "DELETE":
        return 200, {"id": found["item"] or conversation, "object": "conversation.deleted", "deleted": True}
    return 200, conversation_object(conversation, body.get("metadata"))


def conversation_object(conversation: str, metadata) -> dict:
    return {"id": conversation, "object": "conversation", "created_at": int(time.time()), "metadata": metadata or {}}


def item_list(items: list[dict]) -> dict:
    first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
    return {"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False}
