"""The AIPO application: the ``aipo`` command line and the one config loader.

The top layer: it imports the libraries below it (``tasks``, ``policies``,
``agents``, ``aipo_env``, ``trainers``) and nothing imports it.
"""
