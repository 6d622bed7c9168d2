"""An eval suite under one budget: each case runs on its own child key, carved from the suite's key.

    OPENAI_API_KEY=ak_…  AGENTKEYS_URL=http://127.0.0.1:8081  python examples/eval_suite.py

The suite key's policy must allow child keys (`max_child_depth: 1`, `max_children` >= the cases).
Each case gets an equal slice of what the suite has left; a case that runs away exhausts its own
slice and no more, so the suite as a whole cannot exceed its budget whatever the cases do.
"""

import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime

import openai

CASES = [
    ("greeting", "Say hello.", 20),
    ("arithmetic", "What is 17 * 23? Answer with the number only.", 10),
    ("runaway", "Write a very long story.", 4000),  # asks for far more than its slice can pay for
]


def control(method: str, path: str, key: str, body: dict | None = None) -> dict:
    """Call the proxy's own API (never forwarded to a provider)."""
    request = urllib.request.Request(
        f"{os.environ.get('AGENTKEYS_URL', 'http://127.0.0.1:8081')}/_agentkeys/v1{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {json.load(e)['error']['message']}") from None


def settled_self(key: str) -> dict:
    """The key as the proxy sees it once its last call has settled (settlement lands just after the answer)."""
    for _ in range(50):
        me = control("GET", "/keys/self", key)
        if me["held_usd"] == 0:
            return me
        time.sleep(0.05)
    return me


def run_case(key: str, prompt: str, max_tokens: int) -> str:
    base_url = f"{os.environ.get('AGENTKEYS_URL', 'http://127.0.0.1:8081')}/openai/v1"
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0)
    try:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}]
        )
        return reply.choices[0].message.content or ""
    except openai.RateLimitError as refused:  # the case's own slice, not the suite, ran out
        return f"refused: {refused.body['message']}"


def main() -> None:
    suite_key = os.environ["OPENAI_API_KEY"]
    suite = control("GET", "/keys/self", suite_key)
    slice_usd = round(suite["remaining_usd"] / len(CASES), 6)
    seconds_left = int(datetime.fromisoformat(suite["expires_at"]).timestamp() - time.time()) - 5
    print(f"suite {suite['name']}: ${suite['remaining_usd']:.6f} for {len(CASES)} cases, ${slice_usd:.6f} each")
    for name, prompt, max_tokens in CASES:
        case = control(
            "POST", "/keys", suite_key, {"name": name, "budget_usd": slice_usd, "ttl": min(600, seconds_left)}
        )
        answer = run_case(case["key"], prompt, max_tokens)
        spent = settled_self(case["key"])["spent_usd"]
        control("DELETE", "/keys/self", case["key"])  # done: the rest of its slice returns to the suite
        print(f"case {name}: spent ${spent:.6f}: {answer[:60]}")
    suite = settled_self(suite_key)
    print(f"suite spent ${suite['spent_usd'] + suite['held_usd']:.6f} of ${suite['budget_usd']:.6f}")


if __name__ == "__main__":
    main()
