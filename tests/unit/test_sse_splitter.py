"""providers/base.py's SseSplitter: every event found however the stream is cut, linear in an event's
size, and an event over the limit handed back whole."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.providers import base
from agentkeys.providers.base import SseEventTooLarge, SseSplitter, parse_event


def split_in_chunks(splitter: SseSplitter, data: bytes, chunk: int = 1024) -> list:
    return [event for i in range(0, len(data), chunk) for event in splitter.feed(data[i : i + chunk])]


@pytest.mark.parametrize("size", [100_000, 2_000_000])
def test_the_sse_splitter_reads_each_byte_of_an_event_once(monkeypatch, size):
    """Linear by operation count: the bytes searched for a boundary, summed over every chunk of one long
    event, stay within the event's size (plus the few bytes a boundary may straddle, once per chunk)."""
    searched, boundary_end = [], base.boundary_end

    def counting_boundary_end(data, start):
        searched.append(len(data) - start)
        return boundary_end(data, start)

    monkeypatch.setattr(base, "boundary_end", counting_boundary_end)
    data = b"data: " + b"x" * size + b"\n\n"
    events = split_in_chunks(SseSplitter(), data)
    assert len(events) == 1 and len(events[0].data) == size
    chunks = len(range(0, len(data), 1024))
    assert sum(searched) <= len(data) + 4 * chunks


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")), max_size=10),
    separator=st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n\r\n"]),
    chunk=st.integers(1, 40),
)
def test_the_sse_splitter_finds_every_event_whatever_the_chunking(events, separator, chunk):
    stream = b"".join(b"data: " + body + separator for body in events)
    splitter = SseSplitter()
    found = split_in_chunks(splitter, stream, chunk)
    assert [event.raw for event in found] == [b"data: " + body + separator for body in events]
    assert splitter.flush() == b""


def test_an_event_over_the_limit_hands_back_every_byte_held():
    splitter = SseSplitter(max_event_bytes=100)
    assert [event.raw for event in splitter.feed(b"data: a\n\ndata: ")] == [b"data: a\n\n"]
    with pytest.raises(SseEventTooLarge) as too_large:
        splitter.feed(b"x" * 200)
    assert too_large.value.held == b"data: " + b"x" * 200
    assert splitter.flush() == b""


@pytest.mark.parametrize(
    ("raw", "event", "data"),
    [
        (b"data: {}\n\n", None, "{}"),
        (b"data: {}\r\n\r\n", None, "{}"),
        (b"data: {}\n\r\n", None, "{}"),
        (b"data: a\rdata: b\n\n", None, "a\nb"),  # a lone CR ends a line too
        (b"data: a\ndata: b\n\n", None, "a\nb"),
        (b"event: ping\ndata: {}\n\n", "ping", "{}"),
        (b"data:{}\n\n", None, "{}"),
    ],
)
def test_an_event_reads_the_same_whether_it_has_one_data_line_or_more(raw, event, data):
    assert (parse_event(raw).event, parse_event(raw).data) == (event, data)


def test_a_chunk_of_whole_events_and_one_cut_in_two_give_the_same_events():
    events = [b"data: 1\n\n", b"event: e\ndata: 2\r\n\r\n", b"data: 3\n\n"]
    whole = SseSplitter().feed(b"".join(events))
    splitter = SseSplitter()
    cut = splitter.feed(b"".join(events)[:12]) + splitter.feed(b"".join(events)[12:])
    assert [e.raw for e in whole] == [e.raw for e in cut] == events


def test_an_event_of_exactly_the_limit_is_handed_on_and_one_byte_more_is_refused():
    exact = b"data: " + b"x" * 92 + b"\n\n"  # 100 bytes
    assert [event.raw for event in SseSplitter(max_event_bytes=100).feed(exact)] == [exact]
    split = SseSplitter(max_event_bytes=100)
    assert split.feed(exact[:-1]) == [] and [event.raw for event in split.feed(b"\n")] == [exact]
    with pytest.raises(SseEventTooLarge) as too_large:
        SseSplitter(max_event_bytes=100).feed(b"data: " + b"x" * 93 + b"\n\n")  # complete, but 101 bytes
    assert too_large.value.held == b"data: " + b"x" * 93 + b"\n\n"
    assert str(too_large.value) == "a server-sent event exceeded 100 bytes (max_stream_event_bytes)"
    incomplete = SseSplitter(max_event_bytes=100)
    assert incomplete.feed(b"data: " + b"x" * 94) == []  # 100 bytes held, not yet too many


def test_events_after_the_first_in_one_chunk_are_each_measured_on_their_own():
    events = [b"data: " + bytes([65 + i]) * 52 + b"\n\n" for i in range(3)]  # 60 bytes each
    assert [event.raw for event in SseSplitter(max_event_bytes=100).feed(b"".join(events))] == events
