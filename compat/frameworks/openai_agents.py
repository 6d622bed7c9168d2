"""OpenAI Agents SDK: a run, a streamed run, a tool loop, structured output (the Responses API), and in
proxy mode its trace export (free, when the policy lists POST /v1/traces/ingest)."""

import asyncio

from agents import Agent, Runner, function_tool
from paths import City, check, path, weather

MODEL = "gpt-4o-mini"
loop = asyncio.new_event_loop()  # the SDK's client lives on one loop: every path runs on it


async def plain():
    result = await Runner.run(Agent(name="a", instructions="Be brief.", model=MODEL), "Say hello")
    check("hello" in result.final_output, repr(result.final_output))


async def stream():
    result = Runner.run_streamed(Agent(name="a", model=MODEL), "Say hello")
    async for _ in result.stream_events():
        pass
    check("hello" in result.final_output, repr(result.final_output))


async def tools():
    result = await Runner.run(Agent(name="a", model=MODEL, tools=[function_tool(weather)]), "Weather in Paris?")
    called = [item for item in result.new_items if item.type == "tool_call_output_item"]
    check(called and "sunny" in str(called[0].output), repr(result.new_items))


async def structured():
    result = await Runner.run(Agent(name="a", model=MODEL, output_type=City), "A city")
    check(isinstance(result.final_output, City), repr(result.final_output))


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured)]:
    path(name, lambda run=run: loop.run_until_complete(run()))
