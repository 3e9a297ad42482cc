"""ILR on one machine: two or more peer policies trained together through Idea3 episodes.

Each peer is a whole embedded run of its own (:func:`trainers.run_state.open_run` in
``<run_dir>/peers/<name>``): model, optimizer, scheduler, generator, metrics and
checkpoints; no agent pool or rollout driver, since the episodes are played here. One step:

1. **interaction modes**: with ``peers.interaction: dynamic``, each peer's ability is
   re-measured every ``peers.ability_every`` steps (greedy accuracy alone on a validation
   split held out from training like the evaluation set,
   :func:`trainers.held_out.validation_task`;
   :func:`aipo_env.interaction_mode.ability_from_accuracy`), each question's
   difficulty comes from the solve rates seen so far
   (:class:`~aipo_env.interaction_mode.DifficultyTracker`), and each peer cooperates
   where ``P(q, i) < 0.5``, else competes;
2. **rollout**: every problem of the step is played ``rollout.n_samples`` times through
   Idea3 (:func:`aipo_env.peer_episode.run_idea3`), all episodes concurrently, each peer
   on its own generator; each peer's trajectories of a problem form its GRPO group;
3. **rewards**: with ``peers.calibration``, each problem's rewards are calibrated
   across the peers (:func:`trainers.peer_rewards.perception_calibration`);
4. **update**: each peer by its own update (:func:`trainers.embedded.update_policy`) on
   its own trajectories, then its weights are published to its generator;
5. **log and save**: each peer's metrics and checkpoint in its own folder; the shared
   state (difficulty counts, abilities, step) in ``<run_dir>/peer_state.json``, written
   after every peer's checkpoint. That file commits a step: ``--resume`` restarts every
   peer at the step it records, from each peer's checkpoint of that step, even when a
   run was killed after some peers had saved a later one (each peer keeps at least two
   checkpoints, so the committed one is still there).

Held-out accuracy alone is measured for each peer before and after (``eval/`` of its folder).

SIGINT or SIGTERM (:class:`trainers.stopping.StopRequest`) cancels the rollout, the
ability measurement or an evaluation in progress; updates already started run to their
end. Every peer is then checkpointed at the last completed step, with the shared state,
so ``--resume`` goes on from there, and :class:`~trainers.stopping.TrainingInterrupted`
says what is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aipo_env.evaluation.alone import evaluate_alone
from aipo_env.interaction_mode import (
    DifficultyTracker,
    Mode,
    ability_from_accuracy,
    interaction_mode,
)
from aipo_env.peer_episode import Peer, PeerEpisodeConfig, run_idea3
from aipo_env.trajectory import Trajectory, read_jsonl, write_jsonl
from tasks.base import Task
from tasks.splits import Overlap
from trainers.config import TrainConfig, write_config
from trainers.embedded import (
    evaluate,
    log_and_save,
    problem_order,
    publish,
    save_if_pending,
    shaped_advantages,
    update_metrics,
    update_policy,
)
from trainers.held_out import validation_task
from trainers.peer_config import STATE, PeerSection
from trainers.peer_rewards import perception_calibration
from trainers.run_state import RunDirError, RunState, check_run_dir, open_run
from trainers.stopping import StopRequest, TrainingInterrupted
from trainers.summary import EvalResult
from trainers.weights import generation_paused

__all__ = ["PeerSummary", "PeerTrainer", "peer_config"]


def peer_config(config: TrainConfig, index: int) -> TrainConfig:
    """The embedded run of peer ``index``: its folder, model and seed; no consulting."""
    section = config.peers
    assert section is not None
    name = section.names[index]
    update: dict[str, Any] = {
        "run_dir": str(Path(config.run_dir) / "peers" / name),
        "seed": section.seeds[index] if section.seeds else config.seed + index,
        "peers": None,
        # A peer's newer checkpoint is not committed until every peer has saved that step
        # (peer_state.json); the last committed one must survive it.
        "train": config.train.model_copy(update={"keep_last": max(config.train.keep_last, 2)}),
    }
    if section.models:
        update["policy"] = config.policy.model_copy(update={"model": section.models[index]})
    return config.model_copy(update=update)


class PeerTrainer:
    """Trains ``config.peers`` together (module docstring). Build it, call :meth:`run`."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool = True) -> None:
        if config.peers is None:
            raise ValueError("PeerTrainer needs a config with a peers: section")
        self.config = config
        self.section: PeerSection = config.peers
        self.resume = resume
        self.progress = progress
        self.tracker = DifficultyTracker(prior_weight=self.section.difficulty_prior)
        self.abilities: dict[str, float] = {}
        self.ability_history: list[dict[str, Any]] = []
        self._validation: Task | None = None

    def run(self) -> PeerSummary:
        """Train to ``train.steps``; returns (and writes) the summary of every peer."""
        return PeerSummary(asyncio.run(self.arun()))

    async def arun(self) -> dict[str, Any]:
        cfg = self.config
        started = time.perf_counter()
        run_dir = Path(cfg.run_dir)
        # The peers' own folders are checked by open_run; this one holds only shared files.
        check_run_dir(run_dir, self.resume)
        write_config(cfg, run_dir / "config.yaml")
        committed = self._committed(run_dir)
        stop = StopRequest()
        stop.install()
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.section.interaction == "dynamic":
                    # Built and checked against training before any peer's model loads.
                    self._validation = validation_task(
                        cfg.task,
                        overrides=self.section.validation_kwargs,
                        size=self.section.validation_size,
                    )
                    stack.callback(self._validation.close)
                runs: dict[str, RunState] = {}
                for i, name in enumerate(self.section.names):
                    sub = peer_config(cfg, i)
                    runs[name] = await stack.enter_async_context(
                        open_run(
                            sub,
                            resume=self.resume,
                            progress=self.progress,
                            resume_at=0 if committed is None else committed["step"],
                            rollouts=False,  # the Idea3 episodes are played here
                        )
                    )
                before, after = await self._train(run_dir, runs, stop, committed)
                checkpoints = {n: str(r.checkpoint or r.saved_path) for n, r in runs.items()}
                overlaps = {n: r.overlap for n, r in runs.items()}
        finally:
            stop.uninstall()
        summary = {
            "steps": cfg.train.steps,
            "wall_s": time.perf_counter() - started,
            "peers": {
                name: {
                    "eval_before": _eval_dict(before[name]),
                    "eval_after": _eval_dict(after[name]),
                    "checkpoint": checkpoints[name],
                    "ability": self.abilities.get(name),
                    "held_out": _overlap_dict(overlaps[name]),
                }
                for name in self.section.names
            },
            "abilities": self.ability_history,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    async def _train(
        self,
        run_dir: Path,
        runs: Mapping[str, RunState],
        stop: StopRequest,
        committed: dict[str, Any] | None,
    ) -> tuple[dict[str, EvalResult | None], dict[str, EvalResult | None]]:
        """Every step from the restored one, between each peer's evaluations alone."""
        start = self._restore(run_dir, runs, committed)
        before: dict[str, EvalResult | None] = {}
        after: dict[str, EvalResult | None] = {}
        for name, run in runs.items():
            before[name] = await stop.abandonable(evaluate(run, "before", reuse=True))
        done = start
        for step in range(start, self.config.train.steps):
            if stop.requested or not await self._step(runs, step, stop):
                break
            done = step + 1
            self._save_state(run_dir, done)
        for name, run in runs.items():
            after[name] = await stop.abandonable(evaluate(run, "after"))
        if stop.requested:
            raise self._interrupted(run_dir, runs, stop, done)
        return before, after

    def _interrupted(
        self, run_dir: Path, runs: Mapping[str, RunState], stop: StopRequest, done: int
    ) -> TrainingInterrupted:
        """Checkpoint every peer at step ``done`` (with the shared state); say what is saved."""
        assert stop.signal is not None
        saved = {name: save_if_pending(run) for name, run in runs.items()}
        if done:
            self._save_state(run_dir, done, force=True)
            lines = [
                f"peer {name}: step {done} checkpointed {'now ' if saved[name] else ''}"
                f"in {run.saved_path}"
                for name, run in runs.items()
            ]
            lines.append(f"shared state of step {done}: {run_dir / STATE}; --resume goes on")
        else:
            lines = ["no step had completed: no checkpoint was saved"]
        return TrainingInterrupted(
            f"stopped by {stop.signal.name} after step {done} of {self.config.train.steps}."
            + "".join(f"\n  {line}" for line in lines),
            stopped_by=stop.signal,
            completed_step=done,
            checkpoint=run_dir if done else None,
        )

    # -- state --------------------------------------------------------------------------

    def _committed(self, run_dir: Path) -> dict[str, Any] | None:
        """The shared state of the last committed step, on resume (``None``: start afresh)."""
        path = run_dir / STATE
        if not (self.resume and path.is_file()):
            return None
        try:
            saved = json.loads(path.read_text())
            saved["step"] = int(saved["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RunDirError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
        return saved

    def _restore(
        self, run_dir: Path, runs: Mapping[str, RunState], saved: dict[str, Any] | None
    ) -> int:
        """The step every peer resumes at; the shared state read back (0 for a fresh run)."""
        steps = {name: run.start_step for name, run in runs.items()}
        done = 0 if saved is None else saved["step"]
        if any(s != done for s in steps.values()):
            raise RunDirError(
                f"{run_dir / STATE} commits step {done} but the peers' checkpoints at or before "
                f"it are at steps {steps}: a peer's checkpoint of step {done} is missing "
                "(removed by hand?); restore it, or start afresh"
            )
        if saved is not None:
            self.tracker.load_state_dict(saved["difficulty"])
            self.abilities = dict(saved["abilities"])
            self.ability_history = list(saved["ability_history"])
        return done

    def _save_state(self, run_dir: Path, done: int, *, force: bool = False) -> None:
        """After every peer's checkpoint of step ``done``: the shared state, atomically."""
        cfg = self.config
        if not (
            force
            or done == cfg.train.steps
            or (cfg.train.save_every and done % cfg.train.save_every == 0)
        ):
            return
        state = {
            "step": done,
            "difficulty": self.tracker.state_dict(),
            "abilities": self.abilities,
            "ability_history": self.ability_history,
        }
        tmp = run_dir / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(run_dir / STATE)

    # -- one step -----------------------------------------------------------------------

    async def _abilities(self, runs: Mapping[str, RunState], step: int) -> None:
        """Each peer's greedy accuracy alone on the validation split, as an ability."""
        task = self._validation
        assert task is not None, "arun builds the validation task"
        n = len(task)
        # Set only once every peer is measured: a cancelled measurement changes nothing.
        record: dict[str, Any] = {"step": step}
        abilities: dict[str, float] = {}
        for name, run in runs.items():
            done = await evaluate_alone(
                run.generator,
                task,
                problems=range(n),
                output=run.run_dir / "validation" / f"step{step}.jsonl",
                env_config=run.config.env,
                max_new_tokens=run.config.rollout.max_new_tokens,
                concurrency=run.config.rollout.concurrency,
            )
            accuracy = sum(bool(t.verifier and t.verifier.correct) for t in done) / max(n, 1)
            abilities[name] = ability_from_accuracy(accuracy)
            record[name] = {"accuracy": accuracy, "ability": abilities[name]}
        self.abilities.update(abilities)
        self.ability_history.append(record)

    def _modes(self, problem_id: str) -> dict[str, Mode]:
        fixed = self.section.interaction
        if fixed != "dynamic":
            return {name: fixed for name in self.section.names}
        difficulty = self.tracker.difficulty(problem_id)
        return {
            name: interaction_mode(self.abilities[name], difficulty) for name in self.section.names
        }

    async def _rollout(
        self, runs: Mapping[str, RunState], step: int
    ) -> dict[str, list[Trajectory]]:
        """Every Idea3 episode of the step; each peer's trajectories, read back when already written."""
        cfg = self.config
        first = next(iter(runs.values()))
        outputs = {n: r.run_dir / "rollouts" / f"step_{step:06d}.jsonl" for n, r in runs.items()}
        # Written only once the whole step's episodes are in: all there, or none.
        if all(p.is_file() for p in outputs.values()):
            stored = {n: read_jsonl(p) for n, p in outputs.items()}
            expected = cfg.train.prompts_per_step * cfg.rollout.n_samples
            if all(len(ts) == expected for ts in stored.values()):
                return stored
        problems = problem_order(step, cfg.train.prompts_per_step, len(first.task), cfg.seed)
        peers = [Peer(name, run.generator) for name, run in runs.items()]
        episode = PeerEpisodeConfig(
            max_new_tokens_per_stage=self.section.max_new_tokens_per_stage,
            max_total_tokens=cfg.env.max_total_tokens,
            temperature=cfg.rollout.temperature,
            system_prompt=cfg.env.system_prompt,
        )
        versions = {name: step for name in runs}
        semaphore = asyncio.Semaphore(cfg.rollout.concurrency)

        async def one(position: int, index: int, sample: int) -> dict[str, Trajectory]:
            problem = first.task.problems[index]
            stem = f"s{step}-g{position}-{index}"
            async with semaphore:
                return await run_idea3(
                    index,
                    first.task,
                    peers,
                    self._modes(problem.id),
                    trajectory_ids={n: f"{stem}-n{sample}-{n}" for n in runs},
                    group_ids={n: f"{stem}-{n}" for n in runs},
                    sample_index=sample,
                    config=episode,
                    mask_rule=first.mask_rule,
                    seed=cfg.seed * 1_000_003 + step * 10_007 + position * 101 + sample,
                    policy_versions=versions,
                )

        jobs = [
            one(position, index, sample)
            for position, index in enumerate(problems)
            for sample in range(cfg.rollout.n_samples)
        ]
        episodes = await asyncio.gather(*jobs)
        out: dict[str, list[Trajectory]] = {name: [] for name in runs}
        for played in episodes:
            for name, t in played.items():
                out[name].append(t)
        return out

    def _write(
        self, runs: Mapping[str, RunState], step: int, out: Mapping[str, list[Trajectory]]
    ) -> None:
        """Each peer's trajectories of the step (rewards as trained) in its rollouts folder."""
        for name, run in runs.items():
            path = run.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
            tmp = path.with_suffix(".tmp")
            write_jsonl(tmp, out[name])  # a new file, whatever a killed step left there
            tmp.replace(path)

    def _rewards(self, trajectories: Mapping[str, list[Trajectory]]) -> None:
        """Record each problem's outcomes; calibrate the rewards across peers when asked."""
        by_problem: dict[str, dict[str, list[Trajectory]]] = {}
        for name, ts in trajectories.items():
            for t in ts:
                by_problem.setdefault(t.problem_id, {}).setdefault(name, []).append(t)
        for problem_id, per_peer in by_problem.items():
            self.tracker.record(
                problem_id,
                [bool(t.verifier and t.verifier.correct) for ts in per_peer.values() for t in ts],
            )
            if not self.section.calibration:
                continue
            for ts in per_peer.values():
                for t in ts:  # read back on resume: calibrate the raw reward again
                    t.metadata.setdefault("raw_reward", t.reward)
            calibrated = perception_calibration(
                {name: [t.metadata["raw_reward"] for t in ts] for name, ts in per_peer.items()}
            )
            for name, ts in per_peer.items():
                for t, value in zip(ts, calibrated[name], strict=True):
                    t.reward = value

    async def _step(self, runs: Mapping[str, RunState], step: int, stop: StopRequest) -> bool:
        """One step; False when a stop signal cancelled it before any update (nothing changed)."""
        if self.section.interaction == "dynamic" and (
            step % self.section.ability_every == 0 or not self.abilities
        ):
            await stop.abandonable(self._abilities(runs, step))
            if stop.requested:
                return False
        t0 = time.perf_counter()
        trajectories = await stop.abandonable(self._rollout(runs, step))
        if trajectories is None:
            return False
        rollout_s = time.perf_counter() - t0
        self._rewards(trajectories)
        self._write(runs, step, trajectories)
        for name, run in runs.items():
            ts = trajectories[name]
            metrics = _peer_metrics(ts)
            metrics["rollout_s"] = rollout_s
            if name in self.abilities:
                metrics["ability"] = self.abilities[name]
            advantages, keep, shaping = shaped_advantages(ts, run.config)
            metrics.update(shaping)
            t1 = time.perf_counter()
            async with generation_paused(run.generator):
                stats = update_policy(run, ts, advantages, keep, step)
                await publish(run, step + 1, stats)
            metrics["update_s"] = time.perf_counter() - t1
            metrics.update(update_metrics(run, stats))
            log_and_save(run, step + 1, metrics)
        return True


class PeerSummary(dict):
    """The summary of a peer run (``summary.json``), with a text rendering."""

    def render(self) -> str:
        lines = [f"ILR run: {self['steps']} steps in {self['wall_s']:.0f} s"]
        for name, peer in self["peers"].items():
            before = (peer["eval_before"] or {}).get("accuracy")
            after = (peer["eval_after"] or {}).get("accuracy")
            held = "" if before is None else f"held-out alone {before:.3f} -> {after:.3f}; "
            overlap = peer.get("held_out") or {}
            if held and overlap.get("count"):
                held += (
                    f"[held-out overlaps training: {overlap['count']} of {overlap['held_out']}]; "
                )
            lines.append(f"  peer {name}: {held}checkpoint {peer['checkpoint']}")
        lines.append("Evaluate a peer alone with: aipo eval --model <its checkpoint>")
        return "\n".join(lines)


def _peer_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """One peer's step: accuracy, rewards, cooperation rate, stage failures, endings."""
    n = max(len(trajectories), 1)
    stages = [
        s
        for t in trajectories
        for s in t.metadata.get("stages", [])
        if s.get("peer") == t.metadata.get("peer")
    ]
    return {
        "accuracy": sum(bool(t.verifier and t.verifier.correct) for t in trajectories) / n,
        "reward_mean": sum(t.reward for t in trajectories) / n,
        "raw_reward_mean": sum(t.metadata.get("raw_reward", t.reward) for t in trajectories) / n,
        "cooperate_rate": sum(t.metadata.get("interaction") == "cooperate" for t in trajectories)
        / n,
        "stage_failure_rate": sum(s["status"] != "ok" for s in stages) / max(len(stages), 1),
        "error_rate": sum(t.finish_reason.startswith("error:") for t in trajectories) / n,
        "context_overflow_rate": sum(t.finish_reason == "context_overflow" for t in trajectories)
        / n,
        "response_tokens_mean": sum(t.policy_token_count() for t in trajectories) / n,
    }


def _eval_dict(result: EvalResult | None) -> dict[str, Any] | None:
    return None if result is None else dict(result.__dict__)


def _overlap_dict(overlap: Overlap | None) -> dict[str, Any] | None:
    return None if overlap is None else overlap.model_dump()
