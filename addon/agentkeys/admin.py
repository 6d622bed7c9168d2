"""The admin API: the operator's backend manages accounts, their keys and their spend over HTTP.

It listens on a port of its own (`admin_port`), never on the agents' listeners, and every route but
the OpenAPI document (`/openapi.json`) needs `Authorization: Bearer <token>`, the token read from the
environment variable the config names (`admin_token_env`) and compared in constant time. It runs on a
thread of its own with its own store handle, so a slow admin request never delays a call.

The rules are accounts.py's, shared with `agentkeys accounts …`; this module only maps HTTP to them.
"""

import asyncio
import hmac
import logging
import threading
import time
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from agentkeys import accounts
from agentkeys.accounts import AccountRefused, UnknownAccount
from agentkeys.keys import describe
from agentkeys.ledger import AccountExists, Calendar, Ledger, LedgerUnavailable
from agentkeys.money import dumps, usd_to_micros
from agentkeys.plans import PlanFile
from agentkeys.policy import MAX_BUDGET_USD, Duration
from agentkeys.seal import RecordSeal

log = logging.getLogger(__name__)

ID = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"  # plans.ACCOUNT_ID, as the OpenAPI document states it
KEY_ID = r"^[A-Za-z0-9_-]{1,64}$"
AccountId = Annotated[str, Path(pattern=ID, description="the account's id (your user's or tenant's)")]
KeyId = Annotated[str, Path(pattern=KEY_ID, description="the key's id (the part after ak_)")]
Usd = Annotated[float, Field(description="USD, to the micro-dollar")]


# ----- what goes in and out (documented in the OpenAPI document) -----


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewAccount(Strict):
    account_id: str = Field(pattern=ID, description="your user's or tenant's id")
    plan: str = Field(min_length=1, max_length=200, description="a plan of the proxy's config, by name")
    name: str = Field(default="", max_length=200, description="a name to show; default the id")


