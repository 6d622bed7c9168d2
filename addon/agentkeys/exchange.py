"""`agentkeys exchange`: trade a workload's OIDC token for a key, for a sidecar or an init container.

A pod's projected service-account token (a file the kubelet keeps fresh) is sent to the proxy's
`POST /_agentkeys/v1/keys`, and the key it answers with is written to a file (or printed). With
`--renew-before`, the command keeps running: before the key expires it exchanges the token again and
replaces the file. The proxy takes each token once and never makes a key outlive it, so a renewal waits
for the kubelet to rotate the token (it does at 80% of the token's lifetime): give the projected token
an `expirationSeconds` no longer than the rule's ttl and renewals follow the rotations.
"""

import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RETRY_SECONDS = 2.0  # between looks at the token file while waiting for a rotated token, and after a failure


@dataclass(frozen=True)
class Exchanged:
    key: str
    key_id: str
    expires_at: float


class ExchangeFailed(Exception):
    """The proxy refused the token (`permanent`: the same token will be refused again) or could not be reached."""

    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent


def exchange(proxy_url: str, token: str, request: dict) -> Exchanged:
    call = urllib.request.Request(
        f"{proxy_url.rstrip('/')}/_agentkeys/v1/keys",
        method="POST",
        data=json.dumps(request).encode(),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            issued = json.load(response)
    except urllib.error.HTTPError as e:
        raise ExchangeFailed(f"{e.code}: {error_message(e)}", permanent=e.code < 500) from None
    except (OSError, ValueError) as e:
        raise ExchangeFailed(f"cannot reach {proxy_url}: {e}", permanent=False) from None
    expires_at = datetime.fromisoformat(issued["expires_at"]).timestamp()
    return Exchanged(issued["key"], issued["id"], expires_at)


def error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.load(error)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return error.reason


def write_key(path: Path, key: str) -> None:
    """Replace the key file at once (readers see the old key or the new one, never half), readable by us only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    os.replace(temporary, path)


def run_exchange(args) -> int:
    request = {name: value for name, value in (("name", args.name), ("ttl", args.ttl)) if value}
    if args.budget is not None:
        request["budget_usd"] = args.budget
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    used_token, exchanged = None, None
    while not stop.is_set():
        token = read_token(args.token_file)
        if token is not None and token != used_token:
            try:
                exchanged = exchange(args.proxy, token, request)
                used_token = token
                deliver(exchanged, args.out)
            except ExchangeFailed as e:
                print(f"agentkeys exchange: refused: {e}", file=sys.stderr)
                if e.permanent:
                    used_token = token  # wait for the next token rather than asking again with this one
                if args.renew_before is None:
                    return 1
        if args.renew_before is None:
            return 0 if exchanged else 1
        stop.wait(seconds_until_renewal(exchanged, args.renew_before) if token == used_token else RETRY_SECONDS)
    return 0


def seconds_until_renewal(exchanged: Exchanged | None, renew_before: int) -> float:
    """Sleep until `renew_before` seconds before the key expires; then look for a fresh token every RETRY_SECONDS."""
    if exchanged is None:
        return RETRY_SECONDS
    return max(RETRY_SECONDS, exchanged.expires_at - renew_before - time.time())


def read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError as e:
        print(f"agentkeys exchange: cannot read the token: {e}", file=sys.stderr)
        return None


def deliver(exchanged: Exchanged, out: Path | None) -> None:
    if out is None:
        print(exchanged.key, flush=True)
    else:
        write_key(out, exchanged.key)
    until = datetime.fromtimestamp(exchanged.expires_at).astimezone().isoformat(timespec="seconds")
    print(f"agentkeys exchange: key {exchanged.key_id}, expires {until}", file=sys.stderr, flush=True)
