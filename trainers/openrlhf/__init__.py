"""OpenRLHF integration: the agent executor, AIPO's policy loss, the launcher and ``aipo serve``.

Nothing here imports openrlhf, ray or vllm at import time; each module does so
inside the functions that need it.
"""