class AccountChange(Strict):
    plan: str | None = Field(default=None, min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    status: accounts.Status | None = None


class NewKey(Strict):
    policy: str | None = Field(
        default=None, max_length=200, description="one of the plan's policies; default its first"
    )
    ttl: Duration | None = Field(default=None, description="seconds, or 90s, 30m, 8h, 2d; default the policy's")
    budget_usd: float | None = Field(default=None, gt=0, le=MAX_BUDGET_USD, description="the key's own cap")
    name: str = Field(default="", max_length=200)


class TopUp(Strict):
    amount_usd: float = Field(gt=0, le=MAX_BUDGET_USD, description="added to the current period's budget only")


class PeriodOut(BaseModel):
    id: str
    spent_usd: Usd
    held_usd: Usd
    top_up_usd: Usd
    starts_at: str | None = Field(default=None, description="the current period only")
    ends_at: str | None = None
    budget_usd: Usd | None = None
    remaining_usd: Usd | None = None


class AccountOut(BaseModel):
    id: str
    name: str
    plan: str
    status: accounts.Status
    created_at: str
    period: str
    budget_usd: Usd
    current_period: PeriodOut


class KeyOut(BaseModel):
    id: str
    name: str
    policy: str
    parent_id: str | None
    status: str
    created_at: str
    expires_at: str
    budget_usd: Usd
    spent_usd: Usd
    held_usd: Usd
    remaining_usd: Usd
    identity: dict | None
    account_id: str | None


class MintedKey(KeyOut):
    key: str = Field(description="the key itself: shown this once")


class UsageOut(BaseModel):
    account_id: str
    period: str
    time_zone: str
    periods: list[PeriodOut] = Field(description="newest first; the first is the current period")


class ErrorOut(BaseModel):
    error: dict[str, str]


ERRORS = {status: {"model": ErrorOut} for status in (400, 401, 404, 409, 503)}


class MoneyJSON(JSONResponse):
    """JSON with every amount in plain decimals (money.dumps): `0.000005`, never `5e-06`."""

    def render(self, content) -> bytes:
        return dumps(content).encode()


# ----- the API -----


class AdminApi:
    """The admin API over one ledger; `plans` may be replaced (on reload) while it serves."""

    def __init__(self, ledger: Ledger, plans: dict[str, PlanFile], calendar: Calendar, token: str, seal: RecordSeal):
        self.ledger = ledger
        self.seal = seal  # the proxies' seal on key records: a key minted here is sealed as a proxy's are
        self.plans = plans
        self.calendar = calendar
        self._token = token.encode()
        self.app = self._build()

    def authorized(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, self._token):
            raise AccountRefused("a valid admin token is required (Authorization: Bearer TOKEN)", 401)

    def _build(self) -> FastAPI:
        app = FastAPI(
            title="Agent Keys admin API", version="1", docs_url=None, redoc_url=None,
            default_response_class=MoneyJSON, responses=ERRORS,
            description="Accounts on plans, the keys minted for them, and their spend per period.",
        )  # fmt: skip
        bearer = HTTPBearer(auto_error=False)

        def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
            self.authorized(credentials)

        app.router.dependencies.append(Depends(admin))
        app.add_exception_handler(AccountRefused, refused_answer)
        app.add_exception_handler(LedgerUnavailable, unavailable_answer)
        app.add_exception_handler(RequestValidationError, invalid_answer)
        self._routes(app)
        return app

    def _routes(self, app: FastAPI) -> None:
        ledger, now = self.ledger, time.time

        def shown(record) -> dict:
            return accounts.show_account(ledger, record, self.calendar, now())

        @app.post("/accounts", status_code=201, response_model=AccountOut, summary="create an account on a plan")
        def create_account(body: NewAccount):
            record = accounts.new_account(body.account_id, body.name, accounts.plan_named(self.plans, body.plan), now())
            try:
                ledger.create_account(record)
            except AccountExists as e:
                raise AccountRefused(str(e), 409) from None
            return MoneyJSON(shown(record), status_code=201)

        @app.get("/accounts", response_model=list[AccountOut], summary="every account, oldest first")
        def list_accounts():
            return MoneyJSON([shown(record) for record in ledger.list_accounts()])

        @app.get("/accounts/{account_id}", response_model=AccountOut, summary="one account and its current period")
        def show_account(account_id: AccountId):
            return MoneyJSON(shown(accounts.existing_account(ledger, account_id)))

        @app.patch("/accounts/{account_id}", response_model=AccountOut, summary="change its plan, name or status")
        def update_account(account_id: AccountId, body: AccountChange):
            plan = accounts.plan_named(self.plans, body.plan) if body.plan else None
            record = accounts.changed_account(
                accounts.existing_account(ledger, account_id), plan, body.name, body.status
            )
            if not ledger.update_account(record):
                raise UnknownAccount(account_id)
            return MoneyJSON(shown(record))

        @app.post("/accounts/{account_id}/suspend", response_model=AccountOut, summary="refuse its keys at once")
        def suspend_account(account_id: AccountId):
            return update_account(account_id, AccountChange(status="suspended"))

        @app.post("/accounts/{account_id}/resume", response_model=AccountOut, summary="serve its keys again")
        def resume_account(account_id: AccountId):
            return update_account(account_id, AccountChange(status="active"))

        @app.delete("/accounts/{account_id}", status_code=204, summary="revoke its keys, forget it and its books")
        def delete_account(account_id: AccountId):
            if not ledger.delete_account(account_id, now()):
                raise UnknownAccount(account_id)
            return Response(status_code=204)

        @app.post("/accounts/{account_id}/keys", status_code=201, response_model=MintedKey, summary="mint a key")
        def mint_key(account_id: AccountId, body: NewKey):
            account = accounts.existing_account(ledger, account_id)
            issued = accounts.mint_account_key(ledger, account, self.plans, body.policy, body.ttl, body.budget_usd,
                                               body.name, seal=self.seal)  # fmt: skip
            return MoneyJSON({**describe(issued.record, now()), "key": issued.key}, status_code=201)

        @app.get("/accounts/{account_id}/keys", response_model=list[KeyOut], summary="the keys minted for it")
        def account_keys(account_id: AccountId):
            accounts.existing_account(ledger, account_id)
            return MoneyJSON(accounts.describe_keys(ledger, account_id, now()))

        @app.post("/accounts/{account_id}/top-up", response_model=PeriodOut, summary="add to this period's budget")
        def top_up(account_id: AccountId, body: TopUp):
            if ledger.top_up(account_id, usd_to_micros(body.amount_usd), now()) is None:
                raise UnknownAccount(account_id)
            return MoneyJSON(shown(accounts.existing_account(ledger, account_id))["current_period"])

        @app.get("/accounts/{account_id}/usage", response_model=UsageOut, summary="spend per period, newest first")
        def usage(
            account_id: AccountId,
            periods: Annotated[int, Query(ge=1, le=1000, description="how many, newest first")] = 12,
            period: Annotated[
                str | None, Query(max_length=20, description="only this one (2026-12, 2026-W49, …)")
            ] = None,
        ):
            report = accounts.account_usage(ledger, accounts.existing_account(ledger, account_id), self.calendar, now())
            shown = [p for p in report["periods"] if period in (None, p["id"])]
            return MoneyJSON({**report, "periods": shown[:periods]})

        @app.get("/keys", response_model=list[KeyOut], summary="every key of every account")
        def list_keys(account_id: Annotated[str | None, Query(pattern=ID)] = None):
            records = ledger.account_keys(account_id) if account_id else ledger.list_keys()
            return MoneyJSON([describe(record, now()) for record in records if record.account_id])

        @app.get("/keys/{key_id}", response_model=KeyOut, summary="one key")
        def show_key(key_id: KeyId):
            return MoneyJSON(describe(existing_key(ledger, key_id), now()))

        @app.post("/keys/{key_id}/revoke", response_model=KeyOut, summary="revoke a key (and its children) at once")
        def revoke_key(key_id: KeyId):
            existing_key(ledger, key_id)
            ledger.revoke(key_id, now())
            return MoneyJSON(describe(existing_key(ledger, key_id), now()))


def existing_key(ledger: Ledger, key_id: str):
    """A key of an account: the admin API manages those only (a person's keys are `agentkeys keys`')."""
    record = ledger.get_key(key_id)
    if record is None or record.account_id is None:
        raise AccountRefused(f"no key {key_id} of an account", 404)
    return record


def error(status: int, kind: str, message: str) -> MoneyJSON:
    return MoneyJSON({"error": {"type": kind, "message": message}}, status_code=status)


async def refused_answer(request: Request, refused: AccountRefused) -> MoneyJSON:
    kinds = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 409: "conflict"}
    headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
    answer = error(refused.status, kinds.get(refused.status, "invalid_request"), refused.message)
    if headers:
        answer.headers.update(headers)
    return answer


async def unavailable_answer(request: Request, e: LedgerUnavailable) -> MoneyJSON:
    log.error("admin API: %s", e)
    return error(503, "unavailable", "the key store is unavailable; try again shortly")


async def invalid_answer(request: Request, e: RequestValidationError) -> MoneyJSON:
    """422 with each problem's place, reason and kind, as FastAPI documents it (without echoing the input)."""
    problems = [
        {"loc": list(problem["loc"]), "msg": problem["msg"].removeprefix("Value error, "), "type": problem["type"]}
        for problem in e.errors()
    ]
    return MoneyJSON({"detail": problems}, status_code=422)


# ----- the listener -----


class AdminServer:
    """Serves an AdminApi on host:port from a thread of its own until `stop`."""

    def __init__(self, api: AdminApi):
        self.api = api
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        config = uvicorn.Config(self.api.app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, server_header=False)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="agentkeys-admin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._server.serve())  # not the main thread: uvicorn leaves the proxy's signals alone

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
            self._server = None
        self.api.ledger.close()
