"""What the mock answers when a request asks for more than text: a call of one of its tools, or JSON shaped
by its structured-output schema. Frameworks' tool loops and structured output need both; the tokens
billed stay the mock's usual ones (`Call.output_tokens`).

Each format says where its tools, its tool choice and its schema are; a request whose last message is
a tool's result is answered with text (the loop ends), as a model would.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 6
GEMINI_PARAMETERS = ("parameters", "parametersJsonSchema", "parameters_json_schema")
GEMINI_SCHEMAS = ("responseJsonSchema", "response_json_schema", "responseSchema", "response_schema")


def instance(schema: Any, defs: dict | None = None, depth: int = 0) -> Any:
    """A value that satisfies a JSON schema (the common subset: objects, arrays, scalars, enums, refs)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return "hello"
    defs = {**(defs or {}), **(schema.get("$defs") or {}), **(schema.get("definitions") or {})}
    if "$ref" in schema:
        return instance(defs.get(str(schema["$ref"]).rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for union in ("anyOf", "oneOf", "allOf"):
        options = [option for option in schema.get(union) or [] if (option or {}).get("type") != "null"]
        if options:
            return instance(options[0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = (kind or ("object" if "properties" in schema else "string")).lower()
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: instance(value, defs, depth + 1) for name, value in properties.items()}
    if kind == "array":
        return [instance(schema.get("items") or {}, defs, depth + 1)]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "hello")


def tool_reply(tools: list[tuple[str, dict]], choice: str | None, answered: bool) -> tuple[str, str] | None:
    """(name, JSON arguments) of the tool to call, or None to answer in text.

    `choice`: None or "auto" (call the first tool unless the last message is a tool's result), "none",
    "required"/"any" (call the first), or a tool's name (call that one).
    """
    if not tools or choice == "none" or (answered and choice in (None, "auto")):
        return None
    named = dict(tools)
    name = choice if choice in named else tools[0][0]
    return name, json.dumps(instance(named[name]))


def shaped(text_schema: dict | None, tools: list[tuple[str, dict]], choice: str | None, answered: bool):
    """(a JSON reply or None, a tool call or None) for one request."""
    tool = tool_reply(tools, choice, answered)
    if tool is not None:
        return None, tool
    if text_schema is not None:
        return json.dumps(instance(text_schema)), None
    return None, None


# ----- where each format keeps them -----


def chat(body: dict):
    tools = [
        (tool["function"]["name"], tool["function"].get("parameters") or {})
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and tool["function"].get("name")
    ]
    messages = body.get("messages") or [{}]
    answered = messages[-1].get("role") in ("tool", "function")
    return shaped(chat_schema(body.get("response_format")), tools, openai_choice(body.get("tool_choice")), answered)


def chat_schema(response_format) -> dict | None:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or {}
    if response_format.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    return None


def openai_choice(choice) -> str | None:
    if isinstance(choice, dict):
        return (choice.get("function") or {}).get("name") or choice.get("name") or "required"
    return choice


def responses(body: dict):
    tools = [
        (tool["name"], tool.get("parameters") or {})
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and tool.get("type", "function") == "function" and tool.get("name")
    ]
    given = body.get("input")
    last = given[-1] if isinstance(given, list) and given and isinstance(given[-1], dict) else {}
    answered = last.get("type") == "function_call_output"
    text_format = (body.get("text") or {}).get("format") or {}
    schema = text_format.get("schema") if text_format.get("type") == "json_schema" else None
    if text_format.get("type") == "json_object":
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    return shaped(schema, tools, openai_choice(body.get("tool_choice")), answered)


def anthropic(body: dict):
    tools = [
        (tool["name"], tool.get("input_schema") or {})
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and tool.get("type", "custom") == "custom" and tool.get("name")
    ]
    content = (body.get("messages") or [{}])[-1].get("content")
    answered = isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )
    choice = body.get("tool_choice") or {}
    choice = choice.get("name") or choice.get("type") if isinstance(choice, dict) else None
    output = body.get("output_format") or (body.get("output_config") or {}).get("format") or {}
    schema = output.get("schema") if isinstance(output, dict) and output.get("type") == "json_schema" else None
    return shaped(schema, tools, choice, answered)


def gemini(body: dict):
    tools = [
        (function["name"], next((function[k] for k in GEMINI_PARAMETERS if function.get(k)), {}))
        for tool in body.get("tools") or []
        for function in (tool.get("functionDeclarations") or tool.get("function_declarations") or [])
        if function.get("name")
    ]
    contents = body.get("contents") or [{}]
    answered = any(
        "functionResponse" in part or "function_response" in part for part in contents[-1].get("parts") or []
    )
    config = body.get("generationConfig") or body.get("generation_config") or {}
    schema = next((config[k] for k in GEMINI_SCHEMAS if config.get(k)), None)
    if schema is None and config.get("responseMimeType") == "application/json":
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    mode = str(((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode") or "AUTO")
    return shaped(schema, tools, {"NONE": "none", "ANY": "required"}.get(mode.upper()), answered)
