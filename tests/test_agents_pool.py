"""The agent pool: routing, errors, timeouts, retries, reply cap, cache, concurrency, config."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from agents import (
    Agent,
    AgentConfig,
    AgentPool,
    AgentPoolConfig,
    AgentReply,
    ConsultRequest,
    ConsultService,
    LLMAgent,
    OracleVerifyAgent,
    tokenizers_match,
)
from policies.base import Generation, Generator, SamplingParams
from tasks.base import Problem, RewardResult, Task

PROBLEM = Problem(id="p1", task="toy", question="What is 1/2 + 1/4?", reference="3/4")


class ScriptedAgent(Agent):
    """Answers from a script of replies (or exceptions); counts calls."""

    def __init__(self, name: str, script: Sequence[AgentReply | BaseException | str]) -> None:
        self.name = name
        self.script = list(script)
        self.calls = 0

    async def consult(self, request: ConsultRequest) -> AgentReply:
        self.calls += 1
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str):
            return AgentReply(agent=self.name, text=f"{item} ({request.question})")
        return item


class BlockedAgent(Agent):
    """Never answers until released: a backend that hangs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def consult(self, request: ConsultRequest) -> AgentReply:
        self.entered.set()
        await self.release.wait()
        return AgentReply(agent=self.name, text="late")


def pool_of(*agents: Agent, **settings: Any) -> AgentPool:
    config = AgentPoolConfig(agents={a.name: AgentConfig(**settings) for a in agents})
    return AgentPool({a.name: a for a in agents}, config)


def ask(agent: str, question: str = "Is 3/4 right?", **kw: Any) -> ConsultRequest:
    return ConsultRequest(agent=agent, question=question, problem=PROBLEM, **kw)


def test_pool_is_a_consult_service() -> None:
    pool = pool_of(ScriptedAgent("verify", ["yes"]), ScriptedAgent("knowledge", ["fact"]))
    assert isinstance(pool, ConsultService)
    assert list(pool.names) == ["verify", "knowledge"]


async def test_routes_to_the_named_agent() -> None:
    verify, knowledge = ScriptedAgent("verify", ["yes"]), ScriptedAgent("knowledge", ["fact"])
    reply = await pool_of(verify, knowledge).consult(ask("knowledge", "define a fraction"))
    assert reply.ok and reply.text == "fact (define a fraction)"
    assert (verify.calls, knowledge.calls) == (0, 1)


async def test_unknown_agent_names_the_valid_ones() -> None:
    pool = pool_of(*(ScriptedAgent(n, ["x"]) for n in ("verify", "knowledge", "reasoning")))
    reply = await pool.consult(ask("verfy"))
    assert reply.agent == "verfy"
    assert reply.error == "unknown agent 'verfy'; expected one of verify, knowledge, reasoning"


async def test_empty_question_is_an_error_and_calls_nothing() -> None:
    agent = ScriptedAgent("verify", ["x"])
    reply = await pool_of(agent).consult(ask("verify", "   \n"))
    assert reply.error is not None and reply.error.startswith("empty question for agent 'verify'")
    assert agent.calls == 0


async def test_a_hanging_agent_times_out_with_an_error() -> None:
    agent = BlockedAgent("verify")
    reply = await pool_of(agent, timeout_s=0.05, retries=0).consult(ask("verify"))
    assert agent.entered.is_set()
    assert reply.error == "agent 'verify': timeout after 0.05 s"
    assert reply.text == ""


async def test_an_agent_that_raises_gives_an_error_reply() -> None:
    agent = ScriptedAgent("verify", [RuntimeError("connection refused")])
    reply = await pool_of(agent, retries=0).consult(ask("verify"))
    assert reply.error == "agent 'verify' raised RuntimeError: connection refused"


async def test_retries_an_error_then_succeeds() -> None:
    agent = ScriptedAgent(
        "verify", [AgentReply(agent="verify", error="server answered 500"), "fine"]
    )
    reply = await pool_of(agent, retries=1).consult(ask("verify"))
    assert reply.ok and reply.text == "fine (Is 3/4 right?)"
    assert agent.calls == 2


