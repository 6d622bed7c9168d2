"""Alerts: a webhook when a key's spend crosses a budget threshold, or when a loop is broken.

Never on a call's path. What raises an alert is decided after the call (its settlement runs after the
agent has its answer; a refusal's alert is worked out in a background task), and delivering it is a
put on a queue that one thread empties: a slow or dead receiver delays only other alerts. Each alert
is raised once, whichever replica sees it first: the store remembers it (`Store.claim_token`, a
once-only claim on a name until a time, shared with the OIDC exchange).

A delivery is a POST of a JSON object, with headers the receiver checks it by:

    x-agentkeys-event       budget_threshold | loop_broken
    x-agentkeys-delivery    an id, the same on every attempt of one alert (a receiver drops repeats)
    x-agentkeys-signature   t=UNIX_TIME,v1=HEX: HMAC-SHA256 with the shared secret of "UNIX_TIME." + the body

A delivery that fails (no answer within `timeout`, or a status other than 2xx) is tried again after
`retry_backoff`, doubled each time, up to `attempts`; then it is counted as failed and dropped.
"""

import hashlib
import hmac
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from agentkeys.calls import Denial
from agentkeys.keys import describe
from agentkeys.ledger import KeyRecord
from agentkeys.ledger.periods import Calendar
from agentkeys.money import Usd, dumps
from agentkeys.policy import AlertsConfig, ProxyConfig
from agentkeys.providers.base import DenyKind
from agentkeys.store import Store
from agentkeys.yamlfile import ConfigError

log = logging.getLogger(__name__)

EVENT_HEADER = "x-agentkeys-event"
DELIVERY_HEADER = "x-agentkeys-delivery"
SIGNATURE_HEADER = "x-agentkeys-signature"
ALERTED_REFUSALS = frozenset({DenyKind.BUDGET, DenyKind.LOOP})
LOOP_ALERT_EVERY = 3600  # a key stuck in a loop raises one alert an hour, however often it is refused
REMEMBERED_AFTER_EXPIRY = 86400  # a key's alerts are remembered this long after it expires


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, signature: str, body: bytes, now: float, tolerance_seconds: float = 300) -> bool:
    """What a receiver does: the signature is the body's, made with the secret, and recent (no replays)."""
    fields = dict(part.split("=", 1) for part in signature.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, signature.encode()) and abs(now - timestamp) <= tolerance_seconds


class WebhookSender:
    """Posts alerts from its own thread, in order, each retried with backoff; `counted(event, outcome)`
    is told each one's end: delivered, failed (every attempt failed) or dropped (the queue was full)."""

    def __init__(self, spec: AlertsConfig, secret: str, counted: Callable[[str, str], None]):
        self.spec = spec
        self.secret = secret.encode()
        self.counted = counted
        self._queue: queue.Queue = queue.Queue(spec.queue_size)
        self._closing = threading.Event()
        # No proxy from the environment: the proxy's own HTTPS_PROXY (if any) is not the way to the receiver.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._deliver_all, name="agentkeys-alerts", daemon=True)
        self._thread.start()

    def send(self, event: str, payload: dict) -> None:
        """Queue an alert; never waits."""
        try:
            self._queue.put_nowait((event, payload))
        except queue.Full:
            log.warning("agentkeys: %d alerts are waiting already; a %s alert is dropped", self.spec.queue_size, event)
            self.counted(event, "dropped")

    def close(self, timeout: float = 2.0) -> None:
        """Stop: an alert being delivered may finish within `timeout`; waiting ones are not sent."""
        self._closing.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _deliver_all(self) -> None:
        while not self._closing.is_set():
            item = self._queue.get()
            if item is None:
                return
            event, payload = item
            try:
                self.counted(event, self._deliver(event, payload))
            except Exception:
                log.exception("agentkeys: delivering a %s alert failed", event)
                self.counted(event, "failed")

    def _deliver(self, event: str, payload: dict) -> str:
        delivery = uuid.uuid4().hex
        body = dumps({"event": event, "delivery": delivery, **payload}).encode()
        wait = float(self.spec.retry_backoff)
        for attempt in range(self.spec.attempts):
            if attempt:
                if self._closing.wait(wait):
                    return "failed"
                wait *= 2
            if self._post(event, delivery, body):
                return "delivered"
        log.warning("agentkeys: a %s alert could not be delivered in %d attempts", event, self.spec.attempts)
        return "failed"

    def _post(self, event: str, delivery: str, body: bytes) -> bool:
        headers = {
            "content-type": "application/json", EVENT_HEADER: event, DELIVERY_HEADER: delivery,
            SIGNATURE_HEADER: sign(self.secret, int(time.time()), body),
        }  # fmt: skip
        request = urllib.request.Request(self.spec.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.spec.timeout) as response:
                return 200 <= response.status < 300
        except urllib.error.HTTPError as e:
            log.warning("agentkeys: the alert receiver answered %d", e.code)
        except (OSError, ValueError) as e:
            log.warning("agentkeys: the alert receiver could not be reached: %s", e)
        return False


