"""Shared fixtures: a private Redis per test (never one we did not start)."""

from tests.redis_fixture import redis_proc  # noqa: F401  (re-exported fixture)