async def test_gives_up_after_all_attempts() -> None:
    agent = ScriptedAgent("verify", [AgentReply(agent="verify", error="server answered 500")])
    reply = await pool_of(agent, retries=2).consult(ask("verify"))
    assert agent.calls == 3
    assert reply.error == "server answered 500 (gave up after 3 attempts)"


async def test_misaligned_logprobs_are_rejected() -> None:
    bad = AgentReply(agent="verify", text="ab", token_ids=[1, 2, 3], logprobs=[-0.1])
    reply = await pool_of(ScriptedAgent("verify", [bad]), retries=0).consult(ask("verify"))
    assert reply.error == "agent 'verify' returned 3 token ids but 1 log-probs; they must align"


async def test_cap_truncates_ids_logprobs_and_text_together(tokenizer) -> None:
    text = "The first step is to find a common denominator for both fractions."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logprobs = [-0.1 * (i + 1) for i in range(len(ids))]
    agent = ScriptedAgent(
        "verify", [AgentReply(agent="verify", text=text, token_ids=ids, logprobs=logprobs)]
    )
    config = AgentPoolConfig(agents={"verify": AgentConfig(max_reply_tokens=5)})
    reply = await AgentPool({"verify": agent}, config, tokenizer=tokenizer).consult(ask("verify"))
    assert reply.truncated
    assert reply.token_ids == ids[:5] and reply.logprobs == logprobs[:5]
    assert reply.text == tokenizer.decode(ids[:5]) and text.startswith(reply.text)


async def test_cap_truncates_text_only_replies_by_tokens(tokenizer) -> None:
    text = "one two three four five six seven eight nine ten"
    agent = ScriptedAgent("knowledge", [AgentReply(agent="knowledge", text=text)])
    config = AgentPoolConfig(agents={"knowledge": AgentConfig(max_reply_tokens=3)})
    pool = AgentPool({"knowledge": agent}, config, tokenizer=tokenizer)
    reply = await pool.consult(ask("knowledge"))
    assert reply.truncated and reply.token_ids is None
    assert len(tokenizer(reply.text, add_special_tokens=False)["input_ids"]) == 3
    assert text.startswith(reply.text)


async def test_short_replies_are_not_marked_truncated(tokenizer) -> None:
    agent = ScriptedAgent("verify", ["Correct."])
    config = AgentPoolConfig(agents={"verify": AgentConfig(max_reply_tokens=50)})
    reply = await AgentPool({"verify": agent}, config, tokenizer=tokenizer).consult(ask("verify"))
    assert reply.ok and not reply.truncated


async def test_identical_requests_hit_the_cache() -> None:
    agent = ScriptedAgent("knowledge", ["first", "second"])
    pool = pool_of(agent)
    first = await pool.consult(ask("knowledge", "define lcm"))
    again = await pool.consult(ask("knowledge", "define lcm"))
    other = await pool.consult(ask("knowledge", "define gcd"))
    assert agent.calls == 2
    assert not first.cache_hit and again.cache_hit and not other.cache_hit
    assert again.text == first.text == "first (define lcm)"
    assert other.text == "second (define gcd)"
    # The cache hands out copies: changing one reply does not change the next.
    again.text = "changed"
    assert (await pool.consult(ask("knowledge", "define lcm"))).text == "first (define lcm)"


async def test_cache_is_keyed_on_the_problem_and_skips_errors() -> None:
    agent = ScriptedAgent("verify", [AgentReply(agent="verify", error="down"), "up"])
    pool = pool_of(agent, retries=0)
    assert not (await pool.consult(ask("verify"))).ok
    assert (await pool.consult(ask("verify"))).ok  # the error was not cached
    other_problem = PROBLEM.model_copy(update={"id": "p2"})
    reply = await pool.consult(
        ConsultRequest(agent="verify", question="Is 3/4 right?", problem=other_problem)
    )
    assert not reply.cache_hit and agent.calls == 3


