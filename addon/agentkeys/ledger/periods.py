"""Budget periods on the calendar, in one time zone: which day, week and month a moment falls in.

An account's budget is spent per period. A hold is charged to the period it was taken in, named by
an id that sorts in time order (`2026-12-01` a day, `2026-W49` an ISO week, `2026-12` a month). The
proxy works out the ids of the present for each kind once per call and hands them to the store's
atomic hold, which picks the one of the account's kind: so neither SQL nor Lua has to know time zones.
A store on another machine's clock (Redis) is handed the ids of the day before and after too
(`DayWindow`), and picks by its own clock.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

PeriodKind = Literal["day", "week", "month"]
PERIOD_KINDS: tuple[PeriodKind, ...] = ("day", "week", "month")


@dataclass(frozen=True)
class Period:
    kind: PeriodKind
    period_id: str
    starts_at: float
    ends_at: float


@dataclass(frozen=True)
class PeriodIds:
    """The id of the current day, week and month: what the store's hold chooses from."""

    day: str
    week: str
    month: str

    def of(self, kind: str) -> str:
        return getattr(self, kind)


@dataclass(frozen=True)
class DayWindow:
    """The day a moment falls in, with the period ids of the day before it, of it, and of the day after: a
    store whose clock is not this machine's (Redis's `TIME`) picks among them by its own clock, so a hold
    is booked to the period of the store's present, for clocks up to a day apart."""

    starts_at: float
    ends_at: float
    before: PeriodIds
    during: PeriodIds
    after: PeriodIds


class Calendar:
    """Periods in one time zone (an IANA name such as Europe/Paris; UTC by default)."""

    def __init__(self, time_zone: str = "UTC"):
        self.time_zone = time_zone
        self._zone = UTC if time_zone == "UTC" else ZoneInfo(time_zone)
        self._cached: tuple[float, float, PeriodIds] | None = None  # (from, until, ids): the day they hold for
        self._window: DayWindow | None = None

    def period(self, kind: PeriodKind, now: float) -> Period:
        """The period of `kind` that `now` falls in, with its bounds (a day may be 23 or 25 hours long)."""
        local = datetime.fromtimestamp(now, self._zone)
        day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
        if kind == "day":
            start, end = day, day + timedelta(days=1)
            period_id = start.strftime("%Y-%m-%d")
        elif kind == "week":
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
            year, week, _ = start.isocalendar()
            period_id = f"{year}-W{week:02d}"
        elif kind == "month":
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
            period_id = start.strftime("%Y-%m")
        else:
            raise ValueError(f"unknown period {kind!r} (day, week or month)")
        return Period(kind, period_id, self._timestamp(start), self._timestamp(end))

    def period_ids(self, now: float) -> PeriodIds:
        """The current ids of every kind; worked out once per day, since a hold asks on every call."""
        cached = self._cached
        if cached is not None and cached[0] <= now < cached[1]:
            return cached[2]
        day = self.period("day", now)
        ids = PeriodIds(day.period_id, self.period("week", now).period_id, self.period("month", now).period_id)
        self._cached = (day.starts_at, day.ends_at, ids)
        return ids

    def day_window(self, now: float) -> DayWindow:
        """The periods around `now` (see `DayWindow`); worked out once per day, since a hold asks on every call."""
        window = self._window
        if window is not None and window.starts_at <= now < window.ends_at:
            return window
        day = self.period("day", now)
        before, during, after = self._ids(day.starts_at - 1), self._ids(now), self._ids(day.ends_at)
        window = DayWindow(day.starts_at, day.ends_at, before, during, after)
        self._window = window
        return window

    def _ids(self, now: float) -> PeriodIds:
        return PeriodIds(*(self.period(kind, now).period_id for kind in PERIOD_KINDS))

    def _timestamp(self, local: datetime) -> float:
        return local.replace(tzinfo=self._zone).timestamp()
