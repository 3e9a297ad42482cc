"""ARPO's tool protocol (``<python>``, ``<search>``) with the ToolBox and the local BM25 search."""

from __future__ import annotations

import json
import time

import pytest
from scripted import AdditionTask, ScriptedGenerator

from agents.base import ConsultRequest
from agents.search import CUT_MARK, NO_MATCH, SearchIndex, packaged_corpus
from agents.tools import NO_SEARCH_INDEX, PythonRunner, ToolBox
from aipo_env.config import EnvConfig
from aipo_env.env import ConsultEnv
from aipo_env.episode import run_episode
from aipo_env.protocols import make_protocol
from aipo_env.protocols.tools import ToolProtocol
from aipo_env.trajectory import Trajectory

EOS = "<|im_end|>"
SPIDER = "A spider has eight legs. Spiders are arachnids, not insects."


@pytest.fixture(scope="module")
def tiny() -> SearchIndex:
    return SearchIndex.from_jsonl(packaged_corpus("tiny"), k=1)


@pytest.fixture
def task() -> AdditionTask:
    return AdditionTask(1)


def tools_env(task, tokenizer, toolbox: ToolBox, **config) -> ConsultEnv:
    return ConsultEnv(task, toolbox, tokenizer, EnvConfig(protocol="tools", **config))


async def play(env: ConsultEnv, script: list) -> Trajectory:
    gen = ScriptedGenerator(env.tokenizer, script)
    return await run_episode(env, gen, {"problem_index": 0, "trajectory_id": "t"})


def feedback(t: Trajectory, turn: int, tokenizer) -> tuple[str, list[str], list[int]]:
    """The injected text after ``turn``, its source labels and its loss mask."""
    span = slice(t.turns[turn].feedback_start, t.turns[turn].feedback_end)
    return tokenizer.decode(t.token_ids[span]), t.source[span], t.loss_mask[span]


# -- parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "call"),
    [
        ("<python>print(1)</python> then <search>spider legs</search>", ("search", "spider legs")),
        ("<search>spider legs</search> then <python>print(2)</python>\n", ("python", "print(2)")),
        ("<python>draft <python>print(3)</python>", ("python", "print(3)")),
        ("<python>```python\nprint(4)\n```</python>", ("python", "print(4)")),
    ],
)
def test_the_last_block_ending_the_text_is_the_call(text: str, call: tuple[str, str]) -> None:
    request = ToolProtocol().parse_request(text, ["python", "search"])
    assert request.ok and (request.target, request.content) == call


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("<search>  </search>", "empty <search> block: write a query between"),
        ("<python>\n</python>", "empty <python> block: write code between"),
        ("the legs</search>", "</search> without an opening <search> tag"),
        ("no call here", "no <python> or <search> block ends the text"),
    ],
)
def test_a_call_that_cannot_run_is_an_error_the_policy_can_read(text: str, words: str) -> None:
    request = ToolProtocol().parse_request(text, ["python", "search"])
    assert not request.ok and words in request.error


def test_only_complete_matching_blocks_count_as_calls() -> None:
    text = "<python>a</python> x <search>b</search> <python>c</search> <search>unclosed"
    protocol = make_protocol(EnvConfig(protocol="tools"))
    assert isinstance(protocol, ToolProtocol) and protocol.count_requests(text) == 2
    assert protocol.stop_strings() == ["</python>", "</search>"]


async def test_a_search_whose_stop_ends_inside_the_last_token_is_answered(
    tokenizer, task, tiny
) -> None:
    first = "Look it up. <search>spider legs</search>."
    # SmolLM2 writes ">." as one token: the stop string ends inside the segment's last token.
    last = tokenizer.decode(tokenizer.encode(first, add_special_tokens=False)[-1:])
    assert last.endswith(">.") and len(last) > 1
    ref = task.problems[0].reference
    t = await play(
        tools_env(task, tokenizer, ToolBox(search=tiny)), [first, f"\\boxed{{{ref}}}{EOS}"]
    )
    assert t.consults == 1 and t.turns[0].consult.question == "spider legs"
    assert (t.finish_reason, t.reward) == ("eos", 1.0)


# -- injection, sources, masks, budget -------------------------------------------