async def test_cache_evicts_the_least_recently_used() -> None:
    agent = ScriptedAgent("knowledge", ["r"])
    config = AgentPoolConfig(agents={"knowledge": AgentConfig()}, cache_size=2)
    pool = AgentPool({"knowledge": agent}, config)
    for question in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        await pool.consult(ask("knowledge", question))
    assert agent.calls == 3
    assert (await pool.consult(ask("knowledge", "a"))).cache_hit
    assert not (await pool.consult(ask("knowledge", "b"))).cache_hit


async def test_concurrency_limit_is_respected() -> None:
    limit = 2

    class GatedAgent(Agent):
        name = "reasoning"

        def __init__(self) -> None:
            self.in_flight = 0
            self.max_in_flight = 0
            self.full = asyncio.Event()
            self.gate = asyncio.Event()

        async def consult(self, request: ConsultRequest) -> AgentReply:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.in_flight == limit:
                self.full.set()
            await self.gate.wait()
            self.in_flight -= 1
            return AgentReply(agent=self.name, text=request.question)

    agent = GatedAgent()
    pool = pool_of(agent, max_concurrency=limit)
    tasks = [asyncio.create_task(pool.consult(ask("reasoning", f"q{i}"))) for i in range(6)]
    await agent.full.wait()
    for _ in range(20):  # give every waiting consult the chance to (wrongly) enter
        await asyncio.sleep(0)
    assert agent.in_flight == limit
    agent.gate.set()
    replies = await asyncio.gather(*tasks)
    assert [r.text for r in replies] == [f"q{i}" for i in range(6)]
    assert agent.max_in_flight == limit


class FractionTask(Task):
    """A one-problem task whose verifier is math-verify (1/2 and 0.5 are the same answer)."""

    name = "toy"

    def load(self) -> list[Problem]:
        return [PROBLEM]

    def extract_answer(self, response: str) -> str | None:
        from agents.oracle import last_boxed

        return last_boxed(response)

    def score(self, problem: Problem, response: str) -> RewardResult:
        from tasks.math import verify_math

        extracted = self.extract_answer(response)
        if extracted is None:
            return RewardResult(score=0.0, correct=False, reason="no boxed answer")
        correct = bool(verify_math(problem.reference, extracted)["correct"])
        return RewardResult(score=float(correct), correct=correct, extracted=extracted)


@pytest.mark.parametrize(
    "question, verdict, candidate",
    [
        ("So the sum is \\boxed{0.75}, right?", "Correct", "0.75"),
        ("I get \\boxed{\\frac{3}{4}}.", "Correct", "\\frac{3}{4}"),
        ("1/2 + 1/4 = 2/6", "Incorrect", "2/6"),
        ("Is my final answer is 1/4?", "Incorrect", "1/4"),
    ],
)
async def test_oracle_verify_uses_the_task_verifier(question, verdict, candidate) -> None:
    agent = OracleVerifyAgent(FractionTask())
    reply = await agent.consult(ask("verify", question))
    assert reply.ok, reply.error
    assert reply.text.startswith(f"{verdict}: the answer {candidate} ")
    assert PROBLEM.reference not in reply.text.replace(candidate, ""), "the reference leaked"


async def test_oracle_verify_without_a_candidate_or_problem() -> None:
    agent = OracleVerifyAgent(FractionTask())
    reply = await agent.consult(ask("verify", "Am I on the right track?"))
    assert reply.ok and reply.text.startswith("I found no candidate answer")
    reply = await agent.consult(ConsultRequest(agent="verify", question="\\boxed{1}"))
    assert reply.error == "oracle verify needs the problem and its reference; got none"


