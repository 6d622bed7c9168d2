"""The ledger contract for rate limits and the loop breaker, on every backend (the fixtures are
test_ledger's): buckets that refill at the limit's rate, tokens corrected at settlement, slots that
a crash cannot leak, all of a call's asks taken at once or none, across threads."""

import multiprocessing
import threading

import pytest
import test_ledger
from test_ledger import open_patiently

from agentkeys.ledger import LimitRequest
from agentkeys.ledger.limits import IdenticalAsk, RateAsk

NOW = 1_000_000.0
# The contract suite's fixtures: every test runs on every store.
redis_server, store, ledger = test_ledger.redis_server, test_ledger.store, test_ledger.ledger


def ask(who: str = "key:k1", tokens: int = 0, call_id: str = "c", identical=(), **limits) -> LimitRequest:
    return LimitRequest(call_id, tokens, (RateAsk(who, **limits),) if limits else (), tuple(identical))


class Calls:
    """Calls made one after another against one ledger, each with its own id."""

    def __init__(self, ledger):
        self.ledger, self.count = ledger, 0

    def take(self, now: float = NOW, **kwargs):
        self.count += 1
        return self.ledger.take_limits(ask(call_id=f"c{self.count}", **kwargs), now)


def test_a_minutes_requests_pass_at_once_then_one_each_refill(ledger):
    calls = Calls(ledger)
    assert all(calls.take(requests_per_minute=6).ticket for _ in range(6))
    refused = calls.take(requests_per_minute=6)
    assert refused.ticket is None
    assert (refused.refusal.limit, refused.refusal.who, refused.refusal.allowed) == ("requests_per_minute", "key:k1", 6)
    assert refused.refusal.retry_after == pytest.approx(10.0, abs=0.01)  # 60 s / 6
    assert calls.take(NOW + 9.9, requests_per_minute=6).ticket is None
    assert calls.take(NOW + 10.0, requests_per_minute=6).ticket
    assert calls.take(NOW + 10.0, requests_per_minute=6).ticket is None


