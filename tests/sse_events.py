"""Server-sent events as providers send them, and a stream meter fed through the proxy's own splitter."""

import json

from agentkeys.providers.base import SseSplitter


def sse(data, event=None, newline="\n") -> bytes:
    """One event: ``data`` as JSON unless it is text already, named ``event`` if given."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}{newline}" if event else ""
    return f"{head}data: {payload}{newline}{newline}".encode()


def feed_all(meter, events: list[bytes]) -> list[bool]:
    """Feed whole events through a splitter into a meter; what the meter passes on, per event."""
    splitter = SseSplitter()
    return [meter.feed(event) for event in splitter.feed(b"".join(events))]
