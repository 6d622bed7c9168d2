"""A mock LLM provider speaking the OpenAI, Anthropic, Gemini and Azure OpenAI wire formats.

Used by the end-to-end tests and the benchmark as the "real" upstream behind
the proxy. It serves, on ``127.0.0.1``:

* ``POST /v1/chat/completions`` (OpenAI; streaming and non-streaming),
* ``POST /v1/responses`` (OpenAI Responses API; streaming events too),
* ``POST /v1/completions`` and ``POST /v1/embeddings`` (OpenAI),
* ``POST /v1/messages`` (Anthropic; streaming and non-streaming; prompt
  caching at ``cache_control`` breakpoints) and ``/v1/messages/count_tokens``,
* ``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent``
  (``?alt=sse``) and ``:countTokens`` (Gemini, key in ``x-goog-api-key``),
* Azure OpenAI's ``/openai/deployments/{deployment}/…?api-version=`` and
  ``/openai/v1/…`` paths (key in ``api-key``; a deployment is its model),
* ``GET /v1/models`` (OpenAI model list; not metered),

answers anything else with a 404 in OpenAI's error shape, and records every
request in ``received`` and the usage it reported for every successful
metered call in ``reported``. Tests can make the next calls fail
(``fail_next``), be slow (``delay_next``) or lose their connection mid-stream
(``cut_next_stream``).

The reply to a metered call is ``n`` times "hello" ("hello hello hello"),
where ``n`` is the configured ``output_tokens`` capped by the request's
``max_tokens``; each word is exactly one o200k token. Input tokens are
counted with tiktoken's o200k encoding, loaded from a local file (nothing is
downloaded), unless another counter is injected.

Beyond plain tokens, as the real providers do: a request that asks for
reasoning (``reasoning_effort``, ``reasoning``, a Gemini ``thinkingBudget``)
spends half its output on it; an OpenAI request with a ``prompt_cache_key``
seen before reads half its input from the cache; an Anthropic request writes
the prefix up to its last ``cache_control`` block to the cache (one hour if
its ``ttl`` says so) and reads it on later calls; a Gemini ``cachedContent``
adds ``gemini_cached_tokens`` read from the cache.

One module per wire format (``openai``, ``anthropic``, ``gemini``, ``azure``), each turning a
request body into a ``Call`` (what it bills) and rendering the reply; ``server`` routes requests to
them and holds ``MockProvider``; ``call`` and ``tokens`` are what the formats share.

Run ``python -m mock_provider --port N`` from ``tests/`` to serve from another process.
"""

from mock_provider.call import Received
from mock_provider.server import MockProvider
from mock_provider.tokens import count_o200k_tokens

__all__ = ["MockProvider", "Received", "count_o200k_tokens"]