class CountingGenerator(Generator):
    """A generator that replies "ok" and counts its calls per session prefix."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.sessions: list[str | None] = []
        self.closed = 0

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_context(self) -> int:
        return 4096

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, *, session_id: str | None = None
    ) -> Generation:
        self.sessions.append(session_id)
        ids = self._tokenizer("ok", add_special_tokens=False)["input_ids"]
        return Generation(token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop")

    async def aclose(self) -> None:
        self.closed += 1


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="timeout"):
        AgentPoolConfig.model_validate({"agents": {"verify": {"timeout": 3}}})
    with pytest.raises(ValidationError, match="max_concurrency"):
        AgentConfig(max_concurrency=0)
    assert list(AgentPoolConfig().agents) == ["verify", "knowledge", "reasoning"]


async def test_from_config_shares_one_policy_backend(tokenizer) -> None:
    generator = CountingGenerator(tokenizer)
    pool = AgentPool.from_config(AgentPoolConfig(), policy_generator=generator)
    agents = pool.agents
    assert all(isinstance(a, LLMAgent) and a.generator is generator for a in agents.values())
    assert all(a.shares_policy_tokenizer for a in agents.values())
    for name in pool.names:
        reply = await pool.consult(ask(name, episode_id="ep"))
        assert reply.ok and reply.token_ids is not None and reply.logprobs == [-0.5]
    assert generator.sessions == ["verify:ep", "knowledge:ep", "reasoning:ep"]
    await pool.aclose()
    assert generator.closed == 0, "the policy's generator belongs to the caller"


async def test_from_config_reuses_a_named_backend_and_closes_it(tokenizer, monkeypatch) -> None:
    import agents.pool as pool_module

    built: list[tuple[str, CountingGenerator]] = []

    def fake_backend(spec: str, *, tokenizer: Any = None, options: Any = None) -> CountingGenerator:
        generator = CountingGenerator(tokenizer_fixture)
        built.append((spec, generator))
        return generator

    tokenizer_fixture = tokenizer
    monkeypatch.setattr(pool_module, "make_backend", fake_backend)
    config = AgentPoolConfig(
        agents={
            "verify": AgentConfig(kind="oracle"),
            "knowledge": AgentConfig(backend="some/model", temperature=0.0),
            "reasoning": AgentConfig(backend="some/model", include_solution=True),
        }
    )
    pool = AgentPool.from_config(config, task=FractionTask())
    assert [spec for spec, _ in built] == ["some/model"]
    agents = pool.agents
    assert isinstance(agents["verify"], OracleVerifyAgent)
    assert agents["knowledge"].generator is agents["reasoning"].generator is built[0][1]
    assert agents["knowledge"].sampling.temperature == 0.0
    assert agents["reasoning"].include_solution
    # No policy tokenizer was given: no ids can be trusted to mean anything to the policy.
    assert not agents["knowledge"].shares_policy_tokenizer
    await pool.aclose()
    await pool.aclose()
    assert built[0][1].closed == 1


def test_from_config_refuses_what_it_cannot_build(tokenizer) -> None:
    with pytest.raises(ValueError, match="agent 'verify' is an oracle and needs the task"):
        AgentPool.from_config(AgentPoolConfig(agents={"verify": AgentConfig(kind="oracle")}))
    with pytest.raises(ValueError, match="uses backend 'policy' but no policy_generator"):
        AgentPool.from_config(AgentPoolConfig())
    clash = AgentPoolConfig(
        agents={
            "verify": AgentConfig(backend="sglang://127.0.0.1:1", tokenizer="a"),
            "knowledge": AgentConfig(backend="sglang://127.0.0.1:1", tokenizer="b"),
        }
    )
    with pytest.raises(ValueError, match="'verify' and 'knowledge' share backend"):
        AgentPool.from_config(clash)
    with pytest.raises(ValueError, match="needs the tokenizer of the served model"):
        AgentPool.from_config(
            AgentPoolConfig(agents={"verify": AgentConfig(backend="sglang://127.0.0.1:1")})
        )


def test_tokenizers_match_compares_vocabularies(tokenizer) -> None:
    class Vocab:
        def __init__(self, vocab: dict[str, int]) -> None:
            self.vocab = vocab

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

    same = Vocab(tokenizer.get_vocab())
    assert tokenizers_match(tokenizer, same)
    swapped = tokenizer.get_vocab()
    a, b = "hello", "world"
    swapped[a], swapped[b] = swapped[b], swapped[a]
    assert not tokenizers_match(tokenizer, Vocab(swapped))
    assert not tokenizers_match(tokenizer, None)
