"""A ledger that reports each failure of its store, for the `agentkeys_store_errors_total` counter."""

import functools

from agentkeys.ledger.base import Ledger, LedgerBusy, LedgerUnavailable


class ErrorCountingLedger:
    """Any ledger, with `on_error()` called each time one of its operations finds the store unavailable.

    On the non-blocking handle a busy store is not a failure (the caller asks again on a thread, which
    waits); on the blocking one, still busy after its wait, it is. Each operation is wrapped once, on
    first use, so a call pays one plain function call more.
    """

    def __init__(self, ledger: Ledger, on_error, busy_is_error: bool = True):
        self._ledger = ledger
        self._on_error = on_error
        self._not_counted = () if busy_is_error else (LedgerBusy,)

    def __getattr__(self, name: str):
        operation = getattr(self._ledger, name)
        if not callable(operation):
            return operation

        @functools.wraps(operation)
        def counted(*args, **kwargs):
            try:
                return operation(*args, **kwargs)
            except self._not_counted:
                raise
            except LedgerUnavailable:
                self._on_error()
                raise

        setattr(self, name, counted)  # found in the instance from now on: __getattr__ is not asked again
        return counted

    def nonblocking(self) -> "ErrorCountingLedger | None":
        handle = self._ledger.nonblocking()
        return None if handle is None else ErrorCountingLedger(handle, self._on_error, busy_is_error=False)
