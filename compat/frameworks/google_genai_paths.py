"""google-genai: generate, a stream, a tool call (automatic function calling), structured output."""

from google import genai
from google.genai import types
from paths import City, check, path, weather

client = genai.Client()
MODEL = "gemini-2.5-flash"


def plain():
    check("hello" in client.models.generate_content(model=MODEL, contents="Say hello").text, "no reply")


def stream():
    text = "".join(
        chunk.text or "" for chunk in client.models.generate_content_stream(model=MODEL, contents="Say hello")
    )
    check("hello" in text, "no streamed reply")


def tools():
    config = types.GenerateContentConfig(tools=[weather])  # the SDK calls it and sends the result back
    reply = client.models.generate_content(model=MODEL, contents="Weather in Paris?", config=config)
    called = [part.function_response for c in reply.automatic_function_calling_history or [] for part in c.parts or []]
    check(any(called) and "hello" in reply.text, "the tool was not called")


def structured():
    config = types.GenerateContentConfig(response_mime_type="application/json", response_schema=City)
    reply = client.models.generate_content(model=MODEL, contents="A city", config=config)
    check(isinstance(reply.parsed, City), repr(reply.text))


for name, run in [("plain", plain), ("stream", stream), ("tools", tools), ("structured", structured)]:
    path(name, run)
