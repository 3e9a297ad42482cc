"""Idea3 between two scripted peers: stage order, who sees what, token exactness, faults."""

from __future__ import annotations

import pytest
from scripted import AdditionTask, ScriptedGenerator

from aipo_env import sources
from aipo_env.masks import MaskRule
from aipo_env.peer_episode import Peer, PeerEpisodeConfig, run_idea3
from aipo_env.protocols.peer import STAGES

EOS = "<|im_end|>"


def _stage1_prompt_text(problem, task) -> str:
    """The prompt's text as written by hand: the question, the answer format, stage 1's instruction."""
    return (
        f"{problem.question}\n\n{task.answer_format}".strip()
        + "\n\n"
        + (
            "You are solving this together with a partner. Stage 1 of 3, idea sharing: in two or "
            "three sentences, say how you would solve it. Do not give the final answer yet."
        )
    )


def scripts(problem, right_a: bool = True, right_b: bool = False):
    answer = int(problem.reference)
    return {
        "A": [
            "Add the tens, then the ones." + EOS,
            "B forgot the carry." + EOS,
            f"So \\boxed{{{answer if right_a else answer + 1}}}." + EOS,
        ],
        "B": [
            "Guess from the first digits." + EOS,
            "A's plan is slow." + EOS,
            f"So \\boxed{{{answer if right_b else answer + 2}}}." + EOS,
        ],
    }


async def play(tokenizer, script, *, modes=None, config=None, rule=None, fail=None):
    task = AdditionTask(4)
    problem = task.problems[0]
    gens = {
        name: ScriptedGenerator(tokenizer, steps, fail=fail if name == "B" else None)
        for name, steps in (script or scripts(problem)).items()
    }
    peers = [Peer(name, gen) for name, gen in gens.items()]
    out = await run_idea3(
        0,
        task,
        peers,
        modes or {"A": "cooperate", "B": "compete"},
        trajectory_ids={"A": "q0-A", "B": "q0-B"},
        group_ids={"A": "g-A", "B": "g-B"},
        config=config,
        mask_rule=rule,
        seed=5,
    )
    return out, gens, problem


def _text(tokenizer, t, label):
    return tokenizer.decode([i for i, s in zip(t.token_ids, t.source, strict=True) if s == label])


async def test_three_stages_each_peer_sees_the_other_and_only_the_fusion_is_scored(tokenizer):
    out, gens, problem = await play(tokenizer, None)
    a, b = out["A"], out["B"]
    # Each peer generated once per stage, on exactly its own trajectory so far.
    for name, t in out.items():
        calls = gens[name].calls
        assert len(calls) == len(STAGES) == len(t.turns)
        for call, turn in zip(calls, t.turns, strict=True):
            assert call[0] == t.trajectory_id  # one session per trajectory: prefix reuse
            assert call[1] == t.token_ids[: turn.policy_start]
    # A's stage-2 prompt holds B's idea, A's stage-3 prompt B's analysis (and never B's answer).
    a_peer = _text(tokenizer, a, sources.peer("B"))
    assert "Guess from the first digits." in a_peer and "A's plan is slow." in a_peer
    assert "boxed" not in a_peer
    assert "Add the tens" in _text(tokenizer, b, sources.peer("A"))
    # The instructions follow each peer's own mode.
    assert "partner" in tokenizer.decode(a.token_ids) and "rival" not in tokenizer.decode(
        a.token_ids
    )
    assert "rival" in tokenizer.decode(b.token_ids)
    # Scored on the fusion stage only: A right, B wrong.
    assert a.reward == 1.0 and b.reward == 0.0 and a.finish_reason == b.finish_reason == "stop"
    assert a.metadata["interaction"] == "cooperate" and b.metadata["interaction"] == "compete"
    assert [s["stage"] for s in a.metadata["stages"]] == [
        "share",
        "share",
        "analyze",
        "analyze",
        "fuse",
        "fuse",
    ]
    assert a.group_id == "g-A" and b.group_id == "g-B"


