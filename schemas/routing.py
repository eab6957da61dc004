"""Routing between tasks: what a router task adds to a ticket it forwards to a specialist."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RouteHop(BaseModel):
    """One forwarding step: task `task` answered `field` = `label` (by `route`: student, teacher
    or unverified) and sent the ticket on to task `to`."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=64)
    field: str = Field(min_length=1, max_length=64)
    label: str = Field(min_length=1, max_length=200)
    route: str = Field(min_length=1, max_length=32)
    to: str = Field(min_length=1, max_length=64)


# A forwarded ticket carries at most this many hops; a longer chain is a routing loop.
MAX_ROUTE_HOPS = 8
