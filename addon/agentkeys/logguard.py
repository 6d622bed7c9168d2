"""Keep real keys out of the proxy's log, whatever mitmproxy is told.

The addon swaps the agent's key for the real one before the request leaves, so anything that
prints a forwarded request's headers prints the real key: mitmdump's `flow_detail` 2 and above
(headers, then bodies) and the proxy core's `proxy_debug` (every event, data included). Both are
lowered as soon as they are set, saying so; `agentkeys serve` refuses them in its config outright.
"""

import logging

from mitmproxy import ctx

from agentkeys.policy import KEY_SHOWING_OPTIONS, key_showing

log = logging.getLogger(__name__)


class LogGuard:
    def configure(self, updated: set[str]):
        unsafe = key_showing({name: getattr(ctx.options, name) for name in KEY_SHOWING_OPTIONS if name in updated})
        if unsafe:
            log.warning(
                "agentkeys: %s would print the real provider keys to the log; set to %s",
                ", ".join(unsafe),
                ", ".join(f"{name}={value}" for name, value in unsafe.items()),
            )
            ctx.options.update(**unsafe)
