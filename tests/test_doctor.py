"""``aipo doctor --engine openrlhf``: one line per check, exit 1 on any FAIL, nothing on a GPU."""

from __future__ import annotations

import importlib.metadata
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aipo.cli import main
from aipo.commands import doctor, doctor_stack
from trainers.openrlhf.patch import ALLOW_VERSION_ENV

pytest.importorskip("openrlhf", reason="openrlhf not installed")
for _package in ("ray", "deepspeed"):
    pytest.importorskip(_package, reason=f"{_package} not installed")


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _serve(status: int) -> Iterator[int]:
    handler = type("Handler", (_Health,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def healthy_port() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 whose ``/health`` answers 200."""
    yield from _serve(200)


@pytest.fixture
def unhealthy_port() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 whose ``/health`` answers 503."""
    yield from _serve(503)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def launch_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A launch directory (the cwd) holding a small tokenizer in ``tok/``; no GPU here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"[UNK]": 0, "two": 1}, unk_token="[UNK]"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(doctor, "gpu_present", lambda: False)
    monkeypatch.delenv(ALLOW_VERSION_ENV, raising=False)
    _pinned_transformers(monkeypatch)
    return tmp_path


def _pinned_transformers(monkeypatch: pytest.MonkeyPatch, version: str = "5.15.0") -> None:
    """Report ``version`` as the installed transformers (this project's own pin may differ)."""
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: version if name == "transformers" else real(name),
    )


def _recipe(
    launch_dir: Path,
    served: dict,
    *,
    data: str = "data/train.jsonl",
    extra: str = "  ds.attn_implementation: sdpa\n",
    ray: str = "ray: {submit: false, working_dir: null}\n",
) -> Path:
    (launch_dir / "endpoints.json").write_text(json.dumps({"agents": served}))
    recipe = launch_dir / "recipe.yaml"
    recipe.write_text(
        ray
        + "executor: {task: deepmath, endpoints_file: endpoints.json, env: {max_total_tokens: 1024}}\n"
        "openrlhf:\n"
        "  actor.model_name_or_path: ./tok\n"
        f"  data.prompt_dataset: {data}\n"
        "  data.input_key: question\n"
        "  data.label_key: answer\n"
        "  data.max_len: 1024\n"
        "  rollout.max_new_tokens: 512\n"
        "  rollout.n_samples_per_prompt: 2\n"
        "  algo.advantage.estimator: group_norm\n"
        "  ckpt.path: ckpt/run\n" + extra
    )
    return recipe


