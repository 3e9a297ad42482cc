"""Running an evaluation: n samples per problem through :class:`~aipo_env.env.ConsultEnv`.

By default the environment runs in *independent* mode (``EnvConfig.mode`` in
``aipo_env/config.py``; ``docs/evaluation.md``): the prompt has no consult instructions,
consult tags are not honoured, and the fraction of episodes that still write one is
reported. Every finished episode is appended to ``trajectories.jsonl`` at once; its id
``<task>/<problem id>/<sample index>`` is deterministic, so ``resume`` skips the samples
already written and an interrupted run ends with the same sample set, without duplicates.

:func:`evaluate` is ``aipo eval``: many tasks, n samples, pass@k reports.
:func:`evaluate_alone` is the trainer's held-out check: one greedy sample per problem
of one task, in independent mode, resumable from its JSONL file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.tool_services import ToolsConfig, check_tool_services, make_tool_set
from aipo_env.evaluation.results import (
    SampleRecord,
    TrajectoryRef,
    build_results,
    plot_passk,
    task_summary,
    to_markdown,
    write_json,
)
from aipo_env.passk import check_ks, default_ks
from aipo_env.protocols import PROTOCOLS
from configs.registry import check_registered

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

TRAJECTORIES_FILE = "trajectories.jsonl"
CONFIG_FILE = "eval_config.json"
#: Config fields that must match for --resume to continue a run (others may change).
RESUME_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "max_new_tokens",
    "max_context",
    "consult",
    "protocol",
    "seed",
    "held_out_fraction",
)


class EvalInputError(ValueError):
    """Bad user input (unknown task, unreachable dataset, k > n, ...): exit 2, no traceback."""


class EvalConfig(BaseModel):
    """One evaluation run."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="default",
        description="HF id, local checkpoint dir, 'default' or 'sglang://host:port[,...]'.",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer for sglang:// models (the served model's path or id)."
    )
    tasks: list[str] = Field(description="Registered task names (rg:<name> for reasoning-gym).")
    task_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per task: keyword arguments of its factory (path=...)."
    )
    n: int = Field(default=1, ge=1, description="Samples per problem.")
    ks: list[int] | None = Field(
        default=None, description="k values of pass@k; None: 1, 2, 4, ... up to n, and n."
    )
    temperature: float = Field(default=0.6, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=1024, ge=1, description="Most tokens per response.")
    max_context: int | None = Field(
        default=None, description="Prompt plus response cap; None: the model's context."
    )
    consult: bool = Field(
        default=False, description="False: independent mode; True: agents answer consults."
    )
    agents: str | None = Field(
        default=None, description="YAML of an AgentPoolConfig (consult on); None: default agents."
    )
    protocol: str = Field(
        default="consult",
        description=(
            f"The interaction protocol (aipo_env/protocols): one of {', '.join(PROTOCOLS)}. "
            "With consult on, a protocol that declares tools is answered by them (tools), "
            "any other by the agents; off, its requests are counted, not answered."
        ),
    )
    tools: ToolsConfig = Field(
        default_factory=ToolsConfig,
        description="The tools behind a protocol that tools answer (agents/tool_services.py).",
    )
    limit: int | None = Field(default=None, ge=1, description="First problems per task only.")
    concurrency: int = Field(default=8, ge=1, description="Episodes in flight at once.")
    seed: int = Field(default=0, description="Base seed; each sample's seed derives from its id.")
    n_boot: int = Field(default=1000, ge=1, description="Bootstrap resamples for the CIs.")
    train_config: str | None = Field(
        default=None,
        description="The training run (config or run directory) whose training set the problems are checked against; None: not checked.",
    )
    held_out_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Keep only each task's problems on the held-out side of a content partition at this fraction (a run's task.held_out_fraction); None: every problem.",
    )
    allow_overlap: bool = Field(
        default=False,
        description="Evaluate even when problems occur in the training set of train_config (refused otherwise).",
    )

    @model_validator(mode="after")
    def _protocol_is_served(self) -> EvalConfig:
        check_registered(self.protocol, PROTOCOLS, "protocol")
        tools = PROTOCOLS[self.protocol].tools
        if self.consult and tools:  # a tool without its service fails before any model loads
            check_tool_services(self.tools, tools, self.protocol)
        return self

    def resolved_ks(self) -> list[int]:
        """The k values to report, checked against n."""
        ks = sorted(set(self.ks)) if self.ks else default_ks(self.n)
        try:
            check_ks(self.n, ks)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from None
        return ks


