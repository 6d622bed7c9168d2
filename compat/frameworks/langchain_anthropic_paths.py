"""LangChain with ChatAnthropic: invoke, stream, a tool loop, structured output."""

from langchain_anthropic import ChatAnthropic
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from paths import City, check, path, weather

model = ChatAnthropic(model="claude-haiku-4-5")


def text(content) -> str:
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def plain():
    check("hello" in text(model.invoke("Say hello").content), "no reply")


def stream():
    check("hello" in "".join(text(chunk.content) for chunk in model.stream("Say hello")), "no streamed reply")


def tools():
    weather_tool = tool(weather)
    bound = model.bind_tools([weather_tool])
    messages = [HumanMessage("Weather in Paris?")]
    reply = bound.invoke(messages)
    check(reply.tool_calls, "no tool call")
    call = reply.tool_calls[0]
    messages += [reply, ToolMessage(weather_tool.invoke(call["args"]), tool_call_id=call["id"])]
    check("hello" in text(bound.invoke(messages).content), "no final answer")


def structured():
    check(isinstance(model.with_structured_output(City).invoke("A city"), City), "not a City")


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured)]:
    path(name, run)
