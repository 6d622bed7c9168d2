"""The work of action.yml: get this job a key and hand it to the rest of the job.

Keyless first: with `permissions: id-token: write`, the runner hands the job an OIDC token for the
audience asked (ACTIONS_ID_TOKEN_REQUEST_URL), and the proxy exchanges it for the key its identity
rules give this repository, ref and workflow; no secret is involved. With an `issuer-token` input
instead, the key is minted from the named policy with that token (the fallback).

Standard library only (it runs on a bare runner). Writes the key to $GITHUB_ENV as every provider's
key variable plus the SDKs' base URLs for gateway mode, masks it in the logs, and sets `key-id`.
"""

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request


def main() -> int:
    proxy = os.environ["AGENTKEYS_URL"].rstrip("/")
    request = {"name": job_name()}
    if os.environ.get("AGENTKEYS_BUDGET"):
        request["budget_usd"] = float(os.environ["AGENTKEYS_BUDGET"])
    if os.environ.get("AGENTKEYS_TTL"):
        request["ttl"] = os.environ["AGENTKEYS_TTL"]
    if os.environ.get("AGENTKEYS_POLICY"):
        request["policy"] = os.environ["AGENTKEYS_POLICY"]
    bearer = os.environ.get("AGENTKEYS_ISSUER_TOKEN")
    if not bearer:
        bearer = job_identity_token(os.environ.get("AGENTKEYS_AUDIENCE") or proxy)
        if bearer is None:
            print(
                "::error::Agent Keys: no OIDC token for this job: add `permissions: id-token: write` to the job"
                " (or give the action an issuer-token)"
            )
            return 1
    call = urllib.request.Request(
        f"{proxy}/_agentkeys/v1/keys",
        method="POST",
        data=json.dumps(request).encode(),
        headers={"authorization": f"Bearer {bearer}", "content-type": "application/json"},
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


def job_identity_token(audience: str) -> str | None:
    """The job's OIDC token for `audience`, from the runner (None without `permissions: id-token: write`)."""
    url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    if not url:
        return None
    separator = "&" if "?" in url else "?"
    ask = urllib.request.Request(
        f"{url}{separator}audience={urllib.parse.quote(audience, safe='')}",
        headers={"authorization": f"Bearer {os.environ['ACTIONS_ID_TOKEN_REQUEST_TOKEN']}"},
    )
    with urllib.request.urlopen(ask, timeout=30) as response:
        token = json.load(response)["value"]
    print(f"::add-mask::{token}")
    return token


def job_name() -> str:
    parts = [
        os.environ.get(name, "") for name in ("GITHUB_REPOSITORY", "GITHUB_WORKFLOW", "GITHUB_JOB", "GITHUB_RUN_ID")
    ]
    return " ".join(part for part in parts if part) or "github job"


if __name__ == "__main__":
    sys.exit(main())
