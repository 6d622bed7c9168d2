"""OpenAI Agents SDK: a run, a streamed run, a tool loop, structured output (the Responses API)."""

import asyncio

from agents import Agent, Runner, function_tool
from paths import City, check, path, weather

MODEL = "gpt-4o-mini"


def plain():
    result = Runner.run_sync(Agent(name="a", instructions="Be brief.", model=MODEL), "Say hello")
    check("hello" in result.final_output, repr(result.final_output))


def stream():
    async def go():
        result = Runner.run_streamed(Agent(name="a", model=MODEL), "Say hello")
        async for _ in result.stream_events():
            pass
        return result.final_output

    output = asyncio.run(go())
    check("hello" in output, repr(output))


def tools():
    agent = Agent(name="a", model=MODEL, tools=[function_tool(weather)])
    result = Runner.run_sync(agent, "Weather in Paris?")
    called = [item for item in result.new_items if item.type == "tool_call_output_item"]
    check(called and "sunny" in str(called[0].output), repr(result.new_items))


def structured():
    result = Runner.run_sync(Agent(name="a", model=MODEL, output_type=City), "A city")
    check(isinstance(result.final_output, City), repr(result.final_output))


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured)]:
    path(name, run)
