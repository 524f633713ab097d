"""When a scheduled job runs: a cron expression in an IANA timezone, parsed by ``croniter``.

A tick is a scheduled time; its run id is that time in UTC (``20261126T010000Z``), so a tick
names its outputs and a rerun of the same tick finds them. ``due(last, now)`` lists the ticks
missed since ``last`` (for ``catch_up``); ``next_after(t)`` is the next one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter


def run_id(tick: datetime) -> str:
    return tick.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def parse_run_id(rid: str) -> datetime:
    return datetime.strptime(rid, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


class Schedule:
    def __init__(self, cron: str, tz: str = "UTC"):
        try:
            self.tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"schedule.timezone: {tz!r} is not an IANA timezone (e.g. UTC, Europe/Berlin): {e}") from None
        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise ValueError(f"schedule.cron: {cron!r} is not a valid cron expression "
                             "(five fields: minute hour day-of-month month day-of-week, e.g. '0 * * * *')")
        self.cron = cron

    def next_after(self, t: datetime) -> datetime:
        """The first tick strictly after ``t``."""
        try:
            return croniter(self.cron, t.astimezone(self.tz)).get_next(datetime)
        except CroniterError as e:  # e.g. an expression that never fires (31 February)
            raise ValueError(f"schedule.cron: {self.cron!r} has no next time after {t.isoformat()}: {e}") from None

    def latest_at(self, t: datetime) -> datetime:
        """The last tick at or before ``t``."""
        it = croniter(self.cron, t.astimezone(self.tz))
        prev = it.get_prev(datetime)
        nxt = self.next_after(prev)
        return nxt if nxt <= t else prev

    def due(self, last: datetime, now: datetime, limit: int = 1000) -> list[datetime]:
        """Ticks after ``last`` up to and including ``now`` (oldest first, at most ``limit``)."""
        out, t = [], last
        while len(out) < limit:
            t = self.next_after(t)
            if t > now:
                break
            out.append(t)
        return out