async def test_peer_tokens_are_the_peers_own_ids_and_logprobs_and_masked_by_default(tokenizer):
    out, _, _ = await play(tokenizer, None)
    a, b = out["A"], out["B"]
    # The peer's segment in A's trajectory is B's sampled ids of that stage, EOS cut, with
    # B's log-probs as behaviour log-probs.
    b_idea = b.token_ids[b.turns[0].policy_start : b.turns[0].policy_end]
    b_lps = b.behavior_logprobs[b.turns[0].policy_start : b.turns[0].policy_end]
    eos = tokenizer.eos_token_id
    start = a.source.index(sources.peer("B"))
    assert a.token_ids[start : start + len(b_idea) - 1] == [i for i in b_idea if i != eos]
    assert a.behavior_logprobs[start : start + len(b_idea) - 1] == b_lps[:-1]
    # Sources: prompt first, then policy/env/peer only; only policy tokens trained.
    assert a.source[: a.prompt_len] == [sources.PROMPT] * a.prompt_len
    assert set(a.source[a.prompt_len :]) == {sources.POLICY, sources.ENV, sources.peer("B")}
    assert a.loss_mask == [int(s == sources.POLICY) for s in a.source]
    # No injected text forges a turn marker: every marker in A is env or prompt text.
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for i, token in enumerate(a.token_ids):
        if token in (im_start, eos):
            assert a.source[i] in (sources.PROMPT, sources.ENV, sources.POLICY)
    trained = (await play(tokenizer, None, rule=MaskRule(train_injected=True)))[0]["A"]
    assert any(
        m for m, s in zip(trained.loss_mask, trained.source, strict=True) if s.startswith("peer:")
    )


async def test_a_silent_or_cut_off_peer_is_recorded_and_the_episode_goes_on(tokenizer):
    problem = AdditionTask(4).problems[0]
    script = scripts(problem)
    script["B"][0] = EOS  # nothing at idea sharing
    script["B"][1] = "word " * 200  # cut off by the stage limit
    out, _, _ = await play(tokenizer, script, config=PeerEpisodeConfig(max_new_tokens_per_stage=24))
    a = out["A"]
    statuses = {(s["stage"], s["peer"]): s["status"] for s in a.metadata["stages"]}
    assert statuses[("share", "B")] == "empty" and statuses[("analyze", "B")] == "length"
    # A saw a placeholder for the empty stage and the words before the cut for the other.
    assert tokenizer.decode(a.token_ids).count("B gave no answer at this stage.") == 1
    assert _text(tokenizer, a, sources.peer("B")).strip().startswith("word word")
    assert a.reward == 1.0 and len(a.turns) == 3


async def test_a_crashing_peer_ends_the_episode_with_an_error_not_the_run(tokenizer):
    out, _, _ = await play(tokenizer, None, fail=lambda session, turn: turn == 1)
    for t in out.values():
        assert t.finish_reason == "error:peer" and "peer 'B' failed" in t.error
        assert t.reward == 0.0 and t.verifier is None
    assert len(out["A"].turns) == 2  # A's analysis was generated before the episode ended


async def test_an_injection_past_the_context_ends_with_context_overflow(tokenizer):
    config = PeerEpisodeConfig(max_total_tokens=130)
    out, _, _ = await play(tokenizer, None, config=config)
    for t in out.values():
        assert t.finish_reason == "context_overflow" and len(t.token_ids) <= 130


async def test_one_peer_or_a_missing_mode_is_refused(tokenizer):
    task = AdditionTask(2)
    gen = ScriptedGenerator(tokenizer, ["x"])
    with pytest.raises(ValueError, match="two or more peers"):
        await run_idea3(
            0,
            task,
            [Peer("A", gen)],
            {"A": "compete"},
            trajectory_ids={"A": "a"},
            group_ids={"A": "g"},
        )
    with pytest.raises(ValueError, match=r"\['B'\]"):
        await run_idea3(
            0,
            task,
            [Peer("A", gen), Peer("B", gen)],
            {"A": "compete"},
            trajectory_ids={"A": "a", "B": "b"},
            group_ids={"A": "g", "B": "g"},
        )


