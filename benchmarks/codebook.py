"""The fair efficacy experiment: does training on agents' replies teach a policy to reason alone?

Pre-registered in ``docs/efficacy.md`` ("The codebook experiment"); every setting below
and in ``configs/codebook.yaml`` was fixed there before any arm ran. The task
(``tasks/codebook.py``) puts its facts only in the Knowledge oracle's replies: "Decode:
nomi riro" is answered "nomi = 6. riro = 7. So the code is \\boxed{67}.", and each word's
digit is drawn from the seed.

Stages, each kept as soon as it finishes (a stopped run continues where it stopped):

1. **calibration**, once: the positive control on the calibration word set, with a
   checkpoint every 4 steps; the probe at each fixes the number of steps of every arm
   (the rule is in the docs). Never evaluated on the experiment's words.
2. **warm-up**, per seed: scripted demonstrations on the warm-up word set (each pair once
   solved alone, once with a consult to the Knowledge oracle and the code after its
   reply), fitted with the warm-up's own fit; shared by every arm of the seed. It
   teaches the format and the consult, not the RL words' facts.
3. **arms**, per seed: RL from that warm-up with the arm's overrides.

Every model (the warm-up's and each arm's final one) is measured **solo**, on the one
training prompt with consults never answered: pass@1 (mean of 16 samples at temperature
0.7) and pass@16 on the held-out questions of the RL words, the same on the floor words
(never trained), and the probe: the probability the policy gives a word's digit after
"word = " at the start of its solo answer, for the RL and the floor words.

    python benchmarks/codebook.py --no-progress          # everything (about 4 h on 2 cores)
    python benchmarks/codebook.py --report-only          # tables and plots of what finished
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from aipo.config import load_config  # noqa: E402
from aipo_env.passk import mean_ci  # noqa: E402
from benchmarks.arm_runs import add_set_argument, write_record  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402

BASE_CONFIG = REPO / "configs" / "codebook.yaml"
RESULTS = REPO / "benchmarks" / "results" / "codebook"
SAMPLES = 16  #: solo samples per question: pass@1 is their mean, pass@16 from all of them
TEMPERATURE = 0.7
CALIBRATION_STEPS = 24
CALIBRATION_EVERY = 4
#: The calibration's candidate step counts (checkpoints) and its rule's constants.
STEP_CHOICES = (8, 12, 16, 20, 24)
CALIBRATION_GAIN_FLOOR = 0.10  #: a probe gain below this: the control does not move
CALIBRATION_SHARE = 0.8  #: steps = first checkpoint with this share of the largest gain
#: Warm-up fit: the warm-up's own defaults (trainers/warmup.py).
WARM_EPOCHS, WARM_BATCH, WARM_LR = 3, 8, 1.0e-4
#: The warm-up's check: with every consult answered, at least this share of the calibration
#: words' questions must end with the right code, or the experiment stops before any arm.
CHECK_QUESTIONS, CHECK_MIN_ACCURACY = 32, 0.5
#: Warm-up questions (of the warm-up words' 90 pairs, drawn by the seed): each gives a solo
#: and a consulting demonstration. A fit costs about 12 s a batch of 8 on two cores.
WARM_PAIRS = 48


@dataclass(frozen=True)
class Arm:
    """One arm: its config overrides and a line for the report."""

    overrides: tuple[str, ...]
    about: str


NO_CONSULT = ("rollout.schedule.start_fraction=0.0", "rollout.schedule.end_fraction=0.0")
ARMS: dict[str, Arm] = {
    "grpo": Arm(NO_CONSULT + ("loss.agent_mode=mask",), "consults never answered"),
    "aipo_mask": Arm(("loss.agent_mode=mask",), "answered; agent tokens context only"),
    "aipo": Arm((), "answered; agent tokens through the default shaped coefficient"),
    "aipo_floor": Arm(
        ("loss.agent_w_min=0.5",), "answered; shaped with a floor of 0.5 (rare tokens keep half)"
    ),
    "control": Arm(
        ("loss.agent_mode=supervised", "loss.agent_positive_only=true"),
        "positive control: agent tokens at supervised strength, episodes with A > 0",
    ),
}
#: The comparisons the pre-registration names, each against aipo_mask.
BASELINE = "aipo_mask"


# -- configs ------------------------------------------------------------------------------


def base_config(overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, BASE_CONFIG, overrides)


def arm_config(
    arm: str, seed: int, model: Path, run_dir: Path, args: argparse.Namespace
) -> TrainConfig:
    return base_config(
        [
            f"run_dir={run_dir}",
            f"seed={seed}",
            f"policy.model={model}",
            f"task.kwargs.fact_seed={seed}",
            f"train.steps={args.steps}",
            *args.extra,
            *ARMS[arm].overrides,
        ]
    )


# -- evaluation: solo, on the training prompt ----------------------------------------------


def _task(words: str, split: str, fact_seed: int) -> Any:
    from tasks.codebook import CodebookTask

    return CodebookTask(words=words, split=split, fact_seed=fact_seed)  # type: ignore[arg-type]


async def _solo(
    model: Path, seed: int, sets: dict[str, Any], samples: int, progress: bool
) -> dict[str, Any]:
    """Solo pass@k and the probe of ``model`` on each named task of ``sets``."""
    from aipo_env.passk import pass_at_k
    from aipo_env.rollout import RolloutConfig, RolloutDriver
    from policies import make_generator

    config = base_config([f"seed={seed}"])
    generator = make_generator(str(model), seed=seed, max_context=config.policy.max_context)
    rollout = RolloutConfig(
        n_samples=samples,
        temperature=TEMPERATURE,
        max_new_tokens=config.env.max_new_tokens_per_turn,
        concurrency=64,
        seed=seed,
        schedule={"start_fraction": 0.0, "end_fraction": 0.0},
    )
    out: dict[str, Any] = {}
    try:
        for name, task in sets.items():
            driver = RolloutDriver(generator, task, None, config.env, rollout)
            trajectories = await driver.run([p.id for p in task.problems], show_progress=progress)
            correct: dict[str, list[bool]] = {}
            attempts = 0
            for t in trajectories:
                correct.setdefault(t.problem_id, []).append(bool(t.verifier and t.verifier.correct))
                attempts += t.consult_attempts > 0
            per_problem = {
                k: [pass_at_k(len(v), sum(v), k) for v in correct.values()] for k in (1, samples)
            }
            out[name] = {
                "samples": samples,
                "pass@1": sum(per_problem[1]) / len(per_problem[1]),
                "pass@k": sum(per_problem[samples]) / len(per_problem[samples]),
                "consult_attempt_rate": attempts / len(trajectories),
                "problems": len(correct),
                "correct": correct,
                "probe": await probe(model, task, config),
            }
    finally:
        await generator.aclose()
    return out


async def probe(model_dir: Path, task: Any, config: TrainConfig) -> dict[str, float]:
    """P(the word's digit | the solo prompt, then "word = "), for every word of ``task``.

    For each word, the first of ``task``'s questions that has it; the prompt is the env's
    own, and the answer is teacher-forced in the solution format up to the digit: "nomi = "
    for the first word, "nomi = 6. riro = " for the second (the first digit given right).
    Returns the mean probability of the right digit, its mean share among the ten digits,
    and the share of words whose most likely digit is right.
    """
    import torch

    from aipo_env.env import ConsultEnv
    from policies.loading import load_causal_lm, load_tokenizer

    # The trainer's float32 weights, not the generator's (possibly bfloat16) copy.
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype=torch.float32).eval()
    digits = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if any(len(d) != 1 for d in digits):
        raise ValueError("the probe needs single-token digits; this tokenizer splits them")
    digit_ids = [d[0] for d in digits]
    env = ConsultEnv(task, None, tokenizer, config.env)
    where: dict[str, tuple[Any, str]] = {}
    for problem in task.problems:
        first, second = problem.metadata["words"]
        where.setdefault(first, (problem, f"{first} = "))
        where.setdefault(second, (problem, f"{first} = {task.book[first]}. {second} = "))
    probs, shares, top = [], [], []
    for word, (problem, prefix) in sorted(where.items()):
        obs, _ = await env.areset(options={"problem_id": problem.id})
        ids = list(obs) + tokenizer.encode(prefix, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        p = torch.softmax(logits, dim=-1)[digit_ids]
        right = task.book[word]
        probs.append(float(p[right]))
        shares.append(float(p[right] / p.sum()))
        top.append(float(int(p.argmax()) == right))
    n = len(probs)
    return {"p": sum(probs) / n, "share": sum(shares) / n, "top1": sum(top) / n, "words": n}


def measure(model: Path, seed: int, samples: int, progress: bool) -> dict[str, Any]:
    """The solo figures of ``model``: held-out questions of the RL words, and as many
    questions of the floor words (the same pair split), facts drawn from ``seed``."""
    sets = {"held_out": _task("rl", "held_out", seed), "floor": _task("floor", "held_out", seed)}
    return asyncio.run(_solo(model, seed, sets, samples, progress))


# -- the format warm-up ----------------------------------------------------------------------


async def _scripted(config: TrainConfig, tokenizer: Any, task: Any) -> list[Any]:
    """Each problem of ``task`` solved alone, and with a consult then the code: their trajectories."""
    from agents.pool import AgentPool
    from aipo_env.env import ConsultEnv

    pool = AgentPool.from_config(
        config.agents,
        task=task,
        max_reply_tokens=config.env.max_reply_tokens,
        timeout_s=config.env.agent_timeout_s,
        seed=config.seed,
    )
    eos = tokenizer.eos_token_id

    def ids(text: str, end: bool) -> dict[str, Any]:
        body = tokenizer.encode(text, add_special_tokens=False)
        return {"token_ids": body + ([eos] if end else []), "finish_reason": "stop"}

    out = []
    try:
        for problem in task.problems:
            a, b = problem.metadata["words"]
            code = problem.reference
            for consult in (False, True):
                env = ConsultEnv(task, pool, tokenizer, config.env)
                await env.areset(options={"problem_id": problem.id, "allow_consult": True})
                if consult:
                    await env.astep(ids(f'<consult agent="knowledge">{a} {b}</consult>', False))
                    action = ids(f" So the code is \\boxed{{{code}}}.", True)
                else:
                    action = ids(problem.solution, True)
                *_, info = await env.astep(action)
                trajectory = info["trajectory"]
                if not (trajectory.verifier and trajectory.verifier.correct):
                    raise RuntimeError(
                        f"scripted demonstration of {problem.id} (consult={consult}) scored "
                        f"{trajectory.reward}: {trajectory.finish_reason}"
                    )
                if consult and trajectory.consults < 1:
                    raise RuntimeError(
                        f"the oracle did not answer the scripted consult of {problem.id}"
                    )
                out.append(trajectory)
    finally:
        await pool.aclose()
    return out


async def _consulted(model: Path, seed: int) -> dict[str, float]:
    """The warm-up's check: every consult answered by the oracle, on calibration words."""
    from agents.pool import AgentPool
    from aipo_env.rollout import RolloutConfig, RolloutDriver
    from policies import make_generator
    from tasks.codebook import CodebookTask

    config = base_config([f"seed={seed}"])
    task = CodebookTask(words="calibration", split="all", seed=seed, size=CHECK_QUESTIONS)
    generator = make_generator(str(model), seed=seed, max_context=config.policy.max_context)
    pool = AgentPool.from_config(
        config.agents,
        task=task,
        max_reply_tokens=config.env.max_reply_tokens,
        timeout_s=config.env.agent_timeout_s,
        seed=seed,
    )
    rollout = RolloutConfig(
        n_samples=1,
        temperature=TEMPERATURE,
        max_new_tokens=config.env.max_new_tokens_per_turn,
        seed=seed,
        schedule={"start_fraction": 1.0, "end_fraction": 1.0},
    )
    try:
        driver = RolloutDriver(generator, task, pool, config.env, rollout)
        done = await driver.run([p.id for p in task.problems])
    finally:
        await pool.aclose()
        await generator.aclose()
    n = len(done)
    return {
        "questions": n,
        "accuracy": sum(bool(t.verifier and t.verifier.correct) for t in done) / n,
        "consulted": sum(t.consults > 0 for t in done) / n,
    }


def warm(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seed ``seed``'s format warm-up (trained now, or read back): its record."""
    from aipo_env import sources
    from trainers.demonstrations import Demonstration, fit_demonstrations
    from trainers.run_state import load_policy

    root = Path(args.run_root) / f"seed{seed}" / "warm"
    record_path = Path(args.out) / "warm" / f"seed{seed}.json"
    if record_path.is_file() and (root / "model").is_dir():
        saved = json.loads(record_path.read_text())
        if saved.get("warm_pairs") == args.warm_pairs:
            return saved
    print(f"== seed {seed}: format warm-up", flush=True)
    started = time.perf_counter()
    config = base_config([f"seed={seed}"])
    model, tokenizer = load_policy(config.policy)
    from tasks.codebook import CodebookTask

    task = CodebookTask(
        words="warmup", split="all", fact_seed=seed, seed=seed, size=args.warm_pairs
    )
    trajectories = asyncio.run(_scripted(config, tokenizer, task))
    demos = [
        Demonstration(
            t.trajectory_id,
            list(t.token_ids),
            [int(s == sources.POLICY) for s in t.source],
            consulted=t.consult_attempts > 0,
            problem_id=t.problem_id,
            response_start=t.prompt_len,
        )
        for t in trajectories
    ]
    losses = fit_demonstrations(
        model,
        demos,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        epochs=WARM_EPOCHS,
        batch_size=WARM_BATCH,
        lr=WARM_LR,
        seed=seed,
    )
    tmp = root / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(root / "model", ignore_errors=True)
    tmp.replace(root / "model")
    record = {
        "seed": seed,
        "warm_pairs": args.warm_pairs,
        "model": str(root / "model"),
        "demonstrations": len(demos),
        "consulting": sum(d.consulted for d in demos),
        "trained_tokens": sum(d.trained_tokens for d in demos),
        "fit_losses": losses,
        "check": asyncio.run(_consulted(root / "model", seed)),
        "solo": measure(root / "model", seed, args.samples, not args.no_progress),
    }
    record["wall_s"] = time.perf_counter() - started
    write_record(record_path, record)
    return record


def check_warm(record: dict[str, Any]) -> None:
    """Stop before any arm when the warm-up did not teach the format (pre-registered)."""
    check = record["check"]
    if check["accuracy"] < CHECK_MIN_ACCURACY:
        raise SystemExit(
            f"seed {record['seed']}'s warm-up failed its check: with every consult answered it "
            f"solved {check['accuracy']:.2f} of {check['questions']} calibration questions "
            f"(needs {CHECK_MIN_ACCURACY}); no arm runs from it (docs/efficacy.md)"
        )


# -- calibration --------------------------------------------------------------------------


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """The positive control on the calibration words, and the steps its probe picks."""
    from trainers.embedded import EmbeddedTrainer

    path = Path(args.out) / "calibration.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = warm(0, args)
    check_warm(start)
    run_dir = Path(args.run_root) / "calibration"
    config = base_config(
        [
            f"run_dir={run_dir}",
            "seed=0",
            f"policy.model={start['model']}",
            "task.kwargs.words=calibration",
            "task.kwargs.split=all",
            f"train.steps={CALIBRATION_STEPS}",
            f"train.save_every={CALIBRATION_EVERY}",
            f"train.keep_last={CALIBRATION_STEPS // CALIBRATION_EVERY}",
            *args.extra,
            *ARMS["control"].overrides,
        ]
    )
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    print(
        f"== calibration: the control on the calibration words{' (resumed)' if resume else ''}",
        flush=True,
    )
    EmbeddedTrainer(config, resume=resume, progress=not args.no_progress).run()
    task = _task("calibration", "all", 0)
    probes = {0: _probe_only(Path(start["model"]), task)}
    for step in range(CALIBRATION_EVERY, CALIBRATION_STEPS + 1, CALIBRATION_EVERY):
        probes[step] = _probe_only(run_dir / "checkpoints" / f"step_{step:06d}", task)
    record = {"probe": probes, **choose_steps({s: p["p"] for s, p in probes.items()})}
    write_record(path, record)
    return record


def _probe_only(model: Path, task: Any) -> dict[str, float]:
    return asyncio.run(probe(model, task, base_config([])))


def choose_steps(probe_by_step: dict[int, float]) -> dict[str, Any]:
    """The pre-registered rule: the first checkpoint with 80% of the largest probe gain.

    A largest gain under 0.10 means the control does not move at this budget: every
    arm then runs the longest budget, and the docs read the run as likely inconclusive.
    """
    start = probe_by_step[0]
    gains = {s: p - start for s, p in probe_by_step.items() if s in STEP_CHOICES}
    best = max(gains.values())
    if best < CALIBRATION_GAIN_FLOOR:
        return {"steps": max(STEP_CHOICES), "moved": False, "largest_gain": best}
    steps = min(s for s, g in gains.items() if g >= CALIBRATION_SHARE * best)
    return {"steps": steps, "moved": True, "largest_gain": best}


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished arm's record must match to be reused."""
    return {
        "steps": args.steps,
        "samples": args.samples,
        "warm_pairs": args.warm_pairs,
        "extra": list(args.extra),
    }


def check_splits(seeds: list[int]) -> dict[str, Any]:
    """The experiment's sets, disjoint by content (refused otherwise), and their sizes.

    Training questions against held-out ones (by :meth:`Task.content_key`), and the word
    sets against each other: the warm-up, the RL, the floor and the calibration words.
    """
    from tasks.codebook import WORD_SETS
    from tasks.splits import measure_overlap

    train, held = _task("rl", "train", 0), _task("rl", "held_out", 0)
    overlap = measure_overlap(train.problems, held.problems, train.content_key)
    if overlap.count:
        raise RuntimeError(f"codebook held-out questions overlap training: {overlap.count}")
    names = list(WORD_SETS)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(WORD_SETS[a]) & set(WORD_SETS[b])
            if shared:
                raise RuntimeError(f"word sets {a} and {b} share {sorted(shared)}")
    held_words = {w for p in held.problems for w in p.metadata["words"]}
    train_words = {w for p in train.problems for w in p.metadata["words"]}
    return {
        "train_questions": len(train),
        "held_out_questions": len(held),
        "overlap": overlap.model_dump(),
        "held_out_words_met_in_training": len(held_words & train_words),
        "held_out_words": len(held_words),
        "floor_questions": len(_task("floor", "held_out", 0)),
        "word_sets": {k: list(v) for k, v in WORD_SETS.items()},
        "seeds": seeds,
    }


# -- arms ---------------------------------------------------------------------------------


def run_arm(
    arm: str, seed: int, warm_record: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Train one (arm, seed) from the seed's warm-up, or read its record back."""
    from trainers.embedded import EmbeddedTrainer
    from trainers.metrics import read_metrics

    path = Path(args.out) / "arms" / f"{arm}-seed{seed}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("budget") == budget(args):
            return saved
    run_dir = Path(args.run_root) / f"seed{seed}" / arm
    config = arm_config(arm, seed, Path(warm_record["model"]), run_dir, args)
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    print(f"== {arm} seed {seed}{' (resumed)' if resume else ''}", flush=True)
    started = time.perf_counter()
    summary = asdict(EmbeddedTrainer(config, resume=resume, progress=not args.no_progress).run())
    curve = [
        {k: m[k] for k in CURVE_KEYS if k in m} | {"step": m["step"]}
        for m in read_metrics(run_dir / "metrics.jsonl")
    ]
    record = {
        "arm": arm,
        "seed": seed,
        "budget": budget(args),
        "overrides": list(ARMS[arm].overrides),
        "train_wall_s": time.perf_counter() - started,
        "curve": curve,
        "solo": measure(Path(summary["checkpoint"]), seed, args.samples, not args.no_progress),
    }
    write_record(path, record)
    return record


CURVE_KEYS = (
    "reward_mean",
    "consult_rate",
    "consult_rate/solved",
    "consult_rate/unsolved",
    "update/loss/agent",
    "update/tokens/agent_trained",
)


# -- report -------------------------------------------------------------------------------

FIGURES = (
    ("held-out pass@1", ("held_out", "pass@1")),
    (f"held-out pass@{SAMPLES}", ("held_out", "pass@k")),
    ("probe P(digit), RL words", ("held_out", "probe", "p")),
    ("floor pass@1", ("floor", "pass@1")),
    ("probe P(digit), floor words", ("floor", "probe", "p")),
)


def _get(record: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = record["solo"]
    for key in path:
        value = value[key]
    return float(value)


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")


def report(
    runs: list[dict[str, Any]],
    warms: dict[int, dict[str, Any]],
    calibration: dict[str, Any] | None,
    out: Path,
) -> dict[str, Any]:
    """Per arm: each figure's mean ± 95% t over seeds; each arm minus aipo_mask, paired by seed."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    table: dict[str, Any] = {"arms": {}, "vs": {}, "start": {}}
    for name, path in FIGURES:
        table["start"][name] = dict(
            zip(("mean", "ci95"), mean_ci([_get(w, path) for w in warms.values()]), strict=True)
        )
    for arm in ARMS:
        if arm not in by_arm:
            continue
        seeds = sorted(by_arm[arm])
        table["arms"][arm] = {"seeds": seeds}
        for name, path in FIGURES:
            values = [_get(by_arm[arm][s], path) for s in seeds]
            table["arms"][arm][name] = dict(
                zip(("mean", "ci95"), mean_ci(values), strict=True), values=values
            )
        if arm != BASELINE and BASELINE in by_arm:
            shared = [s for s in seeds if s in by_arm[BASELINE]]
            table["vs"][arm] = {"seeds": shared}
            for name, path in FIGURES:
                diffs = [
                    _get(by_arm[arm][s], path) - _get(by_arm[BASELINE][s], path) for s in shared
                ]
                mean, half = mean_ci(diffs)
                table["vs"][arm][name] = {"mean": mean, "ci95": half, "diffs": diffs}
    lines = [
        "# The codebook experiment (pre-registered in docs/efficacy.md)",
        "",
        "Command: `python benchmarks/codebook.py --no-progress` (this report: `--report-only`).",
        "",
    ]
    if calibration is not None:
        lines += [
            "Calibration (positive control, calibration words): probe by step "
            + ", ".join(
                f"{s}: {p['p']:.3f}"
                for s, p in sorted(calibration["probe"].items(), key=lambda x: int(x[0]))
            )
            + f"; steps chosen {calibration['steps']} (moved: {calibration['moved']}).",
            "",
        ]
    lines += [
        "Solo (training prompt, consults never answered); mean ± 95% t-interval over seeds.",
        "",
    ]
    header = "| arm | seeds | " + " | ".join(n for n, _ in FIGURES) + " |"
    lines += [header, "|" + "---|" * (len(FIGURES) + 2)]
    start = table["start"]
    lines.append(
        f"| warm-up (start) | {','.join(map(str, sorted(warms)))} | "
        + " | ".join(_fmt(start[n]["mean"], start[n]["ci95"]) for n, _ in FIGURES)
        + " |"
    )
    for arm, cells in table["arms"].items():
        lines.append(
            f"| {arm} | {','.join(map(str, cells['seeds']))} | "
            + " | ".join(_fmt(cells[n]["mean"], cells[n]["ci95"]) for n, _ in FIGURES)
            + " |"
        )
    lines += ["", f"Each arm minus `{BASELINE}`, paired by seed (seed-level paired t, 95%):", ""]
    lines += [
        header.replace("| arm | seeds |", "| arm | seeds |"),
        "|" + "---|" * (len(FIGURES) + 2),
    ]
    for arm, cells in table["vs"].items():
        lines.append(
            f"| {arm} | {','.join(map(str, cells['seeds']))} | "
            + " | ".join(_fmt(cells[n]["mean"], cells[n]["ci95"]) for n, _ in FIGURES)
            + " |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "codebook.md").write_text("\n".join(lines) + "\n")
    write_record(out / "codebook.json", {"table": table, "calibration": calibration})
    plot(table, runs, out / "codebook.png")
    print("\n".join(lines), flush=True)
    return table


def plot(table: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    """Held-out pass@1 and probe per arm (seeds as dots), and consult rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    arms = list(table["arms"])
    for ax, name in zip(axes[:2], ("held-out pass@1", "probe P(digit), RL words"), strict=True):
        for i, arm in enumerate(arms):
            cell = table["arms"][arm][name]
            ax.scatter([i] * len(cell["values"]), cell["values"], color="grey", s=12)
            half = 0 if math.isnan(cell["ci95"]) else cell["ci95"]
            ax.errorbar([i], [cell["mean"]], yerr=[half], fmt="o", color="C0", capsize=4)
        start = table["start"][name]["mean"]
        ax.axhline(start, color="C3", ls="--", lw=1, label="warm-up (start)")
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        ax.set_title(name)
        ax.legend(fontsize=8)
    ax = axes[2]
    for i, arm in enumerate(arms):
        for r in (r for r in runs if r["arm"] == arm):
            points = [(p["step"], p.get("consult_rate")) for p in r["curve"]]
            ax.plot(
                *zip(*points, strict=True),
                color=f"C{i}",
                alpha=0.6,
                label=arm if r["seed"] == min(table["arms"][arm]["seeds"]) else None,
            )
    ax.set_title("consult rate (training episodes)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per arm; default: the calibration's (given: no calibration, a smoke run)",
    )
    p.add_argument("--samples", type=int, default=SAMPLES, help="solo samples per question")
    p.add_argument(
        "--warm-pairs", type=int, default=WARM_PAIRS, help="warm-up questions (smoke runs: fewer)"
    )
    p.add_argument("--run-root", default=str(REPO / "runs" / "codebook"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true", help="report what finished; train nothing")
    p.add_argument("--no-progress", action="store_true")
    add_set_argument(p, "extra override for every run (smoke tests only: changes the budget)")
    return p.parse_args(argv)


def _finished(
    out: Path,
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], dict[str, Any] | None]:
    runs = [json.loads(p.read_text()) for p in sorted((out / "arms").glob("*.json"))]
    warms = {
        json.loads(p.read_text())["seed"]: json.loads(p.read_text())
        for p in sorted((out / "warm").glob("*.json"))
    }
    cal = out / "calibration.json"
    return runs, warms, json.loads(cal.read_text()) if cal.is_file() else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
        write_record(out / "splits.json", check_splits(args.seeds))
        if args.steps is None:
            args.steps = calibrate(args)["steps"]
        print(f"== every arm trains {args.steps} steps", flush=True)
        for seed in args.seeds:  # seed by seed: a stopped run has whole seeds to report
            warm_record = warm(seed, args)
            check_warm(warm_record)
            for arm in args.arms:
                run_arm(arm, seed, warm_record, args)
    runs, warms, calibration = _finished(out)
    if runs:
        report(runs, warms, calibration, out)
    else:
        print("no finished arm yet", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