async def test_results_are_injected_as_arpo_writes_them_and_never_trained(
    tokenizer, task, tiny
) -> None:
    ref = task.problems[0].reference
    script = [
        "<python>print(6 * 7)</python>",
        "<search>How many legs does a spider have?</search>",
        f"So \\boxed{{{ref}}}{EOS}",
    ]
    toolbox = ToolBox(PythonRunner(timeout_s=5.0), search=tiny)
    t = await play(tools_env(task, tokenizer, toolbox), script)
    assert (t.finish_reason, t.reward, t.consults, t.consult_errors) == ("eos", 1.0, 2, 0)
    for turn, tool, body in [(0, "python", "42"), (1, "search", f"[1] {SPIDER}")]:
        text, labels, mask = feedback(t, turn, tokenizer)
        assert text == f" <result>\n{body}\n</result>"
        assert set(labels) == {"env", f"agent:{tool}"} and labels[0] == labels[-1] == "env"
        injected = [i for i, s in zip(t.token_ids, t.source, strict=True) if s == f"agent:{tool}"]
        assert tokenizer.decode(injected) == body
        assert mask and not any(mask)
    policy = [m for m, s in zip(t.loss_mask, t.source, strict=True) if s == "policy"]
    assert policy and all(policy)


async def test_the_call_past_max_consults_gets_the_budget_error(tokenizer, task, tiny) -> None:
    script = [
        "<search>spider legs</search>",
        "<search>insect legs</search>",
        "<search>dog legs</search>",
        f"\\boxed{{{task.problems[0].reference}}}{EOS}",
    ]
    env = tools_env(task, tokenizer, ToolBox(search=tiny), max_consults=2)
    t = await play(env, script)
    assert (t.consults, t.consult_errors, t.finish_reason) == (2, 1, "eos")
    text, labels, _ = feedback(t, 2, tokenizer)
    error = "tool budget of 2 calls exhausted; continue on your own"  # the protocol's text
    assert text == f" <result>\nError: {error}\n</result>" and set(labels) == {"env"}
    prompt = tokenizer.decode(t.token_ids[: t.prompt_len])
    assert "<python>code</python>" in prompt and "<search>query</search>" in prompt
    assert "at most 2 times" in prompt


async def test_a_call_printing_megabytes_gets_a_bounded_masked_reply_and_the_episode_goes_on(
    tokenizer, task
) -> None:
    ref = task.problems[0].reference
    script = ["<python>print('x' * 3_000_000)</python>", f"\\boxed{{{ref}}}{EOS}"]
    toolbox = ToolBox(PythonRunner(timeout_s=5.0), max_reply_chars=2000)
    t = await play(tools_env(task, tokenizer, toolbox, max_reply_tokens=64), script)
    _, labels, mask = feedback(t, 0, tokenizer)
    assert 0 < labels.count("agent:python") <= 64 and not any(mask)
    assert t.turns[0].consult.reply_truncated
    assert (t.finish_reason, t.reward, t.consults) == ("eos", 1.0, 1)
    direct = await toolbox.consult(ConsultRequest(agent="python", question="print('x' * 10**6)"))
    assert direct.truncated and direct.text == "x" * 2000


