"""The service with a leak planted on purpose, for ``python -m benchmarks.soak --leak``: one request
body in ten is kept for good, as a cache that never evicts would keep it. The soak's check must fail
on this service; a check that cannot fail proves nothing. Never served otherwise."""

from __future__ import annotations

import itertools

from serving.requests import Received
from serving.service import Classifier  # noqa: F401  what `bentoml serve benchmarks.soak_leak:Classifier` runs

KEPT: list[bytes] = []
_seen = itertools.count()
_of = Received.of.__func__


def _keeping(cls, scope, body: bytes, headers=None) -> Received:
    if next(_seen) % 10 == 0:
        KEPT.append(bytes(body))
    return _of(cls, scope, body, headers)


Received.of = classmethod(_keeping)