def parse_task_args(items: list[str], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """``["math500.path=x.jsonl", ...]`` to ``{"math500": {"path": "x.jsonl"}}``.

    Values are read as JSON when they parse (numbers, lists, objects), else as text.
    The task part is split at the last dot before ``=`` that leaves a known task name,
    so dotted names keep working.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, raw = item.partition("=")
        task, dot, key = head.rpartition(".")
        if not sep or not dot or not task or not key:
            raise EvalInputError(
                f"--task-arg {item!r} is malformed; expected TASK.KEY=VALUE, e.g. math500.path=data.jsonl"
            )
        if task not in tasks:
            raise EvalInputError(
                f"--task-arg {item!r} names task '{task}', which is not in --tasks ({', '.join(tasks)})"
            )
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(task, {})[key] = value
    return out


def trajectory_id(task: str, problem_id: str, sample_index: int) -> str:
    """The deterministic id of one sample, which resuming relies on."""
    return f"{task}/{problem_id}/{sample_index}"


def load_tasks(config: EvalConfig) -> dict[str, Any]:
    """Make and load every task (its held-out side only, with ``held_out_fraction``), turning user errors into :class:`EvalInputError`."""
    from tasks.registry import make_task
    from tasks.sources import DatasetUnavailable
    from tasks.splits import SplitTask

    tasks: dict[str, Any] = {}
    for name in config.tasks:
        try:
            task = make_task(name, **config.task_args.get(name, {}))
        except KeyError as exc:
            raise EvalInputError(exc.args[0]) from None
        except (TypeError, ValueError) as exc:
            raise EvalInputError(f"task '{name}': {exc}") from None
        if config.held_out_fraction is not None:
            task = SplitTask(task, "held_out", config.held_out_fraction)
        try:
            problems = task.problems
        except DatasetUnavailable as exc:
            raise EvalInputError(
                f"task '{name}': {exc} (pass it with --task-arg {name}.path=FILE)"
            ) from None
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise EvalInputError(f"task '{name}': {exc}") from None
        if not problems:
            raise EvalInputError(f"task '{name}' has no problems")
        tasks[name] = task
    return tasks


def check_overlap(
    config: EvalConfig, tasks: Mapping[str, Any], training: Any
) -> dict[str, dict[str, Any]]:
    """Each task's evaluated problems measured against ``training`` (a run's training task), by content key.

    Returns each task's :class:`~tasks.splits.Overlap` as a dict (with ``train_config``).

    Raises:
        EvalInputError: a task's problems occur in training and ``allow_overlap`` is off
            (the count, the task, two examples and what to do).
    """
    from tasks.splits import measure_overlap

    train_problems = training.problems
    found: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        problems = task.problems[: config.limit] if config.limit else task.problems
        overlap = measure_overlap(
            train_problems, problems, task.content_key, train_key_fn=training.content_key
        )
        found[name] = {**overlap.model_dump(), "train_config": config.train_config}
        if overlap.count and not config.allow_overlap:
            examples = "; ".join(repr(e) for e in overlap.examples[:2])
            raise EvalInputError(
                f"task '{name}': {overlap.describe()} problems to evaluate occur in the training "
                f"set of {config.train_config}, e.g. {examples}; evaluate the run's held-out side "
                "(--held-out-side) or other problems, or pass --allow-overlap to proceed knowingly"
            )
    return found


def check_tokenizer(model: str) -> None:
    """Refuse a local checkpoint directory that has no tokenizer files, naming it."""
    path = Path(model)
    if not path.is_dir():
        return
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / name).is_file() for name in names):
        raise EvalInputError(
            f"checkpoint '{model}' has no tokenizer (none of {', '.join(names)}); "
            "save the tokenizer next to the weights (tokenizer.save_pretrained(dir))"
        )


def make_policy_generator(config: EvalConfig) -> Any:
    """The policy's generator for ``config.model`` (through ``policies.make_generator``)."""
    from policies import make_generator, sglang_hosts

    try:
        hosts = sglang_hosts(config.model)
    except ValueError as exc:
        raise EvalInputError(str(exc)) from None
    if hosts is not None:
        if not config.tokenizer:
            logger.warning(
                "no --tokenizer for %s: assuming the servers run the default model", config.model
            )
        try:
            return make_generator(config.model, tokenizer=config.tokenizer)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from None
    check_tokenizer(config.model)
    options: dict[str, Any] = {"seed": config.seed}
    if config.max_context is not None:
        options["max_context"] = config.max_context
    try:
        return make_generator(config.model, **options)
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"cannot load model '{config.model}': {exc}") from None


