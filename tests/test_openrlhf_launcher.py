"""The launcher's command, checked with OpenRLHF 0.11.2's own parser and validation."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from aipo.config import load_config
from trainers.openrlhf.config import OpenRLHFRecipe
from trainers.openrlhf.launcher import (
    EXECUTOR_CONFIG_ENV,
    build_command,
    flag_argv,
    run_openrlhf,
)
from trainers.openrlhf.loss import LOSS_CONFIG_ENV
from trainers.openrlhf.patch import SETUP_HOOK

pytest.importorskip("openrlhf", reason="openrlhf not installed")

from trainers.openrlhf.flags import OpenRLHFArgumentError, flag_names, parse_openrlhf_args  # noqa: E402

RECIPES = sorted(Path(__file__).parents[1].joinpath("configs", "openrlhf").glob("*.yaml"))


def _endpoints(tmp_path: Path) -> str:
    path = tmp_path / "endpoints.json"
    path.write_text(json.dumps({"agents": {"verify": {"backend": "sglang://10.0.0.3:30000"}}}))
    return str(path)


def load_recipe(path: Path | str, overrides: list[str] = ()) -> OpenRLHFRecipe:
    """A recipe as ``aipo train --engine openrlhf`` loads it."""
    return load_config(OpenRLHFRecipe, path, overrides)


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_dry_run_parses_with_openrlhf(recipe_path, tmp_path, capsys):
    overrides = [f"executor.endpoints_file={_endpoints(tmp_path)}"]
    assert run_openrlhf(load_recipe(recipe_path, overrides), dry_run=True) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[:3] == ["ray", "job", "submit"]
    split = argv.index("--")
    assert argv[split + 1 : split + 4] == ["python", "-m", "trainers.openrlhf.entry"]
    args = parse_openrlhf_args(argv[split + 4 :])
    recipe = load_recipe(recipe_path, overrides)
    assert args.train.agent_func_path == "trainers/openrlhf/executor.py"
    assert args.reward.remote_url == ["agent"]  # OpenRLHF routes rewards to the executor
    assert args.actor.model_name_or_path == recipe.openrlhf["actor.model_name_or_path"]
    assert args.algo.advantage.estimator == recipe.openrlhf["algo.advantage.estimator"]
    runtime = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime["worker_process_setup_hook"] == SETUP_HOOK
    assert (
        json.loads(runtime["env_vars"][LOSS_CONFIG_ENV])["agent_mode"]
        == recipe.agent_loss.agent_mode
    )
    executor = json.loads(runtime["env_vars"][EXECUTOR_CONFIG_ENV])
    assert executor["endpoints"]["agents"]["verify"]["backend"] == "sglang://10.0.0.3:30000"
    assert executor["task"] == recipe.executor.task


def test_every_recipe_flag_exists_in_openrlhf():
    known = flag_names()
    for path in RECIPES:
        recipe = load_recipe(path, ["executor.endpoints_file=null"])
        unknown = {f"--{k}" for k in recipe.openrlhf} - known
        assert not unknown, f"{path.name}: {sorted(unknown)}"


def test_parser_rejects_unknown_flag_and_failed_assertion():
    with pytest.raises(OpenRLHFArgumentError, match="--actor.learning_rate"):
        parse_openrlhf_args(["--actor.learning_rate", "1e-6"])
    with pytest.raises(OpenRLHFArgumentError, match="n_samples_per_prompt > 1"):
        parse_openrlhf_args(["--algo.advantage.estimator", "group_norm"])


def test_bad_recipe_flag_fails_the_dry_run(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("openrlhf:\n  actor.model_name_or_path: m\n  rollout.n_samples: 8\n")
    with pytest.raises(OpenRLHFArgumentError, match="rollout.n_samples"):
        run_openrlhf(load_recipe(recipe), dry_run=True)


def test_recipe_validation_names_the_bad_value(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('openrlhf_version: "0.10.3"\n')
    with pytest.raises(ValueError, match="0.10.3"):
        load_recipe(recipe)
    recipe.write_text("openrlhf:\n  train.agent_func_path: x.py\n")
    with pytest.raises(ValueError, match="set by the launcher"):
        load_recipe(recipe)
    with pytest.raises(FileNotFoundError, match="aipo serve"):
        build_command(load_recipe(RECIPES[0]).model_copy(update={}))  # endpoints file absent


def test_flag_argv_switches_lists_and_omissions():
    assert flag_argv({"a.b": True, "c": False, "d": None, "e": [0.2, 0.28], "f": 3}) == [
        "--a.b", "--e", "0.2", "0.28", "--f", "3",
    ]  # fmt: skip


def test_direct_driver_without_ray_submit_and_overrides(tmp_path):
    recipe = load_recipe(
        RECIPES[0],
        ["ray.submit=false", "ray.working_dir=null", "executor.endpoints_file=null",
         "openrlhf.actor.adam.lr=3e-7"],
    )  # fmt: skip
    command = build_command(recipe)
    assert command[:3] == ["python", "-m", "trainers.openrlhf.entry"]
    executor = Path(command[command.index("--train.agent_func_path") + 1])
    assert executor.is_absolute() and executor.name == "executor.py" and executor.is_file()
    assert parse_openrlhf_args(command[3:]).actor.adam.lr == pytest.approx(3e-7)


def test_dry_run_before_serving_prints_the_command_and_a_note(tmp_path, capsys):
    missing = str(tmp_path / "not-yet.json")
    overrides = [f"executor.endpoints_file={missing}"]
    assert run_openrlhf(load_recipe(RECIPES[0], overrides), dry_run=True) == 0
    out, err = capsys.readouterr()
    assert (
        "trainers.openrlhf.entry" in out and f"endpoints file {missing} does not exist yet" in err
    )
    # A real launch still refuses to start without the agents' endpoints.
    with pytest.raises(FileNotFoundError, match="start the agents with 'aipo serve' first"):
        build_command(load_recipe(RECIPES[0], overrides))
