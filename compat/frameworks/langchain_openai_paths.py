"""LangChain with ChatOpenAI: invoke, stream, a tool loop, structured output, embeddings."""

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from paths import City, check, path, weather

model = ChatOpenAI(model="gpt-4o-mini")


def plain():
    check("hello" in model.invoke("Say hello").content, "no reply")


def stream():
    check("hello" in "".join(chunk.content for chunk in model.stream("Say hello")), "no streamed reply")


def tools():
    weather_tool = tool(weather)
    bound = model.bind_tools([weather_tool])
    messages = [HumanMessage("Weather in Paris?")]
    reply = bound.invoke(messages)
    check(reply.tool_calls, "no tool call")
    call = reply.tool_calls[0]
    messages += [reply, ToolMessage(weather_tool.invoke(call["args"]), tool_call_id=call["id"])]
    check("hello" in bound.invoke(messages).content, "no final answer")


def structured():
    check(isinstance(model.with_structured_output(City).invoke("A city"), City), "not a City")


def embeddings():
    check(len(OpenAIEmbeddings(model="text-embedding-3-small").embed_query("hello")) > 0, "no vector")


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured),
                  ("embeddings", embeddings)]:  # fmt: skip
    path(name, run)
