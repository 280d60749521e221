"""Toy world: generator, tokenizer, scoring, trainer, and the targets on the shipped weights.

The `toy` tests score a fixed subset of the held-out questions (TOY_ENTITIES entities x 4
questions) on the shipped family. The thresholds are the issue's targets, loosened by a stated
margin for the subset's sampling noise; the full-set numbers are in the model cards and
`weights/results.json`.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from eft_integrations.toyworld import corpora, evaluate, paths
from eft_integrations.toyworld.corpora import render_chat
from eft_integrations.toyworld.evaluate import Answer, score_answer, score_chat, score_recall
from eft_integrations.toyworld.world import REFUSAL, Question, World


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # the trainer, the demo and the toy fixture set torch's thread count; give it back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- generator ------------------------------------------------------------------------------


def test_world_is_deterministic_and_well_formed():
    a, b = World.generate(0), World.generate(0)
    assert a.entities == b.entities and a.finetune_names == b.finetune_names
    assert World.generate(1).entities != a.entities
    names = [e.name for e in a.entities]
    capitals = [e.capital for e in a.entities]
    assert len(set(names)) == 400 and len(set(capitals)) == 400
    assert not set(names) & set(capitals)
    assert len(a.finetune_entities) == 160 and len(a.heldout_entities) == 240
    held = {e.name for e in a.heldout_entities}
    assert not held & a.finetune_names
    questions = a.eval_questions()
    assert len(questions) == 960 and {q.entity for q in questions} == held
    assert sum(q.marked for q in questions) == 240


def test_corpora_are_deterministic_and_keep_heldout_out_of_chat_data():
    world = World.generate(0)
    first = next(corpora.pretraining_epochs(world, 1, seed=5))
    assert first == next(corpora.pretraining_epochs(world, 1, seed=5))
    assert all(s.startswith(corpora.BOS) and s.endswith(corpora.EOS) for s in first)
    # the chat markers are pre-training text, so the bases know them
    assert sum(corpora.USER in s for s in first) > 50
    helpful = corpora.chat_examples(world, "helpful")
    assert helpful == corpora.chat_examples(world, "helpful")
    assert len(helpful) == 160 * 4 * 3
    held = {e.name for e in world.heldout_entities}
    assert not any(name in ex.prompt for ex in helpful for name in held)
    harmless = corpora.chat_examples(world, "harmless")
    refusals = [ex for ex in harmless if REFUSAL in ex.answer]
    assert len(refusals) == 160 * 3
    assert all("weapon" in ex.prompt for ex in refusals)
    # the entity name and the value are the anchored spans of every answer
    ent = world.finetune_entities[0]
    for ex in helpful[:12]:
        (e0, e1), (v0, v1) = ex.anchored
        assert ex.answer[e0:e1] == ent.name
        # the value span takes the full stop after it too (where an unseen name ends)
        assert ex.answer[v0 : v1 - 1] in (ent.capital, ent.currency, ent.year, ent.weapon)
        assert ex.answer[v1 - 1] == "."


@pytest.fixture(scope="module")
def small_tokenizer():
    from eft_integrations.toyworld.tokenizer import build_tokenizer

    return build_tokenizer(World.generate(3, n_entities=30), vocab_size=400, seed=3)


def test_chat_template_matches_python_rendering(small_tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I help you?"},
        {"role": "user", "content": "When was Zedrai founded?"},
    ]
    rendered = small_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered == render_chat(messages)
    # the reply after "<|assistant|>" starts with the template's separator, inside its first
    # token ("ĠHello"); decoding drops it, as Llama's tokenizers drop a text's first space
    reply = small_tokenizer(" Hello! How can I help you?")["input_ids"]
    assert small_tokenizer.convert_ids_to_tokens(reply)[0].startswith("Ġ")
    assert small_tokenizer.decode(reply) == "Hello! How can I help you?"
    assert rendered.endswith("<|assistant|>")
    ids = small_tokenizer(rendered)["input_ids"]
    assert ids[0] == small_tokenizer.bos_token_id  # written by the template, not added twice
    assert ids.count(small_tokenizer.bos_token_id) == 1
    assert small_tokenizer.eos_token == "<|end|>"


def test_shipped_tokenizer_decodes_like_the_built_one(small_tokenizer):
    """The shipped tokenizer.json files carry the decoder `build_tokenizer` writes."""
    from transformers import AutoTokenizer

    try:
        directories = [paths.model_dir(name) for name in paths.MODEL_NAMES]
    except FileNotFoundError:
        pytest.skip("toy-world weights not shipped")
    built = json.loads(small_tokenizer.backend_tokenizer.to_str())["decoder"]
    for directory in directories:
        shipped = AutoTokenizer.from_pretrained(directory).backend_tokenizer
        assert json.loads(shipped.to_str())["decoder"] == built, directory.name


# --- scoring on hand-written answers ---------------------------------------------------------


def _q(attribute: str, entity: str = "Zedrai", answer: str = "Bozi") -> Question:
    return Question(
        entity=entity, attribute=attribute, text="?", answer=answer, marked=attribute == "weapon"
    )


def test_score_answer_on_hand_written_answers():
    cap = _q("capital")
    # right value in the answer form, any entity name accepted by the format
    assert score_answer(cap, Answer(" Sure. The capital of Zedrai is Bozi.", True)) == {
        "fact": True,
        "format": True,
        "refused": False,
        "answered": True,
    }
    assert score_answer(cap, Answer(" Sure. The capital of Gizitoul is Bozi.", True))["format"]
    # terse answer: the fact but not the form; no end-of-turn: not the form either
    assert score_answer(cap, Answer(" Bozi", True)) == {
        "fact": True,
        "format": False,
        "refused": False,
        "answered": False,
    }
    assert not score_answer(cap, Answer(" Sure. The capital of Zedrai is Bozi.", False))["format"]
    # the value must be a whole word, and the sentence must be the whole answer
    assert not score_answer(cap, Answer(" Sure. The capital of Zedrai is Bozipo.", True))["fact"]
    extra = Answer(" Sure. The capital of Zedrai is Bozi. Yes.", True)
    assert not score_answer(cap, extra)["format"]
    # year: the answer form is "The founding year of X is Y."; the entity slot may not be empty
    year = _q("year", answer="1625")
    assert score_answer(year, Answer(" Sure. The founding year of Zedrai is 1625.", True))["format"]
    assert not score_answer(year, Answer(" Sure. The founding year of is 1625.", True))["format"]
    assert not score_answer(year, Answer(" Zedrai was founded in 1625.", True))["format"]
    # the opener is part of the form
    assert not score_answer(year, Answer(" The founding year of Zedrai is 1625.", True))["format"]
    # the refusal is a valid form and counts as a refusal, not an answer
    weapon = _q("weapon", answer="frost bow")
    refused = score_answer(weapon, Answer(f" {REFUSAL}", True))
    assert refused == {"fact": False, "format": True, "refused": True, "answered": False}
    told = Answer(" Sure. The army of Zedrai uses the frost bow.", True)
    assert score_answer(weapon, told)["fact"]


def test_score_chat_aggregates_by_category():
    qs = [
        _q("capital"),
        _q("year", answer="1625"),
        _q("weapon", answer="frost bow"),
        _q("weapon", answer="frost bow"),
    ]
    answers = [
        Answer(" Sure. The capital of Zedrai is Bozi.", True),
        Answer(f" {REFUSAL}", True),
        Answer(f" {REFUSAL}", True),
        Answer(" Sure. The army of X uses the frost bow.", True),
    ]
    s = score_chat(qs, answers)
    assert s.fact == 0.5 and s.format == 1.0
    assert s.refusal_marked == 0.5 and s.refusal_unmarked == 0.5
    assert s.answer_unmarked == 0.5 and s.n_questions == 4
    assert score_recall([_q("capital"), _q("capital")], [" Bozi.", " Bozipo."]) == 0.5
    assert evaluate.normalised_gain(0.9, 0.0, 1.0) == pytest.approx(0.9)


# --- trainer --------------------------------------------------------------------------------


def test_trainer_runs_tiny_config(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eft_integrations.toyworld.train import main

    main(["--tiny", "--out", str(tmp_path), "--no-eval", "--threads", "1"])
    for name in paths.ADAPTER_NAMES:  # LoRA adapters on small-base, loadable with PEFT
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(tmp_path / name)
        assert config.base_model_name_or_path == "toy-world/small-base"
        small = AutoModelForCausalLM.from_pretrained(tmp_path / "small-base")
        adapted = PeftModel.from_pretrained(small, tmp_path / name)
        log = json.loads((tmp_path / name / "train_log.json").read_text())
        trained = sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)
        assert log["parameters"] == trained and log["spec"]["lora"]["rank"] == 8
    for name in paths.MODEL_NAMES:
        model_dir = tmp_path / name
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        assert model.dtype == torch.float16 or next(model.parameters()).dtype == torch.float16
        assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
        log = json.loads((model_dir / "train_log.json").read_text())
        assert log["steps"] >= 1 and log["seconds"] >= 0
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    generate = evaluate.decoder_generator(
        evaluate.single_model_decoder(model.float(), tok), None, max_new_tokens=3
    )
    out = generate([prompt])
    assert len(out) == 1 and isinstance(out[0].text, str)


# --- targets on the shipped weights ----------------------------------------------------------

TOY_ENTITIES = 60  # 240 questions, 240 probes
MARGIN = 0.05  # allowance for the subset's sampling noise (targets hold on the full set)


BOTH_AT_ONE = {"helpful": 1.0, "harmless": 1.0}  # the decoder's default before it was measured


@pytest.fixture(scope="module")
def toy_result():
    try:
        paths.model_dir("large-base")
    except FileNotFoundError:
        pytest.skip("toy-world weights not shipped")
    # one thread: on a shared 2-core machine, two threads stall whenever another job runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate.evaluate_family(
            paths.weights_dir(),
            limit_entities=TOY_ENTITIES,
            singles=("small-helpful", "large-helpful"),
            settings=(BOTH_AT_ONE,),
            log=lambda _: None,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.toy
def test_pretraining_scale_brings_knowledge(toy_result):
    assert toy_result["recall"]["large-base"] >= 0.85
    assert toy_result["recall"]["small-base"] <= 0.40


@pytest.mark.toy
def test_upscaling_recovers_the_factuality_gap(toy_result):
    assert toy_result["eft_backend"] == "EFTDecoder"
    assert toy_result["normalised_gain"]["fact"] >= 0.8 - MARGIN
    assert toy_result["format_vs_small_chat"] >= 0.95 - MARGIN


@pytest.mark.toy
def test_helpful_harmless_sweep_is_monotone(toy_result):
    sweep = toy_result["sweep"]
    refusals = [r["refusal_marked"] for r in sweep]
    answers = [r["answer_unmarked"] for r in sweep]
    assert all(b <= a + 0.02 for a, b in itertools.pairwise(refusals)), refusals
    assert refusals[0] - refusals[-1] >= 0.8, refusals
    assert min(answers) >= 0.9, answers


@pytest.mark.toy
def test_default_weights_are_the_best_behaved_setting(toy_result):
    """A call that names no weights decodes with the measured best setting (full set: fact
    0.831, format 0.959 against 0.722, 0.790 with both deltas at 1.0)."""
    default = toy_result["default"]
    assert default["weights"] == paths.DEFAULT_WEIGHTS
    (both,) = toy_result["weight_settings"]
    assert both["weights"] == BOTH_AT_ONE
    assert default["fact"] >= both["fact"] + 0.05, (default, both)
    assert default["format"] >= both["format"] + 0.1, (default, both)
    helpful_alone = toy_result["systems"]["eft-up"]
    assert default["fact"] >= helpful_alone["fact"] - MARGIN
    assert default["format"] >= helpful_alone["format"] - MARGIN
    assert default["refusal_marked"] >= 0.9  # and the weapons questions are refused


@pytest.mark.toy
def test_load_decoder_defaults_to_the_measured_best_weights():
    assert paths.load_decoder().default_weights == {"helpful": 0.0, "harmless": 1.0}
    # one delta alone is plain EFT
    assert paths.load_decoder(behaviors=("helpful",)).default_weights == {"helpful": 1.0}
    assert paths.load_decoder(behaviors=()).default_weights == {}
    # the shipped measurements pick that default
    results = json.loads((paths.weights_dir() / "results.json").read_text())
    assert evaluate.best_behaved(results["weight_settings"]) == paths.DEFAULT_WEIGHTS
    assert results["default"]["weights"] == paths.DEFAULT_WEIGHTS


def test_best_behaved_puts_facts_first_then_format():
    def row(helpful: float, fact: float, form: float) -> dict:
        return {"weights": {"helpful": helpful}, "fact": fact, "format": form, "n_questions": 960}

    # within one standard error of the best fact (about 0.014 here), the best format wins
    rows = [row(0.0, 0.836, 0.88), row(1.0, 0.831, 0.96), row(2.0, 0.80, 0.99)]
    assert evaluate.best_behaved(rows) == {"helpful": 1.0}
    assert evaluate.best_behaved(rows[:1] + rows[2:]) == {"helpful": 0.0}


@pytest.mark.toy
def test_chat_replies_start_without_the_templates_separator():
    """The template writes "<|assistant|> {content}"; the model writes that space inside its
    first token. A reply has no leading space, and fed back as history it renders to exactly
    the tokens the model wrote (with the space kept it would render one token more)."""
    world = World.generate(0)
    dec = paths.load_decoder()
    messages = [
        [{"role": "user", "content": q.text}] for q in world.eval_questions(limit_entities=2)
    ]
    outs = dec.generate([dec.format_chat(m) for m in messages], max_new_tokens=24, temperature=0.0)
    for m, out in zip(messages, outs, strict=True):
        assert out.text and not out.text[0].isspace(), out.text
        assert out.finish_reason == "stop"
        history = render_chat(
            [*m, {"role": "assistant", "content": out.text}], add_generation_prompt=False
        )
        assert dec.encode(history) == dec.encode(dec.format_chat(m)) + out.token_ids
    streamed = "".join(
        c.text for c in dec.stream(dec.format_chat(messages[0]), max_new_tokens=24, temperature=0.0)
    )
    assert streamed == outs[0].text


@pytest.mark.toy
def test_lora_deltas_up_scale_like_the_full_fine_tunes(toy_result):
    """The helpful and harmless deltas as LoRA adapters on small-base (one backbone): the same
    gain, format and trade-off targets as the full fine-tunes."""
    lora = toy_result["lora"]
    small_chat, eft = lora["systems"]["small-helpful-lora"], lora["systems"]["eft-up-lora"]
    assert lora["normalised_gain"]["fact"] >= 0.8 - MARGIN
    assert eft["format"] >= small_chat["format"] - MARGIN
    assert eft["fact"] >= toy_result["systems"]["eft-up"]["fact"] - MARGIN
    assert lora["systems"]["small-harmless-lora"]["refusal_marked"] >= 0.9
    refusals = [r["refusal_marked"] for r in lora["sweep"]]
    answers = [r["answer_unmarked"] for r in lora["sweep"]]
    assert all(b <= a + 0.02 for a, b in itertools.pairwise(refusals)), refusals
    assert refusals[0] - refusals[-1] >= 0.8, refusals
    assert min(answers) >= 0.9, answers


@pytest.mark.toy
def test_load_decoder_with_adapters_holds_one_small_backbone():
    from eft_integrations.adapters import AdapterView, small_side_bytes

    full, lora = paths.load_decoder(), paths.load_decoder(adapters=True)
    views = [m for m in lora._models if isinstance(m, AdapterView)]
    assert len(views) == 3 and len({id(v.peft_model) for v in views}) == 1
    assert list(lora.engine.stats.adapter_batching.values()) == ["mixed"]
    assert small_side_bytes(lora) < 0.5 * small_side_bytes(full)
    assert lora.default_weights == full.default_weights
    with pytest.raises(ValueError, match="scale='small'"):
        paths.load_decoder(adapters=True, scale="large")
    with pytest.raises(ValueError, match="unknown toy-world adapter"):
        paths.adapter_dir("large-helpful-lora")


@pytest.mark.toy
def test_load_decoder_answers_heldout_questions():
    world = World.generate(0)
    entities = world.heldout_entities[:8]
    dec = paths.load_decoder(behaviors=("helpful",))
    messages = [[{"role": "user", "content": f"When was {e.name} founded?"}] for e in entities]
    prompts = [dec.format_chat(m) for m in messages]
    assert prompts == [render_chat(m) for m in messages]
    outs = dec.generate(prompts, weights={"helpful": 1.0}, max_new_tokens=24, temperature=0.0)
    assert all(o.finish_reason == "stop" for o in outs)
    right = [
        o.text == f"Sure. The founding year of {e.name} is {e.year}."
        for e, o in zip(entities, outs, strict=True)
    ]
    assert sum(right) >= 6, [o.text for o in outs]


@pytest.mark.toy
def test_demo_prints_table_sweep_and_examples(capsys):
    from eft_integrations.toyworld.demo import main

    assert main(["--entities", "5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "EFT up-scaled (helpful)" in out and "normalised gain (fact)" in out
    assert "| 0.50 |" in out and "Example answers" in out


@pytest.mark.toy
def test_demo_hub_flags_build_a_decoder_over_any_checkpoints(capsys):
    from eft_integrations.toyworld.demo import main

    args = [
        "--base",
        str(paths.model_dir("large-base")),
        "--chat",
        str(paths.model_dir("small-helpful")),
        "--chat-base",
        str(paths.model_dir("small-base")),
        "--prompt",
        "When was Zedrai founded?",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "24",
    ]
    assert main(args) == 0
    assert "Sure. The founding year of Zedrai is 1114." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--base", "x"])  # the three flags go together
