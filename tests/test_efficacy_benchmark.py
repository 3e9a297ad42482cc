"""benchmarks/efficacy.py: arms that differ only where they should, paired figures, resumable records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_script import load_script

from agents.oracle import check_oracle_task
from aipo_env.passk import pass_at_k

bench = load_script("efficacy")


def args(tmp_path: Path, *extra: str):
    return bench.parse_args(["--out", str(tmp_path / "out"), "--steps", "4", *extra])


def _flatten(data, prefix=""):
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("task", sorted(bench.TASKS))
def test_the_arms_differ_only_in_consulting_the_loss_and_the_warm_model(tmp_path, task) -> None:
    a = args(tmp_path)
    for variant in ("consult", "alone"):
        (tmp_path / "warm" / variant).mkdir(parents=True)
    configs = {
        arm: _flatten(
            bench.run_config(
                task, arm, 2, a, tmp_path / "run", str(tmp_path / "warm" / bench.ARMS[arm].warm)
            ).model_dump(mode="json")
        )
        for arm in bench.ARMS
    }
    allowed = {
        "rollout.schedule.start_fraction",
        "rollout.schedule.end_fraction",
        "rollout.schedule.decay",
        "env.max_consults",
        "loss.agent_mode",
        "policy.model",
    }
    reference = configs["aipo"]
    # Mask mode leaves the defaults of the fields that act on trained agent tokens out of a dump.
    agent_only = {"loss.agent_positive_only", "loss.agent_normalization"}
    for arm, config in configs.items():
        assert set(reference) - set(config) <= agent_only, arm
        differing = {k for k in reference if k in config and config[k] != reference[k]}
        assert differing <= allowed, (arm, differing - allowed)
    assert configs["grpo"]["env.max_consults"] == 0
    assert configs["grpo"]["policy.model"] == str(tmp_path / "warm" / "alone")
    assert {configs[a]["loss.agent_mode"] for a in bench.ARMS} == {"mask", "shaped", "ratio"}
    # The shared budget: the same seed, steps, eval points and held-out problems everywhere.
    assert reference["seed"] == 2 and reference["train.steps"] == 4
    assert reference["train.eval_every"] == 2 and reference["task.eval_size"] == 64
    assert reference["warmup.enabled"] is False


@pytest.mark.parametrize("task", sorted(bench.TASKS))
def test_each_tasks_oracle_agents_have_what_they_draw_on(tmp_path, task) -> None:
    config = bench.warm_config(task, "consult", args(tmp_path), tmp_path / "warm")
    check_oracle_task(config.agents, config.task.name, config.task.kwargs)  # raises if not
    assert config.warmup.consults is True
    assert bench.warm_config(task, "alone", args(tmp_path), tmp_path / "w").warmup.consults is False
    assert config.warmup.agent in config.env.agent_names


def _run(task, arm, seed, correct, greedy_after=0.5, curve=()):
    ks = (1, 2, 4)
    metrics = {
        f"pass@{k}": sum(pass_at_k(len(c), sum(c), k) for c in correct.values()) / len(correct)
        for k in ks
    }
    return {
        "task": task,
        "arm": arm,
        "seed": seed,
        "summary": {
            "steps": 2,
            "eval_before": {"accuracy": 0.25},
            "eval_after": {"accuracy": greedy_after},
        },
        "curve": list(curve),
        "passk": {"metrics": metrics, "correct": correct},
    }


def test_aggregate_gives_seed_intervals_and_compares_arms_seed_by_seed(tmp_path) -> None:
    a = args(tmp_path, "--passk-samples", "4")
    grpo = [
        _run("reasoning", "grpo", 0, {"p0": [True, False, False, False], "p1": [False] * 4}, 0.25),
        _run("reasoning", "grpo", 1, {"p0": [False] * 4, "p1": [False] * 4}, 0.0),
    ]
    aipo = [
        _run(
            "reasoning",
            "aipo",
            0,
            {"p0": [True] * 4, "p1": [True, False, False, False]},
            0.75,
            [{"step": 1, "consult_rate": 0.5}, {"step": 2, "consult_rate": 0.25}],
        ),
        _run("reasoning", "aipo", 1, {"p0": [False] * 4, "p1": [True, True, False, False]}, 0.5),
    ]
    table = bench.aggregate(grpo + aipo, {}, a)["reasoning"]
    row = table["arms"]["aipo"]
    assert row["greedy_after"]["mean"] == pytest.approx(0.625)
    assert row["greedy_after"]["ci95"] == pytest.approx(12.706 * 0.125)  # t(1) x sd/sqrt(2)
    assert row["consult_rate"]["values"][0] == pytest.approx(0.375)  # mean over the steps
    # pass@1 per (seed, problem): grpo 0.25, 0 | 0, 0; aipo 1, 0.25 | 0, 0.5.
    paired = table["vs"]["grpo"]["aipo"]["pass@1"]
    assert paired["a"] == pytest.approx(0.0625) and paired["b"] == pytest.approx(0.4375)
    # Per seed: 0.625 - 0.125 and 0.25 - 0; the t-interval is over those two differences.
    assert paired["per_seed"] == pytest.approx({"0": 0.5, "1": 0.25})
    half = 12.706 * 0.125  # t(1) x sd(0.5, 0.25) / sqrt(2)
    assert paired["seed_t"]["mean"] == pytest.approx(0.375) == paired["diff"]
    assert paired["seed_t"]["ci_low"] == pytest.approx(0.375 - half)
    assert paired["seed_t"]["seeds"] == 2 and paired["two_stage_bootstrap"]["seeds"] == 2
    assert paired["pairs_bootstrap"]["problems"] == 4  # the secondary figure, kept
    assert paired["pairs_bootstrap"]["diff"] == pytest.approx(0.375)
    # pass@4 of aipo seed 1, p1: 2 of 4 correct, so pass@4 is 1.
    assert table["vs"]["grpo"]["aipo"]["pass@4"]["b"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    markdown = bench.render_markdown({"reasoning": table}, "cmd", a)
    assert "| aipo | 0,1 | 0.250 ± 0.000 | 0.625 ± 1.588 |" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith("- aipo, pass@1: "))
    assert line.startswith("- aipo, pass@1: +0.375 [-1.213, +1.963] (t over 2 seeds; per seed")
    assert "; two-stage bootstrap [" in line
    assert "; pairs bootstrap, treats problems as independent: [" in line
    assert line.endswith("over 4 pairs")


def test_the_report_says_the_warm_up_is_not_replicated(tmp_path) -> None:
    a = args(tmp_path, "--passk-samples", "4")
    runs = [
        _run("reasoning", arm, seed, {"p0": [seed == 1] * 4, "p1": [False] * 4})
        for arm in ("grpo", "aipo")
        for seed in (0, 1)
    ]
    markdown = bench.render_markdown(bench.aggregate(runs, {}, a), "cmd", a)
    assert (
        "The warm-up is not replicated (one warm-up serves all seeds): intervals cover RL "
        "seeds only." in markdown
    )
    assert "as a secondary figure, the pairs bootstrap, treats problems as independent" in markdown


def test_the_arms_that_train_agent_tokens_are_also_paired_against_the_masked_arm(tmp_path) -> None:
    a = args(tmp_path, "--passk-samples", "4")
    runs = [
        _run("reasoning", "grpo", 0, {"p0": [False] * 4, "p1": [False] * 4}),
        _run("reasoning", "aipo_mask", 0, {"p0": [True] * 4, "p1": [False] * 4}),
        _run("reasoning", "aipo", 0, {"p0": [True] * 4, "p1": [True, True, False, False]}),
        # Seed 1 has no masked run to pair with: it is left out of that comparison only.
        _run("reasoning", "grpo", 1, {"p0": [False] * 4, "p1": [False] * 4}),
        _run("reasoning", "aipo", 1, {"p0": [True] * 4, "p1": [True] * 4}),
    ]
    table = bench.aggregate(runs, {}, a)["reasoning"]
    assert set(table["vs"]) == {"grpo", "aipo_mask"}
    assert set(table["vs"]["grpo"]) == {"aipo_mask", "aipo"}
    assert set(table["vs"]["aipo_mask"]) == {"aipo"}  # never the masked arm against itself
    against_mask = table["vs"]["aipo_mask"]["aipo"]["pass@1"]
    assert against_mask["pairs_bootstrap"]["problems"] == 2  # seed 0's two problems
    assert against_mask["a"] == pytest.approx(0.5) and against_mask["b"] == pytest.approx(0.75)
    assert against_mask["seed_t"]["seeds"] == 1
    assert table["vs"]["grpo"]["aipo"]["pass@1"]["pairs_bootstrap"]["problems"] == 4
    markdown = bench.render_markdown({"reasoning": table}, "cmd", a)
    assert "Against `aipo_mask`" in markdown
    # One shared seed: the difference, but no interval (never a zero-width one).
    after_mask = markdown.split("Against `aipo_mask`")[1]
    assert "- aipo, pass@1: +0.250, no interval (1 seed" in after_mask


def test_a_finished_run_with_the_same_budget_is_read_back(tmp_path, monkeypatch) -> None:
    a = args(tmp_path)
    saved = tmp_path / "out" / "arms" / "reasoning-aipo-seed0.json"
    saved.parent.mkdir(parents=True)
    record = {"task": "reasoning", "arm": "aipo", "seed": 0, "budget": bench.budget(a)}
    saved.write_text(json.dumps(record))

    class Refuse:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("trainers.embedded.EmbeddedTrainer", Refuse)
    assert bench.run_arm("reasoning", "aipo", 0, str(tmp_path), a) == record
    other = args(tmp_path, "--prompts", "3")  # another budget: trained again
    with pytest.raises(AssertionError, match="trained again"):
        bench.run_arm("reasoning", "aipo", 0, str(tmp_path), other)


def test_unknown_task_or_arm_is_refused_with_the_choices(capsys) -> None:
    assert bench.main(["--arms", "aipo,ppo", "--report-only"]) == 2
    assert "ppo" in capsys.readouterr().err


def test_a_task_whose_warm_up_fails_is_recorded_and_skipped(tmp_path, monkeypatch, capsys) -> None:
    from trainers.warmup import WarmupError

    calls = []

    def warm(task, variant, args):
        if task == "knowledge":
            raise WarmupError("the warm-up kept 3 demonstrations, fewer than 32")
        return {"model": f"/warm/{task}-{variant}"}

    monkeypatch.setattr(bench, "warm", warm)
    monkeypatch.setattr(
        bench, "run_arm", lambda task, arm, seed, model, a: calls.append((task, arm, model))
    )
    argv = ["--out", str(tmp_path / "out"), "--seeds", "0", "--arms", "grpo,aipo"]
    assert bench.main(argv) == 0
    assert calls == [
        ("reasoning", "grpo", "/warm/reasoning-alone"),
        ("reasoning", "aipo", "/warm/reasoning-consult"),
    ]
    report = (tmp_path / "out" / "efficacy.md").read_text()
    assert "knowledge: `rg:leg_counting`: no runs, the warm-up failed" in report
    assert "kept 3 demonstrations" in report
    # A later invocation does not try the failed warm-up again.
    monkeypatch.setattr(
        bench,
        "warm",
        lambda *a: (
            (_ for _ in ()).throw(AssertionError("again"))
            if a[0] == "knowledge"
            else {"model": "/m"}
        ),
    )
    calls.clear()
    assert bench.main(argv) == 0
    assert {c[0] for c in calls} == {"reasoning"}
