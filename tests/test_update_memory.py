"""The update's memory: chunked log-probs, checkpointed layers, released generator copies.

Chunked log-probs must equal the full computation in value and gradient, and no tensor of
``[more than a chunk of positions, vocabulary]`` may exist in the forward or the backward:
every tensor created is recorded (a ``TorchDispatchMode``) and inspected.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import random_llama
from torch.utils._python_dispatch import TorchDispatchMode

from trainers import logprobs as logprobs_module
from trainers.logprobs import checkpointed_layers, selected_logprobs, token_logprobs

VOCAB = 97  # differs from every hidden size below, so a [*, VOCAB] tensor is recognisable


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns while active.

    Views of the model's weights (the head transposed) are not new memory and are left out.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.weights:
                self.shapes.append(tuple(t.shape))
        return out


def vocab_rows(shapes: list[tuple[int, ...]]) -> int:
    """The most positions any recorded ``[..., VOCAB]`` tensor holds (0 if none)."""
    rows = [int(torch.tensor(s[:-1]).prod()) for s in shapes if s and s[-1] == VOCAB]
    return max(rows, default=0)


def full(rows: torch.Tensor, head: torch.Tensor, targets: torch.Tensor):
    """The textbook computation: all logits, log_softmax, gather, entropy."""
    logp = torch.log_softmax((rows @ head.t()).float(), dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_log_probs_equal_the_full_computation_in_value_and_gradient(
    chunk_size, with_entropy
):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 16, generator=gen, requires_grad=True)
    head = torch.randn(VOCAB, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (20,), generator=gen)
    weights = torch.randn(20, generator=gen)
    logp, entropy = selected_logprobs(
        rows, targets, head=head, with_entropy=with_entropy, chunk_size=chunk_size
    )
    want_logp, want_entropy = full(rows, head, targets)
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
    loss = (logp * weights).sum() + (0.3 * entropy.sum() if with_entropy else 0.0)
    got = torch.autograd.grad(loss, (rows, head))
    want_loss = (want_logp * weights).sum() + (0.3 * want_entropy.sum() if with_entropy else 0.0)
    want = torch.autograd.grad(want_loss, (rows, head))
    if with_entropy:
        torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
    else:
        assert entropy is None
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_chunked_log_probs_of_logits_without_a_head_equal_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, VOCAB, generator=gen, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,), generator=gen)
    logp, entropy = selected_logprobs(logits, targets, with_entropy=True, chunk_size=2)
    eye = torch.eye(VOCAB)
    want_logp, want_entropy = full(logits, eye, targets)
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-5)
    (g,) = torch.autograd.grad((logp + entropy).sum(), logits)
    (w,) = torch.autograd.grad((want_logp + want_entropy).sum(), logits)
    torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def rows_and_response(seed: int = 0):
    """Three right-padded rows; the response (after a prompt of 3 to 5 tokens) is asked for."""
    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for row, (prompt, length) in enumerate([(3, 16), (5, 13), (4, 11)]):
        mask[row, :length] = 1
        response[row, prompt:length] = True
    return ids * mask, mask, response


@pytest.mark.parametrize("pack", [False, True])
def test_no_tensor_of_more_than_a_chunk_of_positions_by_the_vocabulary_in_forward_or_backward(
    pack,
):
    model = random_llama(VOCAB, seed=0)
    ids, mask, response = rows_and_response()
    chunk = 4
    asked = int(response.sum())  # 30 positions: many chunks
    with Shapes(model) as seen:
        logp, entropy = token_logprobs(
            model, ids, mask, positions=response, with_entropy=True, chunk_size=chunk, pack=pack
        )
        (logp.sum() + entropy.sum()).backward()
    assert 0 < vocab_rows(seen.shapes) <= chunk
    # The same recorder sees the full logits where they exist: the control the test needs.
    model.zero_grad()
    with Shapes(model) as unchunked:
        logp, _ = token_logprobs(model, ids, mask, positions=response, chunk_size=None, pack=pack)
        logp.sum().backward()
    assert vocab_rows(unchunked.shapes) == asked


def test_the_chunk_function_never_sees_more_than_chunk_rows(monkeypatch):
    model = random_llama(VOCAB, seed=0)
    ids, mask, response = rows_and_response(seed=2)
    seen = []
    real = logprobs_module._chunk_logits

    def spy(rows, weight):
        seen.append(rows.shape[0])
        return real(rows, weight)

    monkeypatch.setattr(logprobs_module, "_chunk_logits", spy)
    logp, _ = token_logprobs(model, ids, mask, positions=response, chunk_size=5)
    forward = list(seen)
    logp.sum().backward()
    assert max(seen) <= 5
    # Forward and backward each go over every asked-for position once.
    assert sum(forward) == int(response.sum()) and sum(seen) == 2 * int(response.sum())


def saved_bytes(model, ids, mask, response, checkpoint: bool) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for backward during the forward, and the parameters' gradients."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = token_logprobs(
            model, ids, mask, positions=response, pack=True, checkpoint_layers=checkpoint
        )
    logp.sum().backward()
    return total, [p.grad.clone() for p in model.parameters()]


def test_checkpointed_layers_keep_less_for_backward_and_give_the_same_gradient():
    model = random_llama(VOCAB, seed=3, layers=4, hidden_size=48)
    model.train()
    ids, mask, response = rows_and_response(seed=3)
    kept, grads = saved_bytes(model, ids, mask, response, checkpoint=False)
    kept_ckpt, grads_ckpt = saved_bytes(model, ids, mask, response, checkpoint=True)
    assert kept_ckpt < kept / 2
    for got, want in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Restored afterwards: the next forward keeps its activations again.
    assert saved_bytes(model, ids, mask, response, checkpoint=False)[0] == kept
    with checkpointed_layers(model) as active:
        assert active


def test_checkpointing_a_cached_prefix_is_refused():
    model = random_llama(VOCAB, seed=0)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    ids[1, :4] = ids[0, :4]
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, 5:] = True
    with pytest.raises(ValueError, match="pass pack=True"):
        token_logprobs(
            model,
            ids,
            torch.ones_like(ids),
            positions=response,
            prefix_groups=[(4, 2)],
            checkpoint_layers=True,
        )


def test_a_released_lean_forward_remakes_its_bfloat16_copies_with_the_same_logits():
    from policies.lean_llama import LeanLlama

    model = random_llama(VOCAB, seed=5).eval()
    forward = LeanLlama(model, torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(6)[None].expand(2, 6)
    before, _ = forward.prefill(ids, positions, [], None)
    forward.release()
    assert forward.layers is None and forward.lm_head is None
    after, _ = forward.prefill(ids, positions, [], None)
    assert forward.layers is not None
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Remade from the model's current weights, as sync_weights would.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    forward.release()
    moved, _ = forward.prefill(ids, positions, [], None)
    fresh, _ = LeanLlama(copy.deepcopy(model), torch.bfloat16).prefill(ids, positions, [], None)
    assert not torch.equal(moved, before)
    torch.testing.assert_close(moved, fresh, rtol=0, atol=0)


HEAP_SCRIPT = """
import sys, torch
from trainers import heap
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "mapped":
    assert heap.map_large_allocations(1 << 20)
