// What every Node framework script shares: run one path, print one JSON line saying how it went.
import { z } from "zod";

export const City = z.object({ name: z.string(), population: z.number().int() });

export async function path(name, run) {
  try {
    await run();
    console.log(JSON.stringify({ path: name, ok: true }));
  } catch (error) {
    const why = `${error?.name ?? "Error"}: ${error?.message ?? error}`.replace(/\n/g, " ").slice(0, 240);
    console.log(JSON.stringify({ path: name, ok: false, why }));
    console.error(error);
  }
}

export function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}
