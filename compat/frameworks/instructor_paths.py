"""Instructor: structured output by tool calling and by JSON schema, streamed partials; OpenAI and Claude."""

import anthropic
import instructor
import openai
from paths import City, check, path

ASK = [{"role": "user", "content": "A city"}]


def tools_mode():
    client = instructor.from_openai(openai.OpenAI())
    check(isinstance(client.chat.completions.create(model="gpt-4o-mini", response_model=City, messages=ASK), City), "")


def json_schema_mode():
    client = instructor.from_openai(openai.OpenAI(), mode=instructor.Mode.JSON_SCHEMA)
    check(isinstance(client.chat.completions.create(model="gpt-4o-mini", response_model=City, messages=ASK), City), "")


def stream():
    client = instructor.from_openai(openai.OpenAI())
    partials = list(client.chat.completions.create_partial(model="gpt-4o-mini", response_model=City, messages=ASK))
    check(partials and partials[-1].name == "hello", repr(partials[-1:]))


def claude():
    client = instructor.from_anthropic(anthropic.Anthropic())
    city = client.messages.create(model="claude-haiku-4-5", max_tokens=1024, response_model=City, messages=ASK)
    check(isinstance(city, City), repr(city))


for name, run in [("structured-tools", tools_mode), ("structured-json", json_schema_mode), ("stream", stream),
                  ("claude", claude)]:  # fmt: skip
    path(name, run)
