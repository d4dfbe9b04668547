"""Helpers shared by the tests, not tests: test modules import these, never each other."""
