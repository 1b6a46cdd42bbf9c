"""Tests; a package so that `tests.services` and `tests.agent_fixtures` import by name."""
