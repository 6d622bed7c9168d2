"""A product's backend that gives each of its users agents on your provider keys, within the user's plan.

    AGENTKEYS_ADMIN_URL=http://127.0.0.1:9470  AGENTKEYS_ADMIN_TOKEN=…  AGENTKEYS_URL=http://127.0.0.1:8081 \\
        python examples/saas_backend.py alice pro "Summarise the plot of Hamlet in one line."

What it does, as a real backend would at each step:

1. a user signs up: an account for them on a plan (`POST /accounts`); the plan's budget per period
   covers every key ever minted for them, so one user can never spend another's money, or yours;
2. each agent run gets a key of its own (`POST /accounts/{user}/keys`: short-lived, with a small cap of
   its own), used by the agent as its provider API key through the proxy, and revoked when the run ends;
3. the user's page shows their spend this period (`GET /accounts/{user}/usage`).

The proxy's config needs `admin_port`, the token in the variable `admin_token_env` names, and `plans:`.
Only the Python standard library and the OpenAI SDK are used.
"""

import json
import os
import sys
import urllib.error
import urllib.request

import openai

ADMIN_URL = os.environ.get("AGENTKEYS_ADMIN_URL", "http://127.0.0.1:9470")
PROXY_URL = os.environ.get("AGENTKEYS_URL", "http://127.0.0.1:8081")


class AdminError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def admin(method: str, path: str, body: dict | None = None) -> dict | list | None:
    """One call to the Agent Keys admin API, with the operator's token."""
    request = urllib.request.Request(
        ADMIN_URL + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {os.environ['AGENTKEYS_ADMIN_TOKEN']}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
    except urllib.error.HTTPError as e:
        answer = json.load(e)
        raise AdminError(e.code, answer["error"]["message"] if "error" in answer else str(answer)) from None
    return json.loads(text) if text else None


def sign_up(user_id: str, plan: str) -> dict:
    """The user's account on `plan`; an existing account is kept as it is (its plan changes elsewhere)."""
    try:
        return admin("POST", "/accounts", {"account_id": user_id, "plan": plan})
    except AdminError as e:
        if e.status != 409:
            raise
        return admin("GET", f"/accounts/{user_id}")


def run_agent(user_id: str, task: str) -> str:
    """One agent run on a key of its own: at most $0.05 and 10 minutes, and never past the user's plan."""
    key = admin("POST", f"/accounts/{user_id}/keys", {"name": "agent-run", "ttl": "10m", "budget_usd": 0.05})
    agent = openai.OpenAI(api_key=key["key"], base_url=f"{PROXY_URL}/openai/v1", max_retries=0)
    try:
        reply = agent.chat.completions.create(
            model="gpt-4o-mini", max_tokens=60, messages=[{"role": "user", "content": task}]
        )
        return reply.choices[0].message.content or ""
    except openai.RateLimitError as refused:  # the run's cap or the user's plan for this period is spent
        return f"refused: {refused.body['message']}"
    except openai.PermissionDeniedError as refused:  # the user's account is suspended
        return f"refused: {refused.body['message']}"
    finally:
        admin("POST", f"/keys/{key['id']}/revoke")


def spend_this_period(user_id: str) -> dict:
    """What the user's page shows: this period's spend, budget and what remains."""
    return admin("GET", f"/accounts/{user_id}/usage?periods=1")["periods"][0]


def main(user_id: str, plan: str, *tasks: str) -> None:
    account = sign_up(user_id, plan)
    print(f"user {user_id}: plan {account['plan']}, ${account['budget_usd']:.6f} per {account['period']}")
    for task in tasks:
        print(f"run: {run_agent(user_id, task)[:70]}")
    period = spend_this_period(user_id)
    print(
        f"user {user_id}: spent ${period['spent_usd']:.6f} of ${period['budget_usd']:.6f} in period {period['id']}"
        f" (until {period['ends_at']}), ${period['remaining_usd']:.6f} left"
    )


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit("usage: saas_backend.py USER PLAN TASK [TASK...]")
    main(*sys.argv[1:])
