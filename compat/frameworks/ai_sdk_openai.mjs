// The AI SDK with @ai-sdk/openai (the Responses API): text, a stream, a tool loop, an object, an embedding.
import { openai } from "@ai-sdk/openai";
import { embed, generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";
import { City, check, path } from "./paths.mjs";

const model = openai("gpt-4o-mini");
const weather = tool({
  description: "The weather in a city",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => `sunny in ${city}`,
});

await path("plain", async () => {
  const { text } = await generateText({ model, prompt: "Say hello" });
  check(text.includes("hello"), text);
});
await path("stream", async () => {
  const result = streamText({ model, prompt: "Say hello" });
  let text = "";
  for await (const delta of result.textStream) text += delta;
  check(text.includes("hello"), text);
});
await path("tools", async () => {
  const { steps } = await generateText({ model, prompt: "Weather in Paris?", tools: { weather }, stopWhen: stepCountIs(3) });
  check(JSON.stringify(steps).includes("sunny"), "the tool was not called");
});
await path("structured", async () => {
  const { object } = await generateObject({ model, schema: City, prompt: "A city" });
  check(typeof object.name === "string", JSON.stringify(object));
});
await path("embeddings", async () => {
  const { embedding } = await embed({ model: openai.embedding("text-embedding-3-small"), value: "hello" });
  check(embedding.length > 0, "no vector");
});
