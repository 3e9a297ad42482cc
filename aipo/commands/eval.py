"""``aipo eval``: judge a policy alone on benchmarks with pass@k, or compare two runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--k {text!r} must be comma-separated integers, e.g. 1,4,16"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k {text!r} must list integers >= 1")
    return ks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``aipo eval``."""
    parser.add_argument(
        "--model",
        default="default",
        help="HF id, local checkpoint dir, 'default' (embedded SmolLM2) or sglang://host:port[,...]",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer of an sglang:// model (the served model's path or HF id)"
    )
    parser.add_argument(
        "--tasks",
        help="comma-separated task names: math500, aime2024, aime2025, gpqa_diamond, "
        "livecodebench, gsm8k, rg:<reasoning-gym name>, ...",
    )
    parser.add_argument(
        "--task-arg",
        action="append",
        default=[],
        metavar="TASK.KEY=VALUE",
        help="a task factory argument, e.g. math500.path=data.jsonl (repeatable)",
    )
    parser.add_argument("--n", type=int, default=1, help="samples per problem (default 1)")
    parser.add_argument(
        "--k", type=_ks, help="pass@k values, e.g. 1,4,16 (default: 1,2,4,... up to n, and n)"
    )
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--max-context", type=int, help="prompt plus response cap (default: the model's)"
    )
    parser.add_argument(
        "--consult",
        choices=("off", "on"),
        default="off",
        help="off (default): independent mode, the policy alone; on: agents answer consults",
    )
    parser.add_argument(
        "--agents",
        help="YAML agent pool config (AgentPoolConfig) for --consult on (default: the three agents)",
    )
    parser.add_argument(
        "--protocol",
        default="consult",
        help="the interaction protocol (consult, python_tool, tools, ...); with --consult on, "
        "a protocol that declares tools is answered by them, any other by the agents",
    )
    parser.add_argument(
        "--tool",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the tools behind a tool protocol (tools.KEY, e.g. search_index=tiny); repeatable",
    )
    parser.add_argument("--limit", type=int, help="only the first LIMIT problems of each task")
    parser.add_argument("--concurrency", type=int, default=8, help="episodes in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="eval_out", help="output directory")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the samples in OUTPUT already"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--train-config",
        metavar="PATH_OR_RUN_DIR",
        help="a training config (YAML) or run directory (its config.yaml): check the problems "
        "against that run's training set by content, report the overlap, refuse one",
    )
    parser.add_argument(
        "--held-out-side",
        action="store_true",
        help="with --train-config: evaluate only the problems on the held-out side of the "
        "run's content partition (task.held_out: partition), what the run never trained on",
    )
    parser.add_argument(
        "--allow-overlap",
        action="store_true",
        help="with --train-config: evaluate even problems the run trained on (reported)",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print B minus A per task and metric with paired bootstrap CIs, then exit",
    )


def _fail(message: str) -> int:
    print(f"aipo eval: {message}", file=sys.stderr)
    return 2


def _compare(path_a: str, path_b: str, ks: list[int] | None, seed: int) -> int:
    from aipo_env.evaluation.results import load_results
    from aipo_env.passk import compare, format_comparison

    try:
        a, b = load_results(path_a), load_results(path_b)
        diffs = compare(a, b, ks=ks, seed=seed)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"A = {path_a}\nB = {path_b}")
    print(format_comparison(diffs))
    return 0


def _training_run(path: str) -> tuple[Any, str]:
    """The ``TrainConfig`` of ``--train-config`` (a YAML file, or a run directory's config.yaml) and its file."""
    from aipo.config import load_config
    from trainers.config import TrainConfig

    file = Path(path)
    if file.is_dir():
        file = file / "config.yaml"
    if not file.is_file():
        raise FileNotFoundError(
            f"--train-config {path!r}: {str(file)!r} does not exist (give a training config "
            "YAML or a run directory that holds config.yaml)"
        )
    return load_config(TrainConfig, file), str(file)


def _training_task(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The run's training task and the EvalConfig fields that say how it is used; (None, {}) without --train-config."""
    if not args.train_config:
        if args.held_out_side or args.allow_overlap:
            raise ValueError("--held-out-side and --allow-overlap need --train-config")
        return None, {}
    from trainers.held_out import make_train_task

    config, file = _training_run(args.train_config)
    fields: dict[str, Any] = {"train_config": file, "allow_overlap": args.allow_overlap}
    if args.held_out_side:
        if config.task.held_out != "partition":
            raise ValueError(
                f"--held-out-side: {file} holds out another task (task.held_out: task, "
                f"{config.task.eval_name or config.task.name}); evaluate that task instead"
            )
        fields["held_out_fraction"] = config.task.held_out_fraction
    task = make_train_task(config.task)
    try:
        task.problems  # noqa: B018 - loaded here, so a missing dataset fails as bad input
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        task.close()
        raise ValueError(
            f"--train-config: the run's training task {config.task.name}: {exc}"
        ) from None
    return task, fields


def run(args: argparse.Namespace) -> int:
    """Run ``aipo eval``; 0 on success, 2 on bad input (message on stderr)."""
    if args.compare:
        return _compare(args.compare[0], args.compare[1], args.k, args.seed)
    if not args.tasks:
        return _fail("--tasks is required (e.g. --tasks math500,gsm8k)")
    from pydantic import ValidationError

    from agents.config import AgentPoolConfig
    from aipo.config import ConfigError, load_config
    from aipo_env.evaluation.runner import EvalConfig, EvalInputError, evaluate, parse_task_args
    from aipo_env.jsonl import JsonlError

    agents = None
    if args.agents:
        try:
            agents = load_config(AgentPoolConfig, args.agents)
        except FileNotFoundError:
            return _fail(f"agents config '{args.agents}' does not exist")
        except ConfigError as exc:
            return _fail(f"agents config '{args.agents}' is invalid: {exc}")
    try:
        training, held_out = _training_task(args)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except (ConfigError, ValueError) as exc:
        return _fail(f"--train-config: {exc}" if isinstance(exc, ConfigError) else str(exc))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [item for item in args.tool if "=" not in item]
    if bad:
        return _fail(
            f"--tool {bad[0]!r}: expected KEY=VALUE (a field of tools:, e.g. search_index=tiny)"
        )
    try:
        config = EvalConfig(
            model=args.model,
            tokenizer=args.tokenizer,
            tasks=tasks,
            task_args=parse_task_args(args.task_arg, tasks),
            n=args.n,
            ks=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            max_context=args.max_context,
            consult=args.consult == "on",
            agents=args.agents,
            protocol=args.protocol,
            tools=dict(item.split("=", 1) for item in args.tool),
            limit=args.limit,
            concurrency=args.concurrency,
            seed=args.seed,
            **held_out,
        )
        config.resolved_ks()
        results = asyncio.run(
            evaluate(
                config,
                args.output,
                agents=agents,
                training=training,
                resume=args.resume,
                progress=not args.no_progress,
            )
        )
    except (EvalInputError, JsonlError) as exc:  # JsonlError: a damaged file under --resume
        return _fail(str(exc))
    except ValidationError as exc:
        errors = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        return _fail(errors)
    finally:
        if training is not None:
            training.close()
    from aipo_env.evaluation.results import to_markdown

    print(to_markdown(results), end="")
    print(f"results in {args.output}/ (results.json, results.md, passk.png, trajectories.jsonl)")
    return 0
