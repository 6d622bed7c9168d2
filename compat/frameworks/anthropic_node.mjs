// The Anthropic SDK for Node: a message, a stream, a tool loop.
import Anthropic from "@anthropic-ai/sdk";
import { check, path } from "./paths.mjs";

const client = new Anthropic();
const model = "claude-haiku-4-5";
const weather = { name: "weather", input_schema: { type: "object", properties: { city: { type: "string" } } } };
const text = (message) => message.content.filter((b) => b.type === "text").map((b) => b.text).join("");

await path("plain", async () => {
  const message = await client.messages.create({ model, max_tokens: 256, messages: [{ role: "user", content: "Say hello" }] });
  check(text(message).includes("hello"), text(message));
});
await path("stream", async () => {
  const stream = client.messages.stream({ model, max_tokens: 256, messages: [{ role: "user", content: "Say hello" }] });
  check(text(await stream.finalMessage()).includes("hello"), "no streamed reply");
});
await path("tools", async () => {
  const messages = [{ role: "user", content: "Weather in Paris?" }];
  const first = await client.messages.create({ model, max_tokens: 256, messages, tools: [weather] });
  const use = first.content.find((b) => b.type === "tool_use");
  check(use, "no tool call");
  messages.push({ role: "assistant", content: first.content });
  messages.push({ role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: `sunny in ${use.input.city}` }] });
  const final = await client.messages.create({ model, max_tokens: 256, messages, tools: [weather] });
  check(text(final).includes("hello"), text(final));
});
