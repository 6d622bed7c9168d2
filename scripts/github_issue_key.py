"""The work of action.yml: mint a key with an issuer token and hand it to the rest of the job.

Standard library only (it runs on a bare runner). Writes the key to $GITHUB_ENV as every provider's
key variable plus the SDKs' base URLs for gateway mode, masks it in the logs, and sets `key-id`.
"""

import json
import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    proxy = os.environ["AGENTKEYS_URL"].rstrip("/")
    request = {"policy": os.environ["AGENTKEYS_POLICY"], "name": job_name()}
    if os.environ.get("AGENTKEYS_BUDGET"):
        request["budget_usd"] = float(os.environ["AGENTKEYS_BUDGET"])
    if os.environ.get("AGENTKEYS_TTL"):
        request["ttl"] = os.environ["AGENTKEYS_TTL"]
    call = urllib.request.Request(
        f"{proxy}/_agentkeys/v1/keys",
        method="POST",
        data=json.dumps(request).encode(),
        headers={"authorization": f"Bearer {os.environ['AGENTKEYS_ISSUER_TOKEN']}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            issued = json.load(response)
    except urllib.error.HTTPError as e:
        print(f"::error::Agent Keys refused the key: {e.code} {json.load(e)['error']['message']}")
        return 1
    print(f"::add-mask::{issued['key']}")
    with open(os.environ["GITHUB_ENV"], "a") as env:
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AGENTKEYS_KEY"):
            env.write(f"{name}={issued['key']}\n")
        env.write(f"OPENAI_BASE_URL={proxy}/openai/v1\nANTHROPIC_BASE_URL={proxy}/anthropic\n")
        env.write(f"AGENTKEYS_URL={proxy}\nAGENTKEYS_KEY_ID={issued['id']}\n")
    with open(os.environ["GITHUB_OUTPUT"], "a") as output:
        output.write(f"key-id={issued['id']}\n")
    print(f"Agent Keys: key {issued['id']} for this job: ${issued['budget_usd']}, expires {issued['expires_at']}")
    return 0


def job_name() -> str:
    parts = [
        os.environ.get(name, "") for name in ("GITHUB_REPOSITORY", "GITHUB_WORKFLOW", "GITHUB_JOB", "GITHUB_RUN_ID")
    ]
    return " ".join(part for part in parts if part) or "github job"


if __name__ == "__main__":
    sys.exit(main())