@pytest.mark.parametrize("rpm", [30, 600])
def test_at_twice_the_rpm_half_the_calls_are_refused(ledger, rpm):
    """The proof: calls at twice a key's rpm for ten minutes (the store's clock controlled) pass at the
    limit's rate. The bucket starts with a minute's allowance, so the whole first minute passes (its
    allowance and what refills meanwhile); from then on `rpm` a minute pass, to within one call, and
    in all never more than rpm + rpm * minutes (N + N*T/60)."""
    calls, minutes, interval = Calls(ledger), 10, 60 / (2 * rpm)
    passed = [0] * minutes
    for n in range(2 * rpm * minutes):
        now = NOW + n * interval
        if calls.take(now, requests_per_minute=rpm).ticket:
            passed[int((now - NOW) // 60)] += 1
    assert passed[0] == pytest.approx(2 * rpm, abs=1)
    assert all(abs(count - rpm) <= 1 for count in passed[1:]), passed
    assert rpm * (minutes + 1) - 2 <= sum(passed) <= rpm * (minutes + 1)


def test_tokens_are_counted_at_admission_and_corrected_at_settlement(ledger):
    calls = Calls(ledger)
    first = calls.take(tokens=600, tokens_per_minute=1000).ticket
    refused = calls.take(tokens=600, tokens_per_minute=1000)
    assert refused.refusal.limit == "tokens_per_minute"
    assert refused.refusal.retry_after == pytest.approx(12.0, abs=0.01)  # 200 over, at 1000 a minute
    ledger.return_limits(first, 100, NOW)  # it used 100 of its 600
    assert calls.take(tokens=600, tokens_per_minute=1000).ticket  # 100 + 600 fit
    refused = calls.take(tokens=400, tokens_per_minute=1000)
    assert refused.refusal.retry_after == pytest.approx(6.0, abs=0.01)


def test_a_call_that_used_more_than_counted_takes_the_rest(ledger):
    calls = Calls(ledger)
    first = calls.take(tokens=100, tokens_per_minute=1000).ticket
    ledger.return_limits(first, 900, NOW)
    assert calls.take(tokens=200, tokens_per_minute=1000).refusal.limit == "tokens_per_minute"
    assert calls.take(tokens=100, tokens_per_minute=1000).ticket


def test_a_call_larger_than_the_whole_limit_can_never_pass(ledger):
    refused = Calls(ledger).take(tokens=1001, tokens_per_minute=1000)
    assert refused.refusal.limit == "tokens_per_minute" and refused.refusal.retry_after is None


def test_concurrent_calls_take_slots_that_settlement_frees(ledger):
    calls = Calls(ledger)
    tickets = [calls.take(concurrent_calls=2).ticket for _ in range(2)]
    assert all(tickets)
    refused = calls.take(concurrent_calls=2)
    assert refused.refusal.limit == "concurrent_calls" and refused.refusal.retry_after
    ledger.return_limits(tickets[0], 10, NOW)
    assert calls.take(concurrent_calls=2).ticket


def test_a_slot_its_proxy_never_gave_back_stops_counting_once_stale(ledger):
    calls = Calls(ledger)
    assert calls.take(concurrent_calls=1).ticket  # its proxy dies: never returned
    assert calls.take(NOW + 899, concurrent_calls=1).ticket is None
    assert calls.take(NOW + 901, concurrent_calls=1).ticket


def test_one_refusal_takes_nothing_from_any_other_limit(ledger):
    """All of a call's asks at once, or none: a call refused by one who's limit counts nowhere."""
    key_limits = RateAsk("key:k1", requests_per_minute=5, concurrent_calls=5)
    both = LimitRequest("c1", 10, (key_limits, RateAsk("account:a", concurrent_calls=1)))
    taken = ledger.take_limits(both, NOW).ticket
    second = LimitRequest("c2", 10, both.rates)
    assert ledger.take_limits(second, NOW).refusal.who == "account:a"
    alone = LimitRequest("c3", 10, (key_limits,))
    for n in range(4):  # the refused call took no request and no slot of key:k1
        assert ledger.take_limits(LimitRequest(f"d{n}", 10, alone.rates), NOW).ticket
    assert ledger.take_limits(alone, NOW).refusal.limit == "requests_per_minute"
    assert taken


def test_a_call_never_forwarded_gives_everything_back(ledger):
    calls = Calls(ledger)
    limits = {"requests_per_minute": 1, "tokens_per_minute": 100, "concurrent_calls": 1, "max_calls": 1}
    same = [IdenticalAsk("key:k1", "d1", 1, 60)]
    ticket = calls.take(tokens=100, identical=same, **limits).ticket
    ledger.return_limits(ticket, None, NOW)
    assert calls.take(tokens=100, identical=same, **limits).ticket


def test_max_calls_is_for_the_whole_life_of_the_who(ledger):
    calls = Calls(ledger)
    tickets = [calls.take(max_calls=3).ticket for _ in range(3)]
    for ticket in tickets:
        ledger.return_limits(ticket, 0, NOW)
    refused = calls.take(NOW + 86_000, max_calls=3)
    assert (refused.refusal.limit, refused.refusal.allowed, refused.refusal.retry_after) == ("max_calls", 3, None)
    assert Calls(ledger).take(who="key:k2", max_calls=3).ticket


def test_identical_calls_beyond_the_window_limit_are_refused_until_the_window_passes(ledger):
    calls = Calls(ledger)
    same = [IdenticalAsk("key:k1", "digest-a", 3, 600)]
    for n in range(3):
        assert calls.take(NOW + n, identical=same).ticket
    refused = calls.take(NOW + 3, identical=same)
    assert (refused.refusal.limit, refused.refusal.allowed, refused.refusal.window_seconds) == (
        "max_identical_calls", 3, 600)  # fmt: skip
    assert calls.take(NOW + 3, identical=[IdenticalAsk("key:k1", "digest-b", 3, 600)]).ticket
    assert calls.take(NOW + 3, identical=[IdenticalAsk("key:k2", "digest-a", 3, 600)]).ticket
    assert calls.take(NOW + 599, identical=same).ticket is None
    assert calls.take(NOW + 600.5, identical=same).ticket  # the first has left the window


def test_a_loop_refusal_wins_over_a_rate_one(ledger):
    calls = Calls(ledger)
    same = [IdenticalAsk("key:k1", "d", 1, 60)]
    assert calls.take(identical=same, requests_per_minute=1).ticket
    assert calls.take(identical=same, requests_per_minute=1).refusal.limit == "max_identical_calls"


@pytest.mark.parametrize("shared", [True, False], ids=["one-handle", "handle-per-thread"])
def test_concurrent_callers_never_hold_more_slots_than_the_limit(store, shared):
    setup, limit, threads, attempts = open_patiently(store), 3, 6, 40
    held, peak, lock, start = set(), [0], threading.Lock(), threading.Barrier(threads)

    def worker(n: int):
        handle = setup if shared else open_patiently(store)
        start.wait()
        for i in range(attempts):
            answer = handle.take_limits(ask(call_id=f"w{n}-{i}", concurrent_calls=limit), NOW)
            if answer.ticket:
                with lock:
                    held.add(answer.ticket.request.call_id)
                    peak[0] = max(peak[0], len(held))
                with lock:
                    held.discard(answer.ticket.request.call_id)
                handle.return_limits(answer.ticket, 0, NOW)
        if not shared:
            handle.close()

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert 0 < peak[0] <= limit
    setup.close()


PROCESSES, EACH, RPM = 3, 40, 50  # 120 attempts at one instant against 50 requests a minute


def take_many(url: str, start, results) -> None:
    """One replica (a spawned process) with its own handle on the store, taking as fast as it can."""
    handle = open_patiently(url)
    start.wait()
    answers = [handle.take_limits(ask(call_id=f"{id(handle)}-{n}", requests_per_minute=RPM), NOW) for n in range(EACH)]
    handle.close()
    results.put(sum(answer.ticket is not None for answer in answers))


@pytest.mark.parametrize("kind", test_ledger.BACKENDS)
def test_replicas_sharing_a_store_share_its_limits(kind, request):
    """Proxies on one SQLite file, or on one Redis, count against the same buckets: together they pass
    exactly the limit, never a limit each."""
    with test_ledger.empty_store(kind, request) as url:
        context = multiprocessing.get_context("spawn")
        start, results = context.Barrier(PROCESSES), context.Queue()
        replicas = [context.Process(target=take_many, args=(url, start, results)) for _ in range(PROCESSES)]
        for replica in replicas:
            replica.start()
        passed = sum(results.get(timeout=60) for _ in replicas)
        for replica in replicas:
            replica.join(timeout=10)
            assert replica.exitcode == 0
        assert passed == RPM
