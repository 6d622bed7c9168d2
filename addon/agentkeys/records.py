"""What each audit record says, built from the gate's plain data (no mitmproxy here).

One record per call the proxy decided: a refusal, a forwarded call with what it was charged, an
answer of the proxy's own API, or a hold that a sweep settled because its call's proxy died.
"""

import json
from dataclasses import dataclass

from agentkeys.audit import CallRecord
from agentkeys.calls import CallRequest, Denial, Outcome
from agentkeys.gate import Admission, model_named_in
from agentkeys.keys import iso
from agentkeys.ledger import KeyRecord, StaleHold
from agentkeys.money import micros_to_usd
from agentkeys.pricing import Usage
from agentkeys.realkeys import RealKeyCall, usage_and_cost
from agentkeys.settlement import Settlement


@dataclass(frozen=True)
class Timings:
    """How long the parts of a forwarded call took, in milliseconds (None when not known)."""

    proxy_overhead_ms: float
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None


def record_of(key: KeyRecord | None, key_id: str | None = None, **fields) -> CallRecord:
    """An audit record naming the key it was made with (or just the id presented, for an unknown key), and
    the job or pod that key was minted for (a keyless key, or its children)."""
    if key is None:
        return CallRecord(key_id=key_id, key_name=None, policy=None, **fields)
    identity = json.loads(key.identity_json) if key.identity_json else None
    return CallRecord(
        key_id=key.key_id, key_name=key.name, policy=key.policy_name, identity=identity, account_id=key.account_id,
        **fields,
    )  # fmt: skip


def denied_record(call: CallRequest, denial: Denial, status: int, policy_revision: str | None) -> CallRecord:
    return record_of(
        denial.key, key_id=denial.presented_key_id, provider=call.provider, method=call.method, path=call.path,
        model=denial.model, decision="deny", reason=denial.message, status=status, policy_revision=policy_revision,
        deny_kind=denial.kind.value,
    )  # fmt: skip


def allowed_record(
    call: CallRequest, admission: Admission, settlement: Settlement, status: int | None, note: str, timings: Timings
) -> CallRecord:
    would_deny = [denial.message.removeprefix("agentkeys: ") for denial in admission.would_deny]
    reasons = [*(f"would deny: {why}" for why in would_deny), note, settlement.why, clamp_note(admission)]
    record = record_of(
        admission.key, provider=call.provider, method=call.method, path=call.path, model=admission.facts.model,
        decision="would_deny" if would_deny else "allow", reason="; ".join(reason for reason in reasons if reason),
        status=status,
        metering=settlement.metering, cost_micros=settlement.cost_micros,
        cost_usd=micros_to_usd(settlement.cost_micros), hold_micros=admission.hold_micros,
        proxy_overhead_ms=timings.proxy_overhead_ms, upstream_latency_ms=timings.upstream_latency_ms,
        ttft_ms=timings.ttft_ms, policy_revision=admission.policy.revision,
    )  # fmt: skip
    if admission.would_deny:
        record.would_deny = [denial.rule.value for denial in admission.would_deny]
        record.deny_kind = admission.would_deny[0].kind.value
    add_usage(record, settlement.usage)
    return record


def add_usage(record: CallRecord, usage: Usage | None) -> None:
    if usage:
        record.input_tokens, record.output_tokens = usage.input_tokens, usage.output_tokens
        record.cached_tokens, record.cache_write_tokens = usage.cached_tokens, usage.cache_write_tokens
        record.reasoning_tokens = usage.reasoning_tokens


def control_record(
    call: CallRequest, key: KeyRecord | None, status: int, reason: str, provider: str, identity: dict | None = None
) -> CallRecord:
    """`identity`: who an OIDC token proved to be, for an exchange refused after verifying it (no key yet)."""
    record = record_of(
        key, provider=provider, method=call.method, path=call.path, model=None,
        decision="allow" if status < 400 else "deny", reason=reason, status=status, metering="free",
    )  # fmt: skip
    record.identity = record.identity or identity
    return record


@dataclass(frozen=True)
class Traffic:
    """Where a call passed on untouched went, who sent it, and how many bytes each way."""

    host: str
    client: str
    request_bytes: int
    response_bytes: int | None = None


def egress_record(
    method: str, host: str, port: int, client: str, refusal: str | None, llm_host: str | None = None
) -> CallRecord:
    """Traffic to a host that is not a provider's call: a tunnel or request passed on, or refused; `llm_host`,
    the vendor of a catalogued LLM API host."""
    return CallRecord(
        key_id=None, key_name=None, policy=None, provider=None, method=method, path="", model=None,
        decision="deny" if refusal else "pass", reason=refusal or "passed through untouched (egress: passthrough)",
        status=403 if refusal else None, host=host, port=port, client=client, llm_host=llm_host,
    )  # fmt: skip


def llm_host_record(
    method: str, path: str, port: int, vendor: str, traffic: Traffic, refusal: str | None, setting: str
) -> CallRecord:
    """A call to a catalogued LLM API host that no provider is configured for: refused, or passed on as sent."""
    passed = f"an LLM API host ({vendor}) no provider is configured for: passed on (unknown_llm_hosts: {setting})"
    return CallRecord(
        key_id=None, key_name=None, policy=None, provider=None, method=method, path=path, model=None,
        decision="deny" if refusal else "pass", reason=refusal or passed, status=403 if refusal else None,
        host=traffic.host, port=port, client=traffic.client, deny_kind="unknown_llm_host" if refusal else None,
        llm_host=vendor, request_bytes=traffic.request_bytes,
    )  # fmt: skip


def real_key_record(
    call: CallRequest, observed: RealKeyCall, outcome: Outcome, status: int | None, traffic: Traffic
) -> CallRecord:
    """A call carrying a real provider key, passed on untouched (`real_keys: audit`): its key's fingerprint,
    and the tokens and cost from the provider's usage; no key of ours, no budget charged."""
    usage, cost, why = usage_and_cost(observed, outcome)
    model = observed.facts.model if observed.facts else model_named_in(call.body)
    reason = "; ".join(filter(None, ["a real provider key, passed on untouched (real_keys: audit)", why]))
    record = CallRecord(
        key_id=None, key_name=None, policy=None, provider=call.provider, method=call.method, path=call.path,
        model=model, decision="pass", reason=reason, status=status, metering="real_key", cost_micros=cost,
        cost_usd=micros_to_usd(cost), host=traffic.host, client=traffic.client, real_key=observed.fingerprint,
        request_bytes=traffic.request_bytes, response_bytes=traffic.response_bytes,
    )  # fmt: skip
    add_usage(record, usage)
    return record


def stale_hold_record(hold: StaleHold) -> CallRecord:
    return CallRecord(
        key_id=hold.key_id, key_name=None, policy=None, provider=None, method="", path="", model=None,
        decision="allow", metering="held", cost_micros=hold.amount_micros, cost_usd=micros_to_usd(hold.amount_micros),
        hold_micros=hold.amount_micros,
        reason=f"settled at its full hold: the proxy that made this call (hold {hold.hold_id}, taken at"
        f" {iso(hold.created_at)}) stopped before settling it, and the provider may have billed it",
    )  # fmt: skip


def clamp_note(admission: Admission) -> str:
    if not admission.clamped_to:
        return ""
    why = "the policy's max_output_tokens" if admission.clamped_by == "policy" else "to fit the budget"
    return f"output limit lowered to {admission.clamped_to} tokens ({why})"
