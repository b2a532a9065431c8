"""What the demo plays: which users submit what, and which WeChat faults strike when.

The plan is fixed before anything runs, so the outcome every job should have is known in
advance and the report can check it: valid codes succeed, never-minted codes fail with
``invalid_code``, and a repeated submission ends exactly like the first one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEMO_APPS",
    "FaultStep",
    "UserPlan",
    "build_plan",
    "fault_schedule",
]

#: The two mini programs of the demo (appid, secret); the secrets exist only in the sandbox.
DEMO_APPS: tuple[tuple[str, str], ...] = (
    ("wxdemo0000000001", "demo-secret-1"),
    ("wxdemo0000000002", "demo-secret-2"),
)
#: Share of jobs that repeat a code already submitted (a double tap, a page reload).
DUPLICATE_SHARE = 0.10
#: Share of jobs whose code WeChat never issued (a forged or mangled request).
INVALID_SHARE = 0.03
#: How long after the first submission a "later" repeat comes, in seconds.
LATER_REPEAT_DELAY_SECONDS = (1.0, 3.0)

Repeat = Literal["none", "immediate", "later"]


@dataclass(frozen=True)
class UserPlan:
    """One user of one app: logs in, submits a phone code, maybe submits it again."""

    index: int
    appid: str
    #: The code was never minted: WeChat answers 40029 and the job fails ``invalid_code``.
    invalid_code: bool
    repeat: Repeat

    @property
    def jobs(self) -> int:
        return 1 if self.repeat == "none" else 2


def build_plan(jobs: int, appids: tuple[str, ...], *, seed: int | None = None) -> list[UserPlan]:
    """Users whose submissions add up to ``jobs``: ~10% repeats, ~3% never-minted codes."""
    if jobs < 3:
        raise ValueError("the demo needs at least 3 jobs")
    rng = random.Random(seed)
    invalid = max(1, round(jobs * INVALID_SHARE))
    duplicates = max(1, round(jobs * DUPLICATE_SHARE))
    valid = jobs - invalid - duplicates
    kinds = [True] * invalid + [False] * valid
    rng.shuffle(kinds)
    repeated = set(rng.sample([i for i, invalid_code in enumerate(kinds) if not invalid_code], duplicates))
    users: list[UserPlan] = []
    for index, invalid_code in enumerate(kinds):
        repeat: Repeat = "none"
        if index in repeated:
            repeat = "immediate" if rng.random() < 0.5 else "later"
        users.append(UserPlan(index, appids[index % len(appids)], invalid_code, repeat))
    return users


FaultKind = Literal["busy", "http_502", "drop", "revoke"]


@dataclass(frozen=True)
class FaultStep:
    """A fault injected into the sandbox once this share of the jobs has been submitted."""

    at_share: float
    kind: FaultKind
    #: How many phone-number requests it hits (``revoke`` hits every worker's current token).
    times: int
    description: str


def fault_schedule(appids: tuple[str, ...]) -> list[FaultStep]:
    """The faults of one run, in order: each hit job must still succeed through retries."""
    return [
        FaultStep(0.15, "busy", 5, "5 x errcode -1 (system busy) on getuserphonenumber"),
        FaultStep(0.35, "http_502", 2, "2 x HTTP 502 on getuserphonenumber"),
        FaultStep(0.50, "drop", 1, "1 x connection dropped before getuserphonenumber replies"),
        FaultStep(0.65, "revoke", 1, f"every access token of {appids[0]} revoked (40001 follows)"),
    ]
