"""Scoped keys and where a request carries them (credentials.py)."""

from agentkeys import credentials


def test_query_credentials_are_stripped_and_the_rest_kept_as_sent():
    query = "alt=sse&key=ak_x_y&k%65y=second&keys=1&x=a%20b"
    assert credentials.credentials_in_query(query) == ["ak_x_y", "second"]
    assert credentials.without_query_credentials(query) == "alt=sse&keys=1&x=a%20b"
