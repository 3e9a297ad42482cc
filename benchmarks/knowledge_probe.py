"""Can the policy use a fact it is handed? The question behind the efficacy benchmark's knowledge task.

The knowledge-bound task of ``benchmarks/efficacy.py`` needs a policy that, told "A
spider has 8 legs.", answers with it. This probe measures that with the warm-up's own
collection (:func:`trainers.warmup.collect_demonstrations`): ``--problems`` training
problems of ``rg:leg_counting``, four episodes each, two of which open with a consult
to the Knowledge oracle (the facts of the problem's animals) and two run as the policy
would alone. Per setting it reports the accuracy of each half with its 95% Wilson
interval and,
for the consult half, how often the answer is just one of the handed leg counts copied
back rather than their total.

Settings (``PROBES``), fixed before running:

* ``efficacy``: the efficacy benchmark's knowledge task (2 or 3 animals of one kind);
* ``two_kinds``: one animal each of two kinds, so the answer is a sum of two handed facts;
* ``two_kinds_one_digit``: the same, keeping the problems whose answer is at most 9, so
  the sum is of two one-digit numbers (the policy adds two one-digit terms alone about
  60% of the time: ``rg:chain_sum_easy`` in ``docs/ilr.md``).

    python benchmarks/knowledge_probe.py --no-progress

Writes ``<out>/knowledge_probe.{json,png}``; each setting's rollouts stay in its run
directory (a rerun reads them back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from aipo.config import load_config  # noqa: E402
from aipo_env.passk import wilson_interval  # noqa: E402
from benchmarks.arm_runs import add_set_argument  # noqa: E402
from tasks.procedural import ProceduralTask  # noqa: E402
from tasks.registry import register_task  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.metrics import save_figure  # noqa: E402

BASE_CONFIG = REPO / "configs" / "efficacy.yaml"
TWO_KINDS = {"min_animals": 2, "max_animals": 2, "min_instances": 1, "max_instances": 1}
#: name -> (reasoning-gym leg_counting options, the largest answer kept or None)
PROBES: dict[str, tuple[dict[str, int], int | None]] = {
    "efficacy": (
        {"min_animals": 1, "max_animals": 1, "min_instances": 2, "max_instances": 3},
        None,
    ),
    "two_kinds": (TWO_KINDS, None),
    "two_kinds_one_digit": (TWO_KINDS, 9),
}
_NUMBER = re.compile(r"\d+")


class _AnswersUpTo(ProceduralTask):
    """``rg:leg_counting`` keeping only the problems whose answer is at most ``max_answer``."""

    def __init__(self, max_answer: int, **kwargs: Any) -> None:
        super().__init__("leg_counting", **kwargs)
        self.max_answer = max_answer

    def load(self) -> list[Any]:
        return [p for p in super().load() if int(p.reference) <= self.max_answer]


def probe_config(name: str, args: argparse.Namespace) -> TrainConfig:
    options, max_answer = PROBES[name]
    task = "rg:leg_counting"
    if max_answer is not None:
        task = f"probe:leg_counting_max{max_answer}"
        register_task(
            task,
            lambda **kw: _AnswersUpTo(max_answer, name=task, **kw),
            description=f"rg:leg_counting with answers up to {max_answer}",
            source="reasoning-gym",
            overwrite=True,
        )
    overrides = [
        f"task.name={task}",
        f"task.kwargs={json.dumps({'size': 500, 'seed': 0, **options})}",
        f"run_dir={Path(args.run_root) / name}",
        "warmup.agent=knowledge",
        f"warmup.problems={args.problems}",
        "warmup.samples=4",
        "task.eval_size=1",
        *args.extra,
    ]
    return load_config(TrainConfig, BASE_CONFIG, overrides)


def _copied(task: Any, problem: Any, extracted: str | None) -> bool:
    """Whether ``extracted`` is one of the leg counts handed for ``problem`` (and not the answer)."""
    if extracted is None or extracted.strip() == problem.reference:
        return False
    handed = {int(n) for fact in task.facts(problem) for n in _NUMBER.findall(fact)}
    numbers = _NUMBER.findall(extracted)
    return bool(numbers) and int(numbers[-1]) in handed


async def _probe(config: TrainConfig, progress: bool) -> dict[str, Any]:
    from aipo_env.trajectory import read_jsonl
    from trainers.run_state import open_run
    from trainers.warmup import collect_demonstrations

    async with open_run(config, resume=True, progress=progress) as run:
        _, counts = await collect_demonstrations(run, resume=True)
        problems = {p.id: p for p in run.task.problems}
        episodes = read_jsonl(run.run_dir / "warmup" / "rollouts.jsonl")
        # The first half of each group opened with the consult (warm-up collection).
        opened = config.warmup.samples // 2
        consulted = [t for t in episodes if t.sample_index < opened]
        alone = [t for t in episodes if t.sample_index >= opened]
        out: dict[str, Any] = {"counts": counts, "problems": len(problems)}
        for key, group in (("with_facts", consulted), ("alone", alone)):
            correct = sum(bool(t.verifier and t.verifier.correct) for t in group)
            out[key] = {
                "episodes": len(group),
                "correct": correct,
                "rate": correct / len(group),
                "wilson95": wilson_interval(correct, len(group)),
            }
        copied = [
            _copied(run.task, problems[t.problem_id], t.verifier.extracted if t.verifier else None)
            for t in consulted
        ]
        out["with_facts"]["copied_a_fact"] = int(sum(copied))
        return out


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(results)
    for offset, key, label in ((-0.2, "with_facts", "facts handed"), (0.2, "alone", "alone")):
        cells = [results[n][key] for n in names]
        ax.bar(
            [i + offset for i in range(len(names))],
            [c["rate"] for c in cells],
            width=0.4,
            yerr=[
                [c["rate"] - c["wilson95"][0] for c in cells],
                [c["wilson95"][1] - c["rate"] for c in cells],
            ],
            capsize=4,
            label=label,
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("episodes correct (95% Wilson)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", type=int, default=48, help="training problems per setting")
    p.add_argument("--run-root", default=str(REPO / "runs" / "knowledge_probe"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-progress", action="store_true")
    add_set_argument(p, "extra config override, e.g. policy.model=<HF id> (repeatable)")
    args = p.parse_args(argv)
    results = {}
    for name in PROBES:
        results[name] = asyncio.run(_probe(probe_config(name, args), not args.no_progress))
        r = results[name]
        facts, alone = r["with_facts"], r["alone"]
        print(
            f"{name:20s} with facts {facts['correct']}/{facts['episodes']} correct "
            f"[{facts['wilson95'][0]:.3f}, {facts['wilson95'][1]:.3f}] "
            f"({facts['copied_a_fact']} answered a handed leg count), "
            f"alone {alone['correct']}/{alone['episodes']} "
            f"[{alone['wilson95'][0]:.3f}, {alone['wilson95'][1]:.3f}] "
            f"({r['problems']} problems in the set)",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/knowledge_probe.py", *(argv or sys.argv[1:])])
    record = {"command": command, "problems_per_setting": args.problems, "results": results}
    (out / "knowledge_probe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out / 'knowledge_probe.json'} and {plot(results, out / 'knowledge_probe.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
