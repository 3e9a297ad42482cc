"""The launcher's command, checked with OpenRLHF 0.11.2's own parser and validation."""

from __future__ import annotations

import ast
import json
import os
import shlex
from pathlib import Path

import pytest

from aipo.config import ConfigError, load_config
from trainers.openrlhf import entry
from trainers.openrlhf.config import HOOK_MARKER_ENV, RUNTIME_ENV_ENV, OpenRLHFRecipe
from trainers.openrlhf.launcher import (
    EXECUTOR_CONFIG_ENV,
    build_command,
    flag_argv,
    run_openrlhf,
)
from trainers.openrlhf.loss import LOSS_CONFIG_ENV
from trainers.openrlhf.patch import SETUP_HOOK

pytest.importorskip("openrlhf", reason="openrlhf not installed")

from trainers.openrlhf.flags import (  # noqa: E402
    DATA_MAX_LEN_DEFAULT,
    OPENRLHF_RAY_ENV_DEFAULTS,
    OUTPUT_FLAG_DEFAULTS,
    OpenRLHFArgumentError,
    _parser,
    _train_ppo_ray_source,
    flag_names,
    parse_openrlhf_args,
)

RECIPES = sorted(Path(__file__).parents[1].joinpath("configs", "openrlhf").glob("*.yaml"))
#: The recipes the tests below use by name (RECIPES also holds the tool-protocol ones).
DAPO, GRPO = (
    Path(__file__).parents[1] / "configs" / "openrlhf" / f
    for f in ("dapo_1node.yaml", "grpo_1node.yaml")
)


#: The executor file the installed package holds.
EXECUTOR = (Path(__file__).parents[1] / "trainers" / "openrlhf" / "executor.py").resolve()


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
    # Nothing uploaded by default: the installed executor, by its absolute path.
    assert args.train.agent_func_path == str(EXECUTOR)
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
    recipe.write_text("executor:\n  task: math\n")  # not registered: every worker would fail
    with pytest.raises(ValueError, match="executor.task: .*math"):
        load_recipe(recipe)
    with pytest.raises(FileNotFoundError, match="aipo serve"):
        build_command(load_recipe(DAPO).model_copy(update={}))  # endpoints file absent


def test_flag_argv_switches_lists_and_omissions():
    assert flag_argv({"a.b": True, "c": False, "d": None, "e": [0.2, 0.28], "f": 3}) == [
        "--a.b", "--e", "0.2", "0.28", "--f", "3",
    ]  # fmt: skip


