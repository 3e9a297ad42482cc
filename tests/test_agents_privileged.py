"""Agents that know more than the policy: oracles over the task's privileged information, the leak guard."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from scripted import AdditionTask, ScriptedGenerator

from agents import (
    Agent,
    AgentConfig,
    AgentPool,
    AgentPoolConfig,
    AgentReply,
    ConsultRequest,
    OracleKnowledgeAgent,
    OracleReasoningAgent,
    OracleVerifyAgent,
)
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from tasks import make_task
from tasks.base import Problem
from tasks.procedural import ProceduralTask
from trainers.config import TrainConfig
from trainers.summary import consult_error_kind, rollout_metrics

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def legs() -> ProceduralTask:
    return make_task("rg:leg_counting", size=3, seed=0)


@pytest.fixture(scope="module")
def chain() -> ProceduralTask:
    return make_task("rg:chain_sum", size=3, seed=0)


def ask(agent: str, question: str, problem: Problem, transcript: str = "") -> ConsultRequest:
    return ConsultRequest(agent=agent, question=question, problem=problem, transcript=transcript)


# -- the task side -----------------------------------------------------------------------------


def test_leg_counting_problems_carry_legs_per_animal_and_chain_sums_carry_steps(
    legs, chain
) -> None:
    problem = legs.problems[1]  # 13 woodlouses, 8 leechs, 8 tigers, 11 humans, 7 spiders
    assert problem.reference == "292" and "7 spiders" in problem.question
    assert legs.facts(problem) == [
        "A woodlouse has 14 legs.",
        "A leech has no legs.",
        "A tiger has 4 legs.",
        "A human has 2 legs.",
        "A spider has 8 legs.",
    ]
    assert legs.privileged == {"facts", "steps"} and chain.privileged == {"steps"}
    steps = chain.solution_steps(chain.problems[1])  # 4 - 1 - 7 = -4
    assert [(s.action, s.result) for s in steps] == [
        ("compute 4 - 1", "3"),
        ("compute 3 - 7", "-4"),
    ]
    assert make_task("math500").privileged == frozenset()


# -- oracle agents on concrete problems --------------------------------------------------------


async def test_knowledge_oracle_states_the_fact_asked_for_and_not_the_answer(legs) -> None:
    agent = OracleKnowledgeAgent(legs)
    problem = legs.problems[1]
    reply = await agent.consult(ask("knowledge", "How many legs does a spider have?", problem))
    assert reply.ok and reply.text == "A spider has 8 legs."
    reply = await agent.consult(ask("knowledge", "Legs of woodlouses and tigers?", problem))
    assert reply.text == "A woodlouse has 14 legs. A tiger has 4 legs."
    # A question about nothing in particular gets every fact of the problem, never the total.
    reply = await agent.consult(ask("knowledge", "What do I need to know?", problem))
    assert "A human has 2 legs." in reply.text and "A leech has no legs." in reply.text
    assert "292" not in reply.text


async def test_knowledge_oracle_leaves_out_a_fact_that_is_the_answer(legs) -> None:
    entry = {"question": "2 chickens?", "answer": 4, "metadata": {"animals": {"chicken": 2}}}
    problem = Problem(
        id="x",
        task="rg:leg_counting",
        question="How many legs have 2 chickens?",
        reference="4",
        metadata={"entry": entry},
    )
    reply = await OracleKnowledgeAgent(legs).consult(ask("knowledge", "chicken legs?", problem))
    assert reply.ok and reply.text == "A chicken has 2 legs."
    entry = {
        "question": "4 snakes, 1 cat?",
        "answer": 4,
        "metadata": {"animals": {"snake": 4, "cat": 1}},
    }
    problem = problem.model_copy(
        update={"question": "3 snakes, 1 cat?", "metadata": {"entry": entry}}
    )
    reply = await OracleKnowledgeAgent(legs).consult(
        ask("knowledge", "How many legs has a cat?", problem)
    )
    assert "4" not in reply.text and "give the answer away" in reply.text


async def test_reasoning_oracle_gives_the_next_step_and_never_the_final_result(chain) -> None:
    agent = OracleReasoningAgent(chain)
    problem = chain.problems[1]  # 4 - 1 - 7 = -4
    reply = await agent.consult(ask("reasoning", "Where do I start?", problem))
    assert reply.text == "Next step (1 of 2): compute 4 - 1 = 3."
    # Once the transcript shows 3, the next step is the last one: its action, not its result.
    reply = await agent.consult(ask("reasoning", "And now?", problem, transcript="4 - 1 = 3. "))
    assert reply.text == "Last step: compute 3 - 7. Work it out yourself: that is the final answer."
    assert "-4" not in reply.text


async def test_reasoning_oracle_withholds_an_intermediate_result_equal_to_the_answer(chain) -> None:
    entry = {"question": "3 + 4 - 0 =", "answer": 7, "metadata": {"expression": "3 + 4 - 0"}}
    problem = Problem(
        id="x",
        task="rg:chain_sum",
        question="3 + 4 - 0 =",
        reference="7",
        metadata={"entry": entry},
    )
    reply = await OracleReasoningAgent(chain).consult(ask("reasoning", "help", problem))
    assert reply.text == "Next step: compute 3 + 4. Work out its result yourself."


async def test_reasoning_oracle_on_products_gives_a_partial_product() -> None:
    task = make_task("rg:products", size=3, seed=0)
    problem = task.problems[1]  # 18271 * 43432
    reply = await OracleReasoningAgent(task).consult(ask("reasoning", "How?", problem))
    assert reply.text == "Next step (1 of 6): compute 18271 * 40000 = 730840000."
    assert problem.reference not in reply.text


@pytest.mark.parametrize(
    ("question", "text"),
    [
        ("Is it \\boxed{5}?", "Incorrect: the answer 5 is too large. Recheck your work."),
        ("I get \\boxed{-20000}", "Incorrect: the answer -20000 is too small. Recheck your work."),
        ("So \\boxed{-4}?", "Correct: the answer -4 is right."),
    ],
)
async def test_verify_oracle_says_which_way_a_numeric_answer_is_off(chain, question, text) -> None:
    reply = await OracleVerifyAgent(chain).consult(ask("verify", question, chain.problems[1]))
    assert reply.text == text


async def test_verify_oracle_gives_no_direction_where_the_task_cannot_tell() -> None:
    task = make_task("rg:family_relationships", size=2, seed=0)
    problem = task.problems[0]
    assert problem.reference == "son"
    reply = await OracleVerifyAgent(task).consult(ask("verify", "\\boxed{daughter}", problem))
    assert reply.text == "Incorrect: the answer daughter is not right. Recheck your work."


# -- the leak guard ----------------------------------------------------------------------------


class Leaky(Agent):
    """Replies with a fixed text (and ids standing in for a model's), whatever it is asked."""

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text = name, text

    async def consult(self, request: ConsultRequest) -> AgentReply:
        return AgentReply(agent=self.name, text=self.text, token_ids=[1, 2], logprobs=[-0.1, -0.2])


def pool(text: str, mode: str, task: Any = None) -> AgentPool:
    config = AgentPoolConfig(agents={"reasoning": AgentConfig(leak_guard=mode)})
    return AgentPool({"reasoning": Leaky("reasoning", text)}, config, task=task)


async def test_leak_guard_blocks_a_reply_that_states_the_answer(chain) -> None:
    problem = chain.problems[1]
    reply = await pool("4 - 1 = 3, then 3 - 7 = -4.", "block", chain).consult(
        ask("reasoning", "help", problem)
    )
    assert reply.leak == "blocked" and not reply.ok and reply.text == ""
    assert "withheld" in reply.error
    # The env reports it as a leak, not as an agent that failed.
    assert consult_error_kind(f"agent 'reasoning' could not answer: {reply.error}") == "leak"


async def test_leak_guard_rewrites_the_extra_mentions_and_drops_the_log_probs(chain) -> None:
    problem = chain.problems[1]
    reply = await pool("4 - 1 = 3, then 3 - 7 = -4. Answer: -4", "rewrite", chain).consult(
        ask("reasoning", "help", problem)
    )
    assert reply.ok and reply.leak == "rewritten"
    assert reply.text == "4 - 1 = 3, then 3 - 7 = [withheld]. Answer: [withheld]"
    assert reply.token_ids is None and reply.logprobs is None


async def test_leak_guard_off_lets_the_answer_through(chain) -> None:
    reply = await pool("It is -4.", "off", chain).consult(ask("reasoning", "?", chain.problems[1]))
    assert (
        reply.ok and reply.text == "It is -4." and reply.leak is None and reply.token_ids == [1, 2]
    )


async def test_leak_guard_allows_confirming_the_policys_candidate_and_quoting_the_problem() -> None:
    task = make_task("rg:products", size=3, seed=0)
    problem = task.problems[2]  # 1 * 5 = 5
    assert problem.reference == "5" and "1 * 5" in problem.question
    quote = await pool("Last step: compute 1 * 5.", "block", task).consult(
        ask("reasoning", "?", problem)
    )
    assert quote.ok and quote.leak is None
    said = await pool("1 * 5 = 5", "block", task).consult(ask("reasoning", "?", problem))
    assert said.leak == "blocked"
    confirmed = await pool("Correct: 5 is right.", "block", task).consult(
        ask("reasoning", "Is \\boxed{5} right? 1 * 5", problem)
    )
    assert confirmed.ok and confirmed.leak is None


async def test_leak_guard_without_a_task_checks_the_reference_as_a_token() -> None:
    problem = Problem(id="p", task="t", question="What is 20 + 22?", reference="42")
    reply = await pool("The total is 42.", "block").consult(ask("reasoning", "hint?", problem))
    assert reply.leak == "blocked"
    reply = await pool("Add the tens: 20 + 20 = 40.", "block").consult(
        ask("reasoning", "?", problem)
    )
    assert reply.ok and reply.leak is None


async def test_blocked_and_rewritten_replies_are_counted_in_the_leak_rate(tokenizer) -> None:
    task = AdditionTask(1)
    problem = task.problems[0]
    consult = '<consult agent="reasoning">hint?</consult>'
    answer = f"\\boxed{{{problem.reference}}}{EOS}"
    trajectories = []
    for mode, text in [
        ("block", f"It is {problem.reference}."),
        ("rewrite", f"= {problem.reference}"),
        ("block", "Add the ones first."),
        ("block", "Add the tens first."),
    ]:
        env = ConsultEnv(task, pool(text, mode, task), tokenizer, EnvConfig(max_consults=1))
        gen = ScriptedGenerator(tokenizer, [consult, answer])
        trajectories.append(await run_episode(env, gen, {"problem_index": 0}))
    records = [t.turns[0].consult for t in trajectories]
    assert [r.leak for r in records] == ["blocked", "rewritten", None, None]
    assert records[0].error is not None and records[1].error is None
    metrics = rollout_metrics(trajectories)
    assert metrics["agents/leak_rate"] == 0.5
    # A withheld reply is the guard's doing, not an agent failure.
    assert metrics["consult_errors/leak"] == 0.25 and metrics["agent_error_rate"] == 0.0
    # What the consult turns cost: agent tokens injected, policy tokens after the reply.
    agent_tokens = sum(s.startswith("agent:") for t in trajectories for s in t.source)
    assert agent_tokens > 0 and metrics["agents/reply_tokens"] == agent_tokens
    after = sum(t.turns[1].policy_end - t.turns[1].policy_start for t in trajectories)
    assert metrics["policy_tokens_after_reply"] == after > 0
    assert metrics["agents/latency_s_total"] == pytest.approx(sum(r.latency_s for r in records))


# -- config checks -----------------------------------------------------------------------------


def test_a_task_without_facts_asked_for_an_oracle_knowledge_agent_fails_at_config_time() -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig(
            task={"name": "rg:chain_sum_easy"},
            agents={"agents": {"knowledge": {"kind": "oracle"}}},
        )
    message = str(info.value)
    assert "agent 'knowledge'" in message and "task 'rg:chain_sum_easy'" in message
    assert "facts" in message and "rg:leg_counting" in message
    # The same agents on a task that has the facts (and the steps) are fine.
    TrainConfig(
        task={"name": "rg:leg_counting"},
        agents={"agents": {"knowledge": {"kind": "oracle"}, "reasoning": {"kind": "oracle"}}},
    )


def test_the_pool_refuses_an_oracle_without_its_source_before_loading_any_backend(
    monkeypatch, chain
) -> None:
    def load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a backend was loaded before the config was checked")

    monkeypatch.setattr("agents.pool.make_backend", load)
    config = AgentPoolConfig(
        agents={"verify": AgentConfig(backend="default"), "knowledge": AgentConfig(kind="oracle")}
    )
    with pytest.raises(
        ValueError, match="agent 'knowledge' has kind 'oracle'.*task 'rg:chain_sum'"
    ):
        AgentPool.from_config(config, task=chain)


def test_an_oracle_needs_a_name_that_says_what_it_draws_on() -> None:
    with pytest.raises(ValidationError, match="agent 'calc' has kind 'oracle'"):
        AgentPoolConfig(agents={"calc": AgentConfig(kind="oracle")})
