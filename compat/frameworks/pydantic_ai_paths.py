"""Pydantic AI: a run, a streamed run, a tool, structured output; on OpenAI and on Anthropic."""

import asyncio

from paths import City, check, path, weather
from pydantic_ai import Agent


def plain():
    check("hello" in Agent("openai:gpt-4o-mini").run_sync("Say hello").output, "no reply")


def stream():
    async def go():
        async with Agent("openai:gpt-4o-mini").run_stream("Say hello") as result:
            return "".join([text async for text in result.stream_text(delta=True)])

    check("hello" in asyncio.run(go()), "no streamed reply")


def tools():
    agent = Agent("openai:gpt-4o-mini", tools=[weather])
    result = agent.run_sync("Weather in Paris?")
    check("sunny" in str(result.all_messages()), "the tool was not called")


def structured():
    check(isinstance(Agent("openai:gpt-4o-mini", output_type=City).run_sync("A city").output, City), "not a City")


def claude():
    check("hello" in Agent("anthropic:claude-haiku-4-5").run_sync("Say hello").output, "no reply")


def claude_structured():
    agent = Agent("anthropic:claude-haiku-4-5", output_type=City)
    check(isinstance(agent.run_sync("A city").output, City), "not a City")


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured),
                  ("claude", claude), ("claude-structured", claude_structured)]:  # fmt: skip
    path(name, run)
