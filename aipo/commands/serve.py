"""``aipo serve --config configs/serve/X.yaml``: run the agents' SGLang servers until stopped.

Each server runs under the engine environment's interpreter (the config's ``python``),
not the one running ``aipo serve``; see :mod:`agents.serve`.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo serve``."""
    parser.add_argument(
        "--config",
        required=True,
        help="a serve config: a packaged name (single_node, per_agent) or a YAML path",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each server's command and the endpoints file it would write, start nothing",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. endpoints_file=runs/x.json servers.0.port=30001",
    )


def run(args: argparse.Namespace) -> int:
    """Start the servers, write the endpoints file, serve until SIGINT/SIGTERM; 1 on failure."""
    import json

    import configs
    from agents.serve import AgentServers, ServeConfig, ServeError, endpoints
    from aipo.config import ConfigError, load_config

    try:
        config = load_config(ServeConfig, configs.resolve(args.config, "serve"), args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"aipo serve: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    servers = AgentServers(config, stop_event=stop)
    if args.dry_run:
        for server, argv in zip(config.servers, servers.commands(), strict=True):
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in server.env.items())
            print(f"{env} {shlex.join(argv)}".strip())
        print(f"# endpoints file {config.endpoints_file}:")
        print(json.dumps(endpoints(config), indent=2, sort_keys=True))
        for problem in servers.engine_problems():
            print(f"note: {problem}; a real start refuses it", file=sys.stderr)
        return 0

    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            servers.start()
        except ServeError as exc:
            print(f"aipo serve: {exc}", file=sys.stderr)
            return 1
        print(
            f"aipo serve: {len(config.servers)} server(s) healthy; endpoints in "
            f"{config.endpoints_file}; Ctrl-C or SIGTERM stops them",
            flush=True,
        )
        return servers.wait()
    finally:
        servers.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