def _check_resume(output: Path, config: EvalConfig, resume: bool) -> None:
    path = output / CONFIG_FILE
    traj = output / TRAJECTORIES_FILE
    if not resume:
        if traj.exists() and traj.stat().st_size > 0:
            raise EvalInputError(
                f"'{output}' already holds {TRAJECTORIES_FILE}; pass --resume to continue that "
                "run or choose another --output"
            )
        return
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [f for f in RESUME_FIELDS if previous.get(f) != getattr(config, f)]
        if changed:
            detail = ", ".join(
                f"{f}: {previous.get(f)!r} -> {getattr(config, f)!r}" for f in changed
            )
            raise EvalInputError(
                f"--resume would mix samples made with other settings ({detail}); "
                "use the same settings or another --output"
            )


def _existing_trajectories(path: Path) -> list[Any]:
    """What an interrupted run wrote (a torn last line is skipped here and dropped by the writer)."""
    from aipo_env.trajectory import read_jsonl

    return read_jsonl(path) if path.exists() else []


def _sample_record(t: Any) -> SampleRecord:
    verifier = t.verifier
    return SampleRecord(
        problem_id=t.problem_id,
        sample_index=t.sample_index,
        reward=t.reward,
        correct=bool(verifier.correct) if verifier is not None else t.reward > 0,
        response_tokens=len(t.token_ids) - t.prompt_len,
        finish_reason=t.finish_reason,
        consult_attempts=t.consult_attempts,
        extracted=verifier.extracted if verifier is not None else None,
        trajectory=TrajectoryRef(path=TRAJECTORIES_FILE, id=t.trajectory_id),
    )