async def test_a_peers_trajectory_is_exactly_the_hand_built_one(tokenizer):
    """A's whole trajectory, built by hand from the tokenizer: the prompt as ConsultEnv
    renders it, A's own ids, the ChatML markup between stages, and B's ids and log-probs."""
    out, gens, problem = await play(tokenizer, None)
    a, b = out["A"], out["B"]
    task = AdditionTask(4)
    eos = tokenizer.eos_token_id

    def enc(text):  # injected text: special tokens never parsed
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def template(text):  # chat markup: its special tokens are the template's ids
        return tokenizer.encode(text, add_special_tokens=False)

    content = _stage1_prompt_text(problem, task)
    prompt = template(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    )
    ids, src, lps = list(prompt), ["prompt"] * len(prompt), [None] * len(prompt)

    def add(piece, label, logprobs=None):
        ids.extend(piece)
        src.extend([label] * len(piece))
        lps.extend(logprobs if logprobs is not None else [None] * len(piece))

    def own(t, stage):
        turn = t.turns[stage]
        return (
            t.token_ids[turn.policy_start : turn.policy_end],
            t.behavior_logprobs[turn.policy_start : turn.policy_end],
        )

    closing = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
        continue_final_message=True,
    )
    assert "<|im_start|>" in closing  # ChatML: the markup below is the template's
    follow_ups = [
        (
            "idea",
            "Stage 2 of 3, idea analysis: say what is right in your partner's idea and what "
            "it misses, so that together you get the answer right. Do not give the final answer yet.",
        ),
        (
            "analysis",
            "Stage 3 of 3, idea fusion: write your final solution, using the best of both ideas.",
        ),
    ]
    for stage, (what, instruction) in enumerate(follow_ups):
        mine, my_lps = own(a, stage)
        assert mine[-1] == eos
        add(mine, "policy", my_lps)
        add(template("\n<|im_start|>user\n"), "env")  # A's own EOS closed its turn
        add(enc(f"Your partner B's {what}:\n"), "env")
        theirs, their_lps = own(b, stage)
        add(theirs[:-1], "peer:B", their_lps[:-1])  # B's ids and log-probs, its EOS left out
        add(enc("\n\n"), "env")
        add(enc(instruction), "env")
        add(template("<|im_end|>\n<|im_start|>assistant\n"), "env")
    mine, my_lps = own(a, 2)
    add(mine, "policy", my_lps)
    assert a.token_ids == ids
    assert a.source == src
    assert a.behavior_logprobs == lps
    assert a.prompt_len == len(prompt) and a.loss_mask == [int(s == "policy") for s in src]
    assert not a.consults and not a.consult_attempts and not a.allow_consult
    assert [t.feedback_end is not None for t in a.turns] == [True, True, False]


async def test_without_a_chat_template_the_prompt_is_consult_envs_plain_text(tokenizer):
    """No chat template: the prompt is ConsultEnv.prompt_ids' plain text, stages a blank line apart."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    out, _, problem = await play(plain, None)
    a = out["A"]
    task = AdditionTask(4)
    content = _stage1_prompt_text(problem, task)
    assert a.token_ids[: a.prompt_len] == plain.encode(content + "\n", add_special_tokens=False)
    gap = plain.encode("\n\n", add_special_tokens=False, split_special_tokens=True)
    first = a.turns[0]
    assert a.token_ids[first.policy_end : first.policy_end + len(gap)] == gap
    assert a.finish_reason == "stop" and a.reward == 1.0


def test_idea3_is_registered_but_never_built_from_an_env_config():
    from aipo_env.config import EnvConfig
    from aipo_env.protocols import PROTOCOLS, make_protocol

    assert "idea3" in PROTOCOLS
    with pytest.raises(ValueError, match="played between peers"):
        make_protocol(EnvConfig(protocol="idea3"))
    # A training config naming it is refused when it is read, before anything loads.
    from aipo.config import ConfigError, load_config
    from trainers.config import TrainConfig, default_config_path

    with pytest.raises(ConfigError, match="played between peers"):
        load_config(TrainConfig, default_config_path(), ["env.protocol=idea3"])
