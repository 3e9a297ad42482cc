"""Prompt templates of the collaborative agents (package data, read with importlib.resources)."""
