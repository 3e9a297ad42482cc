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
from aipo.commands import doctor
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
    return tmp_path


def _recipe(launch_dir: Path, served: dict, *, data: str = "data/train.jsonl") -> Path:
    (launch_dir / "endpoints.json").write_text(json.dumps({"agents": served}))
    recipe = launch_dir / "recipe.yaml"
    recipe.write_text(
        "ray: {submit: false, working_dir: null}\n"
        "executor: {task: deepmath, endpoints_file: endpoints.json, env: {max_total_tokens: 1024}}\n"
        "openrlhf:\n"
        "  actor.model_name_or_path: ./tok\n"
        f"  data.prompt_dataset: {data}\n"
        "  data.input_key: question\n"
        "  data.label_key: answer\n"
        "  data.max_len: 1024\n"
        "  rollout.max_new_tokens: 512\n"
        "  rollout.n_samples_per_prompt: 2\n"
        "  algo.advantage.estimator: group_norm\n"
        "  ckpt.path: ckpt/run\n"
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
        f"FAIL {launch_dir / 'data' / 'missing.jsonl'} does not exist"
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
    assert (vllm.status, vllm.detail) == ("FAIL", "not installed")
