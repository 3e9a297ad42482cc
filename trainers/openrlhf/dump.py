"""The multi-GPU smoke test's evidence: what the executor sent and what the loss received.

With ``AIPO_OPENRLHF_DUMP=DIR`` in the job's environment (``ray.env_vars``), each
rollout worker appends its first :data:`SAMPLES_PER_PROCESS` executor results to
``DIR/executor-<host>-<pid>.jsonl`` and each actor worker saves the first micro-batch
its :class:`AIPOPolicyLoss` trains with agent tokens to
``DIR/loss-rank<RANK>-<host>-<pid>.pt``. :func:`compare` (``python -m
trainers.openrlhf.dump DIR``) then checks, row by row, that the loss saw exactly the
trained tokens and behaviour log-probs the executor produced, and prints each rank's
device, agent tokens and IS coefficients. ``DIR`` must be a filesystem every node
writes to (or copy the files together before comparing).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from aipo_env.jsonl import open_for_append

#: Environment variable naming the dump directory; unset, nothing is written.
DUMP_ENV = "AIPO_OPENRLHF_DUMP"
#: Executor results kept per rollout process.
SAMPLES_PER_PROCESS = 16
#: ``rollout_log_probs`` at or above this mark an agent token (see trainers/openrlhf/loss.py).
AGENT_FLAG_THRESHOLD = 0.5

_state = {"samples": 0, "loss_saved": False}


def _target(prefix: str, suffix: str) -> Path | None:
    root = os.environ.get(DUMP_ENV)
    if not root:
        return None
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root) / f"{prefix}-{socket.gethostname()}-{os.getpid()}{suffix}"


def dump_sample(result: dict[str, Any]) -> None:
    """Append one executor result (trained ranges and the side channel) while the budget lasts."""
    path = _target("executor", ".jsonl")
    if path is None or _state["samples"] >= SAMPLES_PER_PROCESS:
        return
    _state["samples"] += 1
    keep = {k: result[k] for k in ("action_ranges", "rollout_log_probs", "reward")}
    with open_for_append(path) as f:
        f.write(json.dumps(keep) + "\n")


def dump_micro_batch(**tensors: Any) -> None:
    """Save the first micro-batch with agent tokens this process's loss trains (once)."""
    if _state["loss_saved"]:
        return
    path = _target(f"loss-rank{os.environ.get('RANK', '0')}", ".pt")
    if path is None:
        return
    import torch

    _state["loss_saved"] = True
    device = next(iter(tensors.values())).device
    payload = {k: v.detach().cpu() for k, v in tensors.items()}
    payload["device"] = str(device)
    payload["host"] = socket.gethostname()
    if device.type == "cuda":
        payload["device_name"] = torch.cuda.get_device_name(device)
        payload["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    torch.save(payload, path)


def _trained_values(row_mask: Any, row_values: Any) -> list[float]:
    return [float(v) for m, v in zip(row_mask.tolist(), row_values.tolist(), strict=True) if m]


def compare(root: str | Path) -> int:
    """Match every dumped loss row to an executor sample; 0 when all match, 1 otherwise."""
    import torch

    root = Path(root)
    samples = [
        json.loads(line)
        for path in sorted(root.glob("executor-*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    sent = []
    for sample in samples:
        values = sample["rollout_log_probs"]
        sent.append([v for start, end in sample["action_ranges"] for v in values[start:end]])
    dumps = sorted(root.glob("loss-*.pt"))
    if not samples or not dumps:
        print(
            f"nothing to compare in {root}: {len(samples)} executor samples, {len(dumps)} loss dumps"
        )
        return 1
    failed = 0
    devices = []
    for path in dumps:
        batch = torch.load(path)
        devices.append(f"{batch['host']}:{batch.get('cuda_visible_devices') or batch['device']}")
        for row in range(batch["action_mask"].shape[0]):
            got = _trained_values(batch["action_mask"][row], batch["rollout_log_probs"][row])
            agent = [v for v in got if v >= AGENT_FLAG_THRESHOLD]
            match = any(
                len(s) == len(got) and all(abs(a - b) < 1e-5 for a, b in zip(s, got, strict=True))
                for s in sent
            )
            coef = batch["coef"][row][batch["agent"][row]]
            line = (
                f"{path.name} row {row}: {len(got)} trained tokens, {len(agent)} agent tokens, "
                f"coef mean {float(coef.mean()) if coef.numel() else float('nan'):.3f}, "
                f"{'matches an executor sample' if match else 'NO executor sample matches'}"
            )
            print(line)
            failed += not match
    distinct = len(set(devices)) == len(devices)
    print(f"devices per rank: {devices} ({'distinct' if distinct else 'SHARED'})")
    return 1 if failed or not distinct else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m trainers.openrlhf.dump DIR", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(compare(sys.argv[1]))
