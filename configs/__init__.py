"""Experiment configs (YAML) and prompt templates, shipped as package data."""