class Alerts:
    """Which alerts a call raises, once each, handed to the sender."""

    def __init__(self, spec: AlertsConfig, store: Store, sender: WebhookSender, calendar: Calendar):
        self.spec = spec
        self.store = store
        self.sender = sender
        self.calendar = calendar  # the accounts' periods (the config's time_zone)

    async def after_settlement(self, key: KeyRecord, cost_micros: int) -> None:
        """A call was charged: the thresholds its key's spend has reached now."""
        if cost_micros <= 0 or not self.spec.budget_thresholds:
            return
        record = await self.store.key(key.key_id)
        if record is not None:
            await self.budget_reached(record, exhausted=False)
        if key.account_id is not None:
            await self.account_period_reached(key.account_id)

    async def after_refusal(self, denial: Denial) -> None:
        """A refusal: a budget that no longer covers a call is at 100%; a broken loop is an alert of its own."""
        if denial.key is None:
            return
        if denial.kind is DenyKind.BUDGET:
            record = await self.store.key(denial.key.key_id)
            if record is not None:
                await self.budget_reached(record, exhausted=True)
            if denial.key.account_id is not None and self.spec.budget_thresholds:
                await self.account_period_reached(denial.key.account_id)
        elif denial.kind is DenyKind.LOOP and self.spec.loops:
            until = min(self.store.clock() + LOOP_ALERT_EVERY, denial.key.expires_at + REMEMBERED_AFTER_EXPIRY)
            if await self.first_time("loop_broken", f"key:{denial.key.key_id}", until):
                self.sender.send("loop_broken", {**about(denial.key, self.store.clock()), "reason": denial.message})

    async def budget_reached(self, record: KeyRecord, exhausted: bool) -> None:
        """Alert each threshold the key's spend has reached (100% too when its budget refused a call)."""
        until = record.expires_at + REMEMBERED_AFTER_EXPIRY
        subject = about(record, self.store.clock())
        await self.thresholds_reached(
            f"key:{record.key_id}", subject, record.spent_micros, record.budget_micros, until, exhausted
        )

    async def account_period_reached(self, account_id: str) -> None:
        """Alert each threshold an account's spend has reached in its current period (once per period:
        the next period starts afresh). From the settled spend, with the period's top-ups in its budget."""
        account = await self.store.account(account_id)
        if account is None:
            return
        now = self.store.clock()
        period = self.calendar.period(account.period, now)
        books = await self.store.period_books(account_id, period.period_id)
        spent = books.spent_micros if books else 0
        budget = account.budget_micros + (books.top_up_micros if books else 0)
        subject = {
            "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "account": {"id": account_id, "name": account.name, "plan": account.plan_name, "period": period.period_id},
        }
        until = period.ends_at + REMEMBERED_AFTER_EXPIRY
        await self.thresholds_reached(f"account:{account_id}:{period.period_id}", subject, spent, budget, until, False)

    async def thresholds_reached(
        self, who: str, subject: dict, spent_micros: int, budget_micros: int, until: float, exhausted: bool
    ) -> None:
        """For any level with a budget (a key; an account's period, named in `who`): each threshold reached,
        once per `who` until `until`. `subject` says what the alert is about (`key`, `account`, ...)."""
        spent = spent_micros * 100 / budget_micros if budget_micros else 100
        for threshold in self.spec.budget_thresholds:
            if spent < threshold and not (exhausted and threshold == 100):
                continue
            if await self.first_time("budget_threshold", f"{who}:{threshold}", until):
                self.sender.send("budget_threshold", {
                    **subject, "threshold_percent": threshold, "spent_usd": Usd(spent_micros),
                    "budget_usd": Usd(budget_micros), "exhausted": exhausted,
                })  # fmt: skip

    async def first_time(self, event: str, name: str, until: float) -> bool:
        return await self.store.claim_token(f"agentkeys-alert:{event}", name, until)

    def close(self, timeout: float = 2.0) -> None:
        self.sender.close(timeout)


def about(record: KeyRecord, now: float) -> dict:
    """When the alert was raised, and the key it is about as the CLI describes it (never its secret)."""
    return {"at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), "key": describe(record, now)}


def sender_for(config: ProxyConfig, counted: Callable[[str, str], None]) -> WebhookSender | None:
    """The sender of the config's alerts, on its own thread; ConfigError if their secret is not set."""
    spec = config.alerts
    if spec is None:
        return None
    secret = spec.secret()
    if not secret:
        raise ConfigError([f"alerts: secret_env: {spec.secret_env} is not set; alerts are signed with it"])
    return WebhookSender(spec, secret, counted)
