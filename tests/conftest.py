"""Shared fixtures: a private Redis per test (never one we did not start), and dtsbridge processes on it."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from tests.harness import DtsBridge
from tests.redis_fixture import redis_proc  # noqa: F401  (re-exported fixture)


@pytest.fixture
def services(tmp_path, redis_proc) -> Iterator[Callable[..., DtsBridge]]:  # noqa: F811
    """``make(settings, name=..., env=..., start=True, shared_from=...)`` -> a DtsBridge on the test's Redis.

    Every process made is killed (with its process group) when the test ends.
    """
    made: list[DtsBridge] = []

    def make(settings: dict | None = None, name: str = "svc", env: dict[str, str] | None = None,
             start: bool = True, shared_from: DtsBridge | None = None) -> DtsBridge:
        b = DtsBridge(tmp_path, redis_proc.url, settings=settings, name=name, shared_from=shared_from)
        b.extra_env.update(env or {})
        made.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in made:
        b.kill()