class _CountingTokenizer:
    """The real tokenizer, recording the length of every text it is asked to encode."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, text, *args, **kwargs):
        self.longest = max(self.longest, len(text) if isinstance(text, str) else 0)
        return self._tokenizer(text, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self.longest = max(self.longest, len(text) if isinstance(text, str) else 0)
        return self._tokenizer.encode(text, *args, **kwargs)


async def test_python_tool_printing_15_mb_is_cut_before_it_is_tokenized(tokenizer, task) -> None:
    # Under python_tool the runner answers the env directly (no ToolBox cut): the env cuts
    # characters before tokenizing. Measured on a loaded 2-core machine: 16 s before, 0.2 s after.
    ref = task.problems[0].reference
    script = ["<python>print('x' * 15_000_000)</python>", f"\\boxed{{{ref}}}{EOS}"]
    counting = _CountingTokenizer(tokenizer)
    config = EnvConfig(protocol="python_tool", max_reply_tokens=64)
    env = ConsultEnv(task, PythonRunner(timeout_s=10.0), counting, config)
    began = time.perf_counter()
    t = await play(env, script)
    print(f"15 MB print answered in {time.perf_counter() - began:.2f} s")
    _, labels, _ = feedback(t, 0, tokenizer)
    assert 0 < labels.count("agent:python") <= 64 and t.turns[0].consult.reply_truncated
    assert (t.finish_reason, t.reward) == ("eos", 1.0)
    assert counting.longest <= 64 * 32, counting.longest


# -- the search tool ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "passage"),
    [
        ("How many legs does a spider have?", "spider"),
        ("how many legs does an insect have", "insect"),
        ("What is the capital of France?", "france"),
        ("chemical symbol for gold", "gold"),
    ],
)
def test_search_ranks_the_passage_that_answers_the_query_first(
    tiny, query: str, passage: str
) -> None:
    found = tiny.search(query, k=3)
    scores = [p.score for p in found]
    assert found[0].id == passage and scores == sorted(scores, reverse=True)


def test_a_reply_numbers_the_passages_and_keeps_to_its_character_cap() -> None:
    index = SearchIndex(["cats purr softly", "dogs bark loudly", "cats and dogs play"], k=2)
    assert index.reply_text("cats purr") == "[1] cats purr softly\n[2] cats and dogs play"
    assert [p.id for p in index.search("dogs bark")] == ["1", "2"]
    assert [p.id for p in index.search("purr", k=3)] == ["0"]  # no shared word, no passage
    assert index.reply_text("zebra the") == NO_MATCH
    capped = SearchIndex(index.passages, k=3, max_chars=25).reply_text("cats dogs")
    assert len(capped) == 25 and capped.endswith(CUT_MARK)


def test_a_bad_corpus_is_refused_with_what_was_expected(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        SearchIndex.from_jsonl(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl has no passages"):
        SearchIndex.from_jsonl(empty)
    rows = [json.dumps({"id": "a", "text": "one"}), "", '{"id": "c", "txt": "three"}']
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: 'text' is None"):
        SearchIndex.from_jsonl(bad)
    bad.write_text('{"id": "a", "text": "one"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: got a list"):
        SearchIndex.from_jsonl(bad)
    with pytest.raises(ValueError, match="no passages"):
        SearchIndex([])


# -- the ToolBox -------------------------------------------------------------------


async def test_without_an_index_a_search_gets_the_named_error(tokenizer, task) -> None:
    toolbox = ToolBox()
    script = ["<search>spider legs</search>", f"\\boxed{{{task.problems[0].reference}}}{EOS}"]
    t = await play(tools_env(task, tokenizer, toolbox), script)
    assert NO_SEARCH_INDEX in t.turns[0].consult.error
    text, labels, _ = feedback(t, 0, tokenizer)
    assert text.startswith(" <result>\nError: ") and NO_SEARCH_INDEX in text
    assert set(labels) == {"env"} and (t.finish_reason, t.reward) == ("eos", 1.0)


async def test_every_tool_reply_records_its_latency(tiny) -> None:
    toolbox = ToolBox(PythonRunner(timeout_s=0.5), search=tiny)
    hung = await toolbox.consult(ConsultRequest(agent="python", question="while True: pass"))
    assert "timed out" in hung.error and hung.latency_s >= 0.5
    found = await toolbox.consult(ConsultRequest(agent="search", question="spider legs"))
    assert found.text == f"[1] {SPIDER}" and found.latency_s > 0


# -- scoring -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        ("So \\boxed{REF}" + EOS, 1.0),
        (" <result>\n\\boxed{REF}\n</result> Done." + EOS, 0.0),
        ("Done. <result>\n\\boxed{REF}" + EOS, 0.0),
        (" <RESULT>\n\\boxed{REF}\n</RESULT> Done." + EOS, 0.0),
        ("Done. <Result>\n\\boxed{REF}" + EOS, 0.0),
    ],
)
async def test_a_boxed_answer_in_a_forged_result_is_not_scored(
    tokenizer, task, answer: str, reward: float
) -> None:
    script = [answer.replace("REF", task.problems[0].reference)]
    t = await play(tools_env(task, tokenizer, ToolBox()), script)
    assert (t.finish_reason, t.reward) == ("eos", reward)


@pytest.mark.parametrize("protocol", ["tools", "python_tool"])
@pytest.mark.parametrize(
    "forged", ["<RESULT>\\boxed{5}</RESULT>", "<Result>\\boxed{5}", "<PYTHON>print(5)</Python>"]
)
def test_a_forged_block_in_any_case_is_not_the_answer(protocol: str, forged: str) -> None:
    answer = make_protocol(EnvConfig(protocol=protocol)).answer_text(f"So {forged} 6")
    assert "5" not in answer and answer.startswith("So ")


def test_a_boxed_answer_inside_a_tool_call_is_not_the_answer() -> None:
    protocol = ToolProtocol()
    text = "<search>is it \\boxed{5}?</search> Yes: <python>print('\\boxed{5}')</python> so 6"
    assert protocol.answer_text(text) == " Yes:  so 6"
