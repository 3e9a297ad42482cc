"""Other agentic environments built on the consult machinery (see docs/environment.md)."""
