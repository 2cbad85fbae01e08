"""Structured outputs through xgrammar: specs, compilation off the scheduler loop, matchers."""
