"""Where every request stands: its state history, the records that cover it, and its deadline.

GDPR Art. 12(3) gives a controller one month from receipt to act on an erasure or rectification
request. `lmeraser requests` lists each request with its deadline (receipt + `requests.
deadline_months` calendar months) and flags those due within `requests.warn_days` days or overdue.
A request is done when an exact batch verified it; an influence update alone is not done.
"""

from __future__ import annotations

import calendar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from lmeraser.config import RequestsParams
from lmeraser.journal import Journal
from lmeraser.workspace import Workspace


@dataclass(frozen=True)
class RequestStatus:
    request_id: str
    kind: str
    method: str
    state: str  # received | approximated | applied | verified
    received_at: str
    deadline: str
    completed_at: str | None
    records: list[int]  # lineage records that cover it (influence, then exact)
    flag: str  # "" | "due soon" | "overdue" | "late" (completed after its deadline)
    history: list[dict]  # [{"state", "at"}]

    def to_json(self) -> dict:
        return asdict(self)


def add_months(moment: datetime, months: int) -> datetime:
    """The same day `months` later, clamped to the month's last day (31 Jan + 1 month = 28/29 Feb).

    Args:
        moment: the date and time to count from (a request's receipt).
        months: calendar months to add (`requests.deadline_months`).
    """
    month = moment.month - 1 + months
    year, month = moment.year + month // 12, month % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def request_statuses(ws: Workspace, params: RequestsParams, now: datetime | None = None) -> list[RequestStatus]:
    """Every journaled request, in order of receipt.

    Args:
        ws: the workspace whose journal is read.
        params: the deadline settings (`requests.deadline_months`, `requests.warn_days`).
        now: the moment the flags are computed for (default: now).
    """
    now = now or datetime.now(UTC)
    out = []
    for request_id, entry in Journal(ws).requests().items():
        request = entry.request
        if request is None:
            continue
        history = entry.history
        received = datetime.fromtimestamp(request.received_at, UTC)
        deadline = add_months(received, params.deadline_months)
        done = next((e for e in history if e["state"] == "verified"), None)
        completed = datetime.fromtimestamp(float(done["time"]), UTC) if done else None
        if completed:
            flag = "late" if completed > deadline else ""
        elif now > deadline:
            flag = "overdue"
        elif deadline - now <= timedelta(days=params.warn_days):
            flag = "due soon"
        else:
            flag = ""
        out.append(
            RequestStatus(
                request_id=request_id,
                kind=request.kind,
                method=entry.method,
                state=entry.state,
                received_at=_iso(received),
                deadline=_iso(deadline),
                completed_at=_iso(completed) if completed else None,
                records=entry.records,
                flag=flag,
                history=[
                    {"state": e["state"], "at": _iso(datetime.fromtimestamp(float(e.get("time", 0)), UTC))}
                    for e in history
                ],
            )
        )
    return sorted(out, key=lambda s: s.received_at)
