"""LiteLLM as a client: completion, a stream, a tool loop, structured output, embeddings; Claude too."""

import json

import litellm
from paths import City, check, path, weather

WEATHER = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def ask(model="gpt-4o-mini", **fields):
    return litellm.completion(model=model, messages=[{"role": "user", "content": "Say hello"}], **fields)


def plain():
    check("hello" in ask().choices[0].message.content, "no reply")


def stream():
    text = "".join(chunk.choices[0].delta.content or "" for chunk in ask(stream=True))
    check("hello" in text, "no streamed reply")


def tools():
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = litellm.completion(model="gpt-4o-mini", messages=messages, tools=[WEATHER]).choices[0].message
    check(reply.tool_calls, "no tool call")
    call = reply.tool_calls[0]
    result = weather(**json.loads(call.function.arguments))
    messages += [reply.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": result}]
    final = litellm.completion(model="gpt-4o-mini", messages=messages, tools=[WEATHER])
    check("hello" in final.choices[0].message.content, "no final answer")


def structured():
    City.model_validate_json(ask(response_format=City).choices[0].message.content)


def embeddings():
    check(litellm.embedding(model="text-embedding-3-small", input=["hello"]).data, "no vector")


def claude():
    check("hello" in ask(model="anthropic/claude-haiku-4-5").choices[0].message.content, "no reply")


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured),
                  ("embeddings", embeddings), ("claude", claude)]:  # fmt: skip
    path(name, run)
