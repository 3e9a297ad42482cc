"""benchmarks/knowledge_probe.py: its filtered task and what counts as a copied fact."""

from __future__ import annotations

from benchmark_script import load_script

from tasks.registry import make_task

probe = load_script("knowledge_probe")


def test_the_one_digit_setting_keeps_only_answers_up_to_9(tmp_path) -> None:
    args = probe.argparse.Namespace(
        run_root=str(tmp_path), problems=4, extra=["policy.max_batch_size=8"]
    )
    config = probe.probe_config("two_kinds_one_digit", args)
    task = make_task(config.task.name, **config.task.kwargs)
    answers = [int(p.reference) for p in task.problems]
    assert answers and max(answers) <= 9
    everything = make_task("rg:leg_counting", **config.task.kwargs).problems
    assert len(task.problems) < len(everything)  # the filter dropped some
    assert config.warmup.agent == "knowledge" and config.warmup.problems == 4
    assert config.policy.max_batch_size == 8


def test_a_handed_leg_count_given_back_is_a_copy_and_the_total_is_not() -> None:
    task = make_task("rg:leg_counting", **probe.TWO_KINDS, size=50, seed=0)

    def counts_of(p):
        return [int(n) for fact in task.facts(p) for n in probe._NUMBER.findall(fact)]

    problem = next(p for p in task.problems if len(counts_of(p)) == 2)  # no legless animal
    counts = counts_of(problem)
    wrong_count = next(c for c in counts if str(c) != problem.reference)
    assert probe._copied(task, problem, f"The answer is {wrong_count}")
    assert not probe._copied(task, problem, problem.reference)
    assert not probe._copied(task, problem, None)
    assert not probe._copied(task, problem, str(sum(counts) + 100))