first = torch.ones(1 << 20)
del first  # 4 MiB freed: glibc's own threshold rises above 2 MiB
tensors = [torch.ones(1 << 19) for _ in range(100)]  # 100 x 2 MiB
keep = tensors[-1]
before = rss_mib()
del tensors
print(before - rss_mib())
"""


@pytest.mark.parametrize(("mode", "returned"), [("mapped", True), ("default", False)])
def test_freed_large_tensors_leave_the_resident_set_only_when_mapped(mode, returned):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", HEAP_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    freed_mib = float(done.stdout.strip().splitlines()[-1])
    # 198 MiB freed below a tensor still alive: a heap cannot give it back, mappings can.
    assert (freed_mib > 150) is returned


def test_mapping_large_allocations_needs_a_positive_threshold():
    from trainers.heap import map_large_allocations

    with pytest.raises(ValueError, match="positive number of bytes"):
        map_large_allocations(0)


def test_the_optimizer_step_makes_no_parameter_sized_temporaries_and_matches_adamw():
    from trainers.optim import OptimConfig, build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(96, 80)  # an [80, 96] weight: recognisable among the tensors
    reference = copy.deepcopy(model)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, cfg)
    groups = [
        {"params": [reference.weight], "weight_decay": 0.1},
        {"params": [reference.bias], "weight_decay": 0.0},
    ]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=cfg.betas, eps=cfg.eps, foreach=False)
    shapes = {}
    for name, opt, net in (("built", optimizer, model), ("plain", plain, reference)):
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            with Shapes(net) as seen:
                opt.step()
        shapes[name] = seen.shapes
    weight = tuple(model.weight.shape)
    assert weight not in shapes["built"]
    assert weight in shapes["plain"]  # the control: the unfused step makes them
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
