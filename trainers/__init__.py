"""Trainers: advantages, the AIPO policy loss, and the machinery of the embedded trainer.

Kept light on purpose: importing ``trainers`` does not import torch; import the
submodules (``trainers.update``, ``trainers.checkpoint``, ...) for their contents.
"""