def _doctor(recipe: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    """Exit code and ``{check name: 'status detail'}`` of one run."""
    code = main(["doctor", "--engine", "openrlhf", "--config", str(recipe)])
    lines = capsys.readouterr().out.splitlines()
    report = {}
    for line in lines[:-1]:
        status, _, rest = line.partition("  ")
        name, _, detail = rest.strip().partition("  ")
        report[name.strip()] = f"{status.strip()} {detail.strip()}"
    return code, report


def test_a_ready_launch_passes(launch_dir: Path, healthy_port: int, capsys) -> None:
    (launch_dir / "data").mkdir()
    (launch_dir / "data" / "train.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    tok = str(launch_dir / "tok")
    served = {"verify": {"backend": f"sglang://127.0.0.1:{healthy_port}", "tokenizer": tok}}
    code, report = _doctor(_recipe(launch_dir, served), capsys)
    assert code == 0, report
    assert not [line for line in report.values() if line.startswith("FAIL")]
    assert report["openrlhf"] == "ok 0.11.2"
    assert report["vllm"].startswith(("ok", "warn not installed (no GPU"))
    assert report["recipe"].startswith("ok")
    assert report["openrlhf flags"].startswith("ok")
    assert report["data.prompt_dataset"] == f"ok {launch_dir / 'data' / 'train.jsonl'}"
    assert report["data fields"] == "ok question, answer present"
    assert report["ds.attn_implementation"] == "ok sdpa: flash-attn's kernels not needed"
    assert report["transformers"] == "ok 5.15.0 (OpenRLHF pins transformers==5.15.0)"
    assert report["agent verify"] == f"ok http://127.0.0.1:{healthy_port}/health answers"
    # The policy's tokenizer (a relative path, resolved) and the agent's are the same one.
    assert report["tokenizer (policy, agent verify)"] == f"ok {tok} loads offline"
    assert report["ckpt.path"] == f"ok {launch_dir / 'ckpt' / 'run'}"
    assert report["ckpt.output_dir"] == f"ok {launch_dir / 'ckpt'}"  # OpenRLHF's default, resolved


def test_a_broken_launch_fails_naming_each_problem(
    launch_dir: Path, closed_port: int, unhealthy_port: int, capsys
) -> None:
    served = {
        "verify": {"backend": f"sglang://127.0.0.1:{closed_port}", "tokenizer": "no-org/no-model"},
        "knowledge": {"backend": f"sglang://127.0.0.1:{unhealthy_port}", "tokenizer": "./tok"},
    }
    code, report = _doctor(_recipe(launch_dir, served, data="data/missing.jsonl"), capsys)
    assert code == 1
    assert report["data.prompt_dataset"] == (
        f"FAIL {launch_dir / 'data' / 'missing.jsonl'} does not exist; write it: "
        f"aipo data --config {launch_dir / 'recipe.yaml'}"
    )
    assert report["agent verify"].startswith(f"FAIL http://127.0.0.1:{closed_port}/health: Connect")
    assert report["agent knowledge"] == f"FAIL http://127.0.0.1:{unhealthy_port}/health: HTTP 503"
    assert report["tokenizer (agent verify)"].startswith(
        "FAIL no-org/no-model is not in the local Hugging Face cache"
    )
    assert report["tokenizer (policy)"].startswith("ok")


def test_a_recipe_that_does_not_load_fails(launch_dir: Path, capsys) -> None:
    recipe = launch_dir / "bad.yaml"
    recipe.write_text("executor: {env: {max_turnz: 2}}\n")
    code, report = _doctor(recipe, capsys)
    assert code == 1
    assert report["recipe"].startswith("FAIL") and "max_turnz" in report["recipe"]


def test_missing_endpoints_file_fails_and_says_how_to_start_the_agents(launch_dir, capsys) -> None:
    recipe = _recipe(launch_dir, {})
    (launch_dir / "endpoints.json").unlink()
    code, report = _doctor(recipe, capsys)
    assert code == 1
    assert "aipo serve" in report["endpoints file"] and report["endpoints file"].startswith("FAIL")


def test_another_openrlhf_version_fails_unless_allowed(monkeypatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.11.3" if name == "openrlhf" else real(name)
    )
    monkeypatch.delenv(ALLOW_VERSION_ENV, raising=False)
    (first, *_) = doctor.package_checks(has_gpu=False)
    assert first.status == "FAIL" and "0.11.3" in first.detail and ALLOW_VERSION_ENV in first.detail
    monkeypatch.setenv(ALLOW_VERSION_ENV, "1")
    assert doctor.package_checks(has_gpu=False)[0].status == "warn"


def test_vllm_missing_fails_on_a_gpu_machine(monkeypatch) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    vllm = {c.name: c for c in doctor.package_checks(has_gpu=True)}["vllm"]
    assert vllm.status == "FAIL"
    assert vllm.detail.startswith("not installed; OpenRLHF's driver imports it first: ")
    assert "pip install 'vllm==0.29.0'" in vllm.detail  # OpenRLHF 0.11.2's [vllm] extra


# -- the stack a GPU node needs, and what the recipe asks of it -----------------------------


def test_transformers_outside_openrlhfs_pin_fails_with_the_install_command(monkeypatch) -> None:
    _pinned_transformers(monkeypatch, "5.24.0")
    checks = {c.name: c for c in doctor_stack.pin_checks()}
    assert checks["transformers"].status == "FAIL"
    assert checks["transformers"].detail == (
        "5.24.0, outside OpenRLHF 0.11.2's pin transformers==5.15.0: "
        "pip install 'transformers==5.15.0'"
    )
    assert {"deepspeed", "ray", "flash-attn"} <= set(checks)


def test_vllm_at_the_wrong_version_or_that_does_not_import_fails(monkeypatch) -> None:
    monkeypatch.setattr(doctor_stack, "_vllm_distribution", lambda: ("vllm", "0.28.1"))
    check = doctor_stack.vllm_check(has_gpu=True)
    assert check.status == "FAIL"
    assert check.detail.startswith("0.28.1, not OpenRLHF's vllm==0.29.0: pip install")
    # The right version that a fresh interpreter cannot import (there is no vllm here at all).
    monkeypatch.setattr(doctor_stack, "_vllm_distribution", lambda: ("vllm", "0.29.0"))
    check = doctor_stack.vllm_check(has_gpu=True)
    assert check.status == "FAIL"
    assert "0.29.0 does not import (ModuleNotFoundError: No module named 'vllm')" in check.detail


@pytest.mark.parametrize(
    ("flags", "kernels", "status", "says"),
    [
        ({}, False, "FAIL", "built without its CUDA kernels"),  # OpenRLHF's default attention
        ({"ds.attn_implementation": "flash_attention_2"}, True, "ok", "has its CUDA kernels"),
        ({"ds.attn_implementation": "sdpa"}, False, "ok", "kernels not needed"),
        ({"ds.attn_implementation": "sdpa", "ds.packing_samples": True}, False, "FAIL",
         "switches to flash_attention_2"),
    ],
)  # fmt: skip
def test_attention_needs_flash_attn_kernels_or_sdpa(monkeypatch, flags, kernels, status, says):
    # Here flash_attn_2_cuda is the empty stand-in of the CPU build, found for real.
    assert doctor_stack._has_cuda_kernels() is False
    if kernels:
        monkeypatch.setattr(doctor_stack, "_has_cuda_kernels", lambda: True)
    check = doctor_stack.attention_check(flags)
    assert check.status == status and says in check.detail
    if status == "FAIL" and not flags.get("ds.packing_samples"):
        assert "openrlhf.ds.attn_implementation=sdpa" in check.detail


def test_a_dataset_without_the_recipes_keys_fails_until_prepare_data_rewrites_it(
    launch_dir: Path, healthy_port: int, capsys
) -> None:
    from aipo.commands import data as prepare_data

    (launch_dir / "data").mkdir()
    train = launch_dir / "data" / "train.jsonl"  # the Hub's DeepMath names its answer final_answer
    train.write_text('{"question": "1+1", "final_answer": "2", "difficulty": 7}\n')
    tok = str(launch_dir / "tok")
    served = {"verify": {"backend": f"sglang://127.0.0.1:{healthy_port}", "tokenizer": tok}}
    recipe = _recipe(launch_dir, served)
    code, report = _doctor(recipe, capsys)
    assert code == 1
    assert report["data fields"].startswith(
        f"FAIL {train} lacks 'answer' (data.input_key 'question', data.label_key 'answer'); "
        "it has: difficulty, final_answer, question."
    )
    command = f"aipo data --config {recipe} --source {train}"
    assert command in report["data fields"]
    argv = ["--config", str(recipe), "--source", str(train), "--answer-field", "final_answer"]
    assert prepare_data.main(argv) == 0
    capsys.readouterr()
    code, report = _doctor(recipe, capsys)
    assert code == 0, report
    assert report["data fields"] == "ok question, answer present"


def test_loggers_the_recipe_turns_on_must_be_installed_and_keyed(
    launch_dir: Path, monkeypatch, capsys
) -> None:
    real = doctor_stack.importlib.util.find_spec
    monkeypatch.setattr(
        doctor_stack.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a),
    )
    monkeypatch.delenv("AIPO_TEST_WANDB", raising=False)
    extra = (
        "  ds.attn_implementation: sdpa\n  logger.tensorboard_dir: runs/tb\n"
        "  logger.wandb.key: env:AIPO_TEST_WANDB\n"
    )
    code, report = _doctor(_recipe(launch_dir, {}, extra=extra), capsys)
    assert code == 1
    assert report["tensorboard"].endswith("not installed: pip install tensorboard")
    assert report["wandb"].endswith("not installed: pip install wandb")
    assert report["wandb key"] == (
        "FAIL $AIPO_TEST_WANDB is not set: export AIPO_TEST_WANDB=... in this shell"
    )
    submitted = "ray: {submit: true, address: 'http://127.0.0.1:9', working_dir: null}\n"
    _, report = _doctor(_recipe(launch_dir, {}, extra=extra, ray=submitted), capsys)
    assert report["wandb key"].startswith("warn $AIPO_TEST_WANDB is not set in this shell")


def test_ray_that_does_not_answer_fails_with_the_command_to_start_it(
    launch_dir: Path, closed_port: int, capsys
) -> None:
    address = f"http://127.0.0.1:{closed_port}"
    submitted = f"ray: {{submit: true, address: '{address}', working_dir: null}}\n"
    code, report = _doctor(_recipe(launch_dir, {}, ray=submitted), capsys)
    assert code == 1
    assert report["ray dashboard"].startswith(f"FAIL {address} does not answer")
    assert "ray start --head --port 6379" in report["ray dashboard"]
