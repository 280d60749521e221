"""lm-evaluation-harness as a real client of the server: a log-likelihood task through
`local-completions` (token ids, `echo`, `logprobs`) and a generate-until task through
`local-chat-completions`, over toy-world facts this test writes, against the toy family
served in-process. lm-eval's per-choice log-likelihoods, greedy flags, generations and
accuracies must equal the same computation in-process (`EFTDecoder.score`, the chat core).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from eft_integrations.chat import chat
from eft_integrations.serve import BackgroundServer, build_app
from eft_integrations.toyworld import paths
from eft_integrations.toyworld.world import World

lm_eval = pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.toy, pytest.mark.slow]

MODEL = "eft"
DOCS = 16
STOP = "\n\n"
MAX_TOKENS = 24
WEIGHTS = {"helpful": 2.0, "harmless": 1.0}  # amplified: some answers go wrong, as they should


@pytest.fixture(scope="module")
def toy():
    try:
        return paths.load_decoder(default_weights=WEIGHTS)
    except FileNotFoundError:
        pytest.skip("toy-world weights not shipped")


@pytest.fixture(scope="module")
def server(toy):
    with BackgroundServer(build_app(toy, served_model_name=MODEL)) as running:
        yield running


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Two lm-eval tasks over held-out toy-world kingdoms: pick the capital among four
    (multiple choice, log-likelihoods) and answer a question in chat (generate-until)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    world = World.generate(0)
    rng = random.Random(0)
    capitals = [e.capital for e in world.entities]
    choices_rows, questions = [], []
    for entity in world.heldout_entities[:DOCS]:
        choices = [*rng.sample([c for c in capitals if c != entity.capital], 3), entity.capital]
        rng.shuffle(choices)
        context = f"The capital of {entity.name} is"
        choices_rows.append(
            {"context": context, "choices": choices, "label": choices.index(entity.capital)}
        )
    for question in world.eval_questions(DOCS // 2):
        if question.attribute == "capital":
            questions.append({"question": question.text, "answer": question.reference})
    for name, rows in (("capitals", choices_rows), ("questions", questions)):
        with open(folder / f"{name}.jsonl", "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "toy_capitals.yaml").write_text(
        "task: toy_capitals\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'capitals.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "toy_questions.yaml").write_text(
        "task: toy_questions\n"
        + common
        + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'questions.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n  max_gen_toks: {MAX_TOKENS}\n"
        "  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def near_tie(score) -> list[float]:
    """Per position, the gap between its two most likely tokens."""
    return [top[0] - top[1] for top in (list(t.values()) for t in score.top_logprobs)]


def evaluate(server, tasks: Path, task: str, model: str, **model_args: str):
    from lm_eval.tasks import TaskManager

    args = {"model": MODEL, "num_concurrent": "1", "max_retries": "1", **model_args}
    return lm_eval.simple_evaluate(
        model=model,
        model_args=",".join(f"{k}={v}" for k, v in args.items()),
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        apply_chat_template=model == "local-chat-completions",
    )


def test_lm_eval_log_likelihoods_equal_score_in_process(server, tasks, toy, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tokenizer = paths.model_dir("small-base")
    out = evaluate(
        server,
        tasks,
        "toy_capitals",
        "local-completions",
        base_url=f"{server.url}/v1/completions",
        tokenizer=str(tokenizer),
        tokenizer_backend="huggingface",
    )
    samples = out["samples"]["toy_capitals"]
    assert len(samples) == DOCS
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        # lm-eval's split: the context's tokens, then the rest of context + continuation
        context = toy.tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        wholes = [
            toy.tokenizer(doc["context"] + " " + c, add_special_tokens=False)["input_ids"]
            for c in doc["choices"]
        ]
        scores = toy.score(
            [context] * len(wholes), [w[len(context) :] for w in wholes], top_logprobs=2
        )
        theirs = [(float(lp), flag in (True, "True")) for lp, flag in sample["filtered_resps"]]
        assert [s.total for s in scores] == pytest.approx([lp for lp, _ in theirs], abs=1e-4)
        for score, (_, greedy) in zip(scores, theirs, strict=True):
            # the server scores each request alone, here they are one batch: a near-tie
            # for the most likely token may fall either way (float rounding), nothing else
            assert score.greedy == greedy or min(near_tie(score)) < 1e-4, (doc, score)
        best = max(range(len(scores)), key=lambda i: scores[i].total)
        correct += best == doc["label"]
    assert out["results"]["toy_capitals"]["acc,none"] == pytest.approx(correct / DOCS)


def test_lm_eval_generations_equal_the_chat_core(server, tasks, toy, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = evaluate(
        server,
        tasks,
        "toy_questions",
        "local-chat-completions",
        base_url=f"{server.url}/v1/chat/completions",
    )
    samples = out["samples"]["toy_questions"]
    assert samples
    matches = 0
    for sample in samples:
        doc = sample["doc"]
        ours = chat(
            toy,
            [{"role": "user", "content": doc["question"]}],
            temperature=0.0,
            max_new_tokens=MAX_TOKENS,
            stop=[STOP],
        ).content
        assert sample["resps"][0][0] == ours
        matches += ours == doc["answer"]
    assert out["results"]["toy_questions"]["exact_match,none"] == pytest.approx(
        matches / len(samples)
    )