def test_direct_driver_without_ray_submit_and_overrides(tmp_path):
    recipe = load_recipe(
        DAPO,
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
    assert run_openrlhf(load_recipe(DAPO, overrides), dry_run=True) == 0
    out, err = capsys.readouterr()
    assert (
        "trainers.openrlhf.entry" in out and f"endpoints file {missing} does not exist yet" in err
    )
    # A real launch still refuses to start without the agents' endpoints.
    with pytest.raises(FileNotFoundError, match="start the agents with 'aipo serve' first"):
        build_command(load_recipe(DAPO, overrides))


# -- paths: resolved against the launch directory ------------------------------------------


def _dry_run_args(recipe: OpenRLHFRecipe, launch_dir: Path, capsys):
    assert run_openrlhf(recipe, dry_run=True, launch_dir=launch_dir) == 0
    argv = shlex.split(capsys.readouterr().out)
    return parse_openrlhf_args(argv[argv.index("trainers.openrlhf.entry") + 1 :])


def test_relative_outputs_and_data_are_absolute_against_the_launch_directory(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "deepmath_train.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    (tmp_path / "data" / "held_out.jsonl").write_text('{"question": "2+2", "answer": "4"}\n')
    overrides = [
        f"executor.endpoints_file={_endpoints(tmp_path)}",
        "openrlhf.ckpt.output_dir=null",  # unset: OpenRLHF's relative default, resolved too
        "openrlhf.logger.tensorboard_dir=runs/tb",
        "openrlhf.eval.dataset=OpenRLHF/prompt-collection-v0.1@main,data/held_out.jsonl",
    ]
    args = _dry_run_args(load_recipe(GRPO, overrides), tmp_path, capsys)  # grpo_1node
    assert args.ckpt.path == str(tmp_path / "ckpt" / "grpo_1node")
    assert args.ckpt.output_dir == str(tmp_path / "ckpt")
    assert args.logger.tensorboard_dir == str(tmp_path / "runs" / "tb")
    assert args.data.prompt_dataset == str(tmp_path / "data" / "deepmath_train.jsonl")
    # A Hugging Face dataset id is left alone; a local entry beside it is resolved.
    assert args.eval.dataset == (
        f"OpenRLHF/prompt-collection-v0.1@main,{tmp_path / 'data' / 'held_out.jsonl'}"
    )
    assert args.actor.model_name_or_path == "Qwen/Qwen3-1.7B"  # a Hub id, not a path here


def test_a_missing_local_dataset_refuses_the_launch_but_not_a_hub_id(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr("subprocess.call", lambda command, **_: calls.append(command) or 0)
    endpoints = f"executor.endpoints_file={_endpoints(tmp_path)}"
    recipe = load_recipe(GRPO, [endpoints])
    with pytest.raises(FileNotFoundError) as err:
        run_openrlhf(recipe, launch_dir=tmp_path)
    assert f"data.prompt_dataset={tmp_path / 'data' / 'deepmath_train.jsonl'}" in str(err.value)
    assert not calls  # nothing was submitted
    hub = load_recipe(GRPO, [endpoints, "openrlhf.data.prompt_dataset=some-org/some-set"])
    assert run_openrlhf(hub, launch_dir=tmp_path) == 0
    assert calls and "some-org/some-set" in calls[0]


def test_launcher_defaults_are_openrlhfs_own():
    flags = _parser()._option_string_actions  # OpenRLHF's own PPO parser
    for name, default in OUTPUT_FLAG_DEFAULTS.items():
        assert flags[f"--{name}"].default == default, name
    assert flags["--data.max_len"].default == DATA_MAX_LEN_DEFAULT


# -- ray.submit: false: the hook and the configs still reach the workers -------------------


def _direct_recipe(tmp_path: Path) -> OpenRLHFRecipe:
    (tmp_path / "train.jsonl").write_text("{}\n")
    return load_recipe(
        GRPO,
        ["ray.submit=false", "ray.working_dir=null", f"executor.endpoints_file={_endpoints(tmp_path)}",
         f"openrlhf.data.prompt_dataset={tmp_path / 'train.jsonl'}"],
    )  # fmt: skip


def test_driver_run_here_starts_ray_with_the_hook_and_the_configs(tmp_path, monkeypatch):
    import ray

    launched: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(
        "subprocess.call", lambda command, env=None: launched.append((command, env)) or 0
    )
    before = dict(os.environ)
    assert run_openrlhf(_direct_recipe(tmp_path), launch_dir=tmp_path) == 0
    assert dict(os.environ) == before  # the launcher's own process is left alone
    ((command, driver_env),) = launched
    assert command[1:3] == ["-m", "trainers.openrlhf.entry"]
    assert HOOK_MARKER_ENV not in driver_env  # not a submitted job: the driver starts Ray

    inits: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: inits.append(kwargs))
    entry.start_ray(driver_env)
    (init,) = inits
    runtime = init["runtime_env"]
    assert runtime["worker_process_setup_hook"] == SETUP_HOOK
    env_vars = runtime["env_vars"]
    assert json.loads(env_vars[LOSS_CONFIG_ENV])["agent_mode"] == "shaped"
    executor = json.loads(env_vars[EXECUTOR_CONFIG_ENV])
    assert executor["endpoints"]["agents"]["verify"]["backend"] == "sglang://10.0.0.3:30000"
    # What OpenRLHF's own ray.init would have set, since it is now skipped.
    assert {k: env_vars[k] for k in OPENRLHF_RAY_ENV_DEFAULTS} == {
        k: os.environ.get(k, v) for k, v in OPENRLHF_RAY_ENV_DEFAULTS.items()
    }


def test_dry_run_of_a_driver_run_here_shows_the_runtime_env(tmp_path, capsys):
    assert run_openrlhf(_direct_recipe(tmp_path), dry_run=True, launch_dir=tmp_path) == 0
    argv = shlex.split(capsys.readouterr().out)
    name, _, handover = argv[0].partition("=")
    assert name == RUNTIME_ENV_ENV
    assert json.loads(handover)["worker_process_setup_hook"] == SETUP_HOOK
    assert argv[1:4] == ["python", "-m", "trainers.openrlhf.entry"]


def test_driver_started_without_aipos_setup_refuses_and_names_it(monkeypatch, capsys):
    monkeypatch.setattr("trainers.openrlhf.patch.install", lambda: True)
    for name in (RUNTIME_ENV_ENV, HOOK_MARKER_ENV, LOSS_CONFIG_ENV, EXECUTOR_CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--actor.model_name_or_path", "m"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert RUNTIME_ENV_ENV in err and HOOK_MARKER_ENV in err and SETUP_HOOK in err
    # A submitted job whose runtime env lost a config is refused too, naming it.
    monkeypatch.setenv(HOOK_MARKER_ENV, "1")
    monkeypatch.setenv(EXECUTOR_CONFIG_ENV, "{}")
    with pytest.raises(entry.DriverSetupError, match=LOSS_CONFIG_ENV):
        entry.start_ray()


# -- OpenRLHF's own runtime-env variables -------------------------------------------------


def _openrlhf_ray_init_env_vars() -> dict[str, str]:
    """``{name: default}`` of the env_vars in the ray.init call of OpenRLHF's train()."""
    tree = ast.parse(_train_ppo_ray_source().read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "ray.init":
            (runtime,) = [k.value for k in node.keywords if k.arg == "runtime_env"]
            env_vars = dict(zip(runtime.keys, runtime.values, strict=True))
            (mapping,) = [v for k, v in env_vars.items() if ast.literal_eval(k) == "env_vars"]
            found = {}
            for key, value in zip(mapping.keys, mapping.values, strict=True):
                # os.environ.get("NAME", "DEFAULT")
                assert ast.unparse(value.func) == "os.environ.get"
                found[ast.literal_eval(key)] = ast.literal_eval(value.args[1])
            return found
    raise AssertionError("no ray.init call in OpenRLHF's train_ppo_ray.py")


def test_openrlhf_runtime_env_variables_are_the_ones_we_know():
    assert _openrlhf_ray_init_env_vars() == OPENRLHF_RAY_ENV_DEFAULTS


@pytest.mark.parametrize("name", sorted(OPENRLHF_RAY_ENV_DEFAULTS))
def test_a_recipe_setting_openrlhfs_runtime_env_variables_is_refused(name):
    with pytest.raises(ConfigError) as err:
        load_recipe(GRPO, [f"ray.env_vars.{name}=x"])
    assert f"may not set {name}" in str(err.value) and "ray start" in str(err.value)
    assert load_recipe(GRPO, ["ray.env_vars.MY_FLAG=verbose"]).ray.env_vars == {
        "MY_FLAG": "verbose"
    }


def test_evaluation_data_that_repeats_training_questions_is_refused(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr("subprocess.call", lambda command, **_: calls.append(command) or 0)
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The same question in other spacing and case counts; a new one does not.
    held = [{"question": "what is  3 + 1 ?".replace(" ?", "?"), "answer": "4"}]
    held.append({"question": "What is 9 + 1?", "answer": "10"})
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    overrides = [
        f"executor.endpoints_file={_endpoints(tmp_path)}",
        "openrlhf.data.prompt_dataset=data/train.jsonl",
        "openrlhf.eval.dataset=data/test.jsonl",
    ]
    with pytest.raises(ValueError, match="1 of the 2 evaluation questions"):
        run_openrlhf(load_recipe(GRPO, overrides), launch_dir=tmp_path)
    assert not calls
    assert (
        run_openrlhf(load_recipe(GRPO, [*overrides, "allow_overlap=true"]), launch_dir=tmp_path)
        == 0
    )
    clean = [{"question": "What is 9 + 1?", "answer": "10"}]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clean))
    assert run_openrlhf(load_recipe(GRPO, overrides), launch_dir=tmp_path) == 0


# -- launching from any directory -----------------------------------------------------------


def test_a_packaged_recipe_loads_by_name_or_checkout_path_from_any_directory(tmp_path, monkeypatch):
    from aipo.recipes import load_recipe as load_by_name
    from trainers.openrlhf.recipes import packaged_recipes

    monkeypatch.chdir(tmp_path)  # not the checkout
    assert {p.stem for p in RECIPES} == set(packaged_recipes())
    by_name = load_by_name("grpo_1node", ["executor.endpoints_file=null"])
    by_path = load_by_name("configs/openrlhf/grpo_1node.yaml", ["executor.endpoints_file=null"])
    assert by_name == by_path == load_recipe(GRPO, ["executor.endpoints_file=null"])
    (tmp_path / "mine.yaml").write_text("executor: {endpoints_file: null}\n")
    assert load_by_name("mine.yaml").executor.endpoints_file is None  # a file here wins
    with pytest.raises(FileNotFoundError, match=r"'grpo_1nod' not found.*grpo_1node"):
        load_by_name("grpo_1nod")


def test_executor_path_follows_what_is_uploaded(tmp_path):
    from trainers.openrlhf.launcher import executor_path

    checkout = EXECUTOR.parents[2]
    installed = load_recipe(DAPO, ["executor.endpoints_file=null"])
    assert executor_path(installed, tmp_path) == str(EXECUTOR)
    uploaded = load_recipe(DAPO, ["executor.endpoints_file=null", f"ray.working_dir={checkout}"])
    assert executor_path(uploaded, tmp_path) == "trainers/openrlhf/executor.py"
    # An uploaded directory without the executor (the launch directory, say): the installed file.
    elsewhere = load_recipe(DAPO, ["executor.endpoints_file=null", "ray.working_dir=."])
    assert executor_path(elsewhere, tmp_path) == str(EXECUTOR)


def test_an_installed_wheel_launches_a_packaged_recipe_from_an_empty_directory(tmp_path):
    """Built from this working tree, installed without the checkout on the path."""
    import subprocess
    import sys

    checkout = EXECUTOR.parents[2]
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=checkout, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    source = tmp_path / "src"
    for name in filter(None, listed):
        if (checkout / name).is_file() and not name.startswith(("benchmarks/", "tests/", "runs/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((checkout / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
        cwd=source, check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("aipo-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from aipo.cli import main; sys.exit(main(sys.argv[1:]))",
         "train", "--engine", "openrlhf", "--config", "grpo_1node", "--dry-run"],
        cwd=empty, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (command,) = [line for line in run.stdout.splitlines() if line.startswith("ray job submit")]
    argv = shlex.split(command)
    executor = Path(argv[argv.index("--train.agent_func_path") + 1])
    assert executor == site / "trainers" / "openrlhf" / "executor.py" and executor.is_file()
    assert argv[argv.index("--data.prompt_dataset") + 1] == str(
        empty / "data" / "deepmath_train.jsonl"
    )
    runtime = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert "working_dir" not in runtime  # nothing uploaded


# -- W&B and TensorBoard through the recipe -------------------------------------------------


def test_wandb_key_is_an_environment_reference_never_the_key(tmp_path, capsys):
    base = [f"executor.endpoints_file={_endpoints(tmp_path)}"]
    with pytest.raises(ConfigError, match="must name an environment variable"):
        load_recipe(GRPO, [*base, "openrlhf.logger.wandb.key=0123abcd"])
    recipe = load_recipe(GRPO, [*base, "openrlhf.logger.wandb.key=env:WANDB_API_KEY"])
    args = _dry_run_args(recipe, tmp_path, capsys)  # OpenRLHF's own parser
    # OpenRLHF's PPOTrainer turns W&B on when the key flag is set; the driver fills it in.
    assert args.logger.wandb.key == "env:WANDB_API_KEY"
    assert (args.logger.wandb.project, args.logger.wandb.group) == ("aipo", "grpo_1node")
    assert args.logger.tensorboard_dir == str(tmp_path / "runs" / "tensorboard" / "grpo_1node")


def test_the_driver_fills_the_key_from_its_environment_or_refuses_before_ray(monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr("trainers.openrlhf.patch.install", lambda: True)
    started: list[bool] = []
    monkeypatch.setattr(entry, "start_ray", lambda: started.append(True))
    ran: list[list[str]] = []
    monkeypatch.setattr(runpy, "run_module", lambda *a, **k: ran.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    flags = ["--logger.wandb.key", "env:AIPO_TEST_WANDB_KEY", "--actor.model_name_or_path", "m"]
    monkeypatch.delenv("AIPO_TEST_WANDB_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_:
        entry.main(flags)
    assert exit_.value.code == 2 and not started and not ran
    assert "$AIPO_TEST_WANDB_KEY" in capsys.readouterr().err
    monkeypatch.setenv("AIPO_TEST_WANDB_KEY", "s3cret")
    entry.main(flags)
    assert started and ran == [
        ["train_ppo_ray", "--logger.wandb.key", "s3cret", "--actor.model_name_or_path", "m"]
    ]