async def evaluate(
    config: EvalConfig,
    output: str | Path,
    *,
    generator: Any | None = None,
    agents: Any | None = None,
    training: Any | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the evaluation, write results.json/.md, passk.png and trajectories.jsonl; return the results.

    ``generator`` overrides the one ``config.model`` names (tests, a shared engine).
    ``agents`` is the ``AgentPoolConfig`` of ``config.agents``, loaded by the caller
    (``aipo eval`` reads the file with the application's config loader); None with
    ``config.agents`` unset: the three default agents. ``training``: the training task
    of ``config.train_config``, built by the caller; every task's problems are measured
    against it (:func:`check_overlap`) before the model loads, and the overlap is
    written into each task's results.
    Raises :class:`EvalInputError` on bad input before any sampling starts.
    """
    config.resolved_ks()  # bad k values fail before anything is written
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _check_resume(output, config, resume)
    tasks = load_tasks(config)
    try:
        overlaps = check_overlap(config, tasks, training) if training is not None else {}
    except EvalInputError:
        for task in tasks.values():
            task.close()
        raise
    traj_path = output / TRAJECTORIES_FILE
    done = {t.trajectory_id: t for t in (_existing_trajectories(traj_path) if resume else [])}
    (output / CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    jobs, wanted = _plan(config, tasks, done)
    try:
        await _sample(config, tasks, jobs, wanted, done, traj_path, generator, agents, progress)
    finally:
        for task in tasks.values():
            task.close()
    return _write_results(config, tasks, wanted, done, overlaps, output)


def _plan(
    config: EvalConfig, tasks: Mapping[str, Any], done: Mapping[str, Any]
) -> tuple[list[tuple[str, Any, int, str]], dict[str, list[str]]]:
    """The episodes to run (those not ``done``) and every task's trajectory ids, in order."""
    jobs: list[tuple[str, Any, int, str]] = []
    wanted: dict[str, list[str]] = {}
    for name, task in tasks.items():
        problems = task.problems[: config.limit] if config.limit else task.problems
        for problem in problems:
            for i in range(config.n):
                tid = trajectory_id(name, problem.id, i)
                wanted.setdefault(name, []).append(tid)
                if tid not in done:
                    jobs.append((name, problem, i, tid))
    return jobs, wanted


async def _sample(
    config: EvalConfig,
    tasks: Mapping[str, Any],
    jobs: list[tuple[str, Any, int, str]],
    wanted: Mapping[str, list[str]],
    done: dict[str, Any],
    traj_path: Path,
    generator: Any | None,
    agents: Any | None,
    progress: bool,
) -> None:
    """Run ``jobs`` (one episode each), appending to ``traj_path`` and ``done``; closes what it opens."""
    from aipo_env.config import EnvConfig
    from aipo_env.rollout import RolloutConfig, RolloutDriver
    from aipo_env.trajectory import TrajectoryWriter

    own_generator = generator is None
    if own_generator:
        generator = make_policy_generator(config)
    pools: dict[str, Any] = {}
    services: dict[str, Any] = {}
    try:
        max_total = min(config.max_context or generator.max_context, generator.max_context)
        env_config = EnvConfig(
            protocol=config.protocol,
            mode="train" if config.consult else "independent",
            max_new_tokens_per_turn=config.max_new_tokens,
            max_total_tokens=max_total,
            max_turns=8 if config.consult else 1,
        )
        tools = PROTOCOLS[config.protocol].tools
        if config.consult and tools:
            tool_set = make_tool_set(config.tools, tools, config.protocol)
            services = dict.fromkeys(tasks, tool_set)
            env_config = env_config.model_copy(update={"agent_names": list(tools)})
        elif config.consult:
            pools = _make_pools(config, agents, tasks, generator, env_config)
            services = dict(pools)
            env_config = env_config.model_copy(
                update={"agent_names": list(next(iter(pools.values())).names)}
            )
        rollout = RolloutConfig(
            n_samples=config.n,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            concurrency=config.concurrency,
            seed=config.seed,
        )
        # One driver per task (its task and agents); episodes of all tasks share one
        # semaphore so --concurrency bounds the whole run.
        drivers = {
            name: RolloutDriver(generator, task, services.get(name), env_config, rollout)
            for name, task in tasks.items()
        }
        semaphore = asyncio.Semaphore(config.concurrency)
        total = sum(len(v) for v in wanted.values())
        bar = _progress(total, total - len(jobs), progress)

        async def one(writer: Any, name: str, problem: Any, i: int, tid: str) -> None:
            async with semaphore:
                options = {
                    "problem_id": problem.id,
                    "trajectory_id": tid,
                    "group_id": f"{name}/{problem.id}",
                    "sample_index": i,
                    "allow_consult": config.consult,
                }
                trajectory = await drivers[name].run_episode(options)
                writer.write(trajectory)
                done[tid] = trajectory
                bar.update(1)

        with TrajectoryWriter(traj_path, append=True) as writer:
            await asyncio.gather(*(one(writer, *job) for job in jobs))
        bar.close()
    finally:
        for pool in pools.values():
            await pool.aclose()
        if own_generator:
            await generator.aclose()


def _write_results(
    config: EvalConfig,
    tasks: Mapping[str, Any],
    wanted: Mapping[str, list[str]],
    done: Mapping[str, Any],
    overlaps: Mapping[str, Any],
    output: Path,
) -> dict[str, Any]:
    """Each task's pass@k summary from its trajectories, written as results.json/.md and passk.png."""
    ks = config.resolved_ks()
    summaries = {}
    for name, task in tasks.items():
        records = [_sample_record(done[tid]) for tid in wanted.get(name, [])]
        references = {p.id: p.reference for p in task.problems}
        summaries[name] = task_summary(
            records,
            ks,
            references=references,
            n=config.n,
            n_boot=config.n_boot,
            seed=config.seed,
            skipped_rows=task.skipped,
            overlap=overlaps.get(name),
        )
    results = build_results(config.model_dump(), summaries, ks)
    write_json(results, output / "results.json")
    (output / "results.md").write_text(to_markdown(results))
    plot_passk(results, output / "passk.png")
    return results


def _make_pools(
    config: EvalConfig,
    agents: Any | None,
    tasks: Mapping[str, Any],
    generator: Any,
    env_config: Any,
) -> dict[str, Any]:
    """One agent pool per task (oracle agents need the task); the env's reply cap and deadline.

    Replies are seeded from ``config.seed`` and each request, like the policy's samples,
    so ``--resume`` completes a run with the replies an uninterrupted one would have got.
    """
    from agents.pool import AgentPool, AgentPoolConfig

    if agents is None and config.agents:
        raise EvalInputError(
            f"agents config '{config.agents}' was not loaded; pass its AgentPoolConfig as agents="
        )
    pool_config = agents if agents is not None else AgentPoolConfig()
    return {
        name: AgentPool.from_config(
            pool_config,
            policy_generator=generator,
            task=task,
            max_reply_tokens=env_config.max_reply_tokens,
            timeout_s=env_config.agent_timeout_s,
            seed=config.seed,
        )
        for name, task in tasks.items()
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="eval", unit="sample", dynamic_ncols=True)
