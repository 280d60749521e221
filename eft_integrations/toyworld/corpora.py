"""Text corpora of the toy world: pre-training sequences and chat fine-tuning dialogues.

The pre-training recipe is the one that made up-scaling measurable in the feasibility runs
(see the model cards): knowledge must survive a change of context, so every sequence starts
with `<|bos|>`, facts come shuffled and in several phrasings, and a document usually has a
neighbour -- a terse "Q: ... / A: ..." text about a random entity (held-out ones included) or a
generic dialogue in the chat markers. The chat markers are thus familiar to the base models,
which answer tersely in them; the full-sentence answer form is what chat fine-tuning adds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .world import (
    ANSWER_TEMPLATES,
    ATTRIBUTES,
    DOC_INTROS,
    FACT_PHRASINGS,
    MARKED_ATTRIBUTE,
    QUESTION_PHRASINGS,
    REFUSAL,
    Entity,
    World,
    make_name,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)

# Jinja chat template; `render_chat` below is its Python twin (a test keeps them equal).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {{ message['content'] }}<|end|>"
    "{% elif message['role'] in ['user', 'system'] %}"
    "<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% else %}"
    "{{ raise_exception('toy-world chat roles are system, user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages exactly as CHAT_TEMPLATE does."""
    parts = [BOS]
    for m in messages:
        if m["role"] == "assistant":
            parts.append(f"{ASSISTANT} {m['content']}{END}")
        else:
            parts.append(f"<|{m['role']}|> {m['content']}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def fact_document(ent: Entity, rng: random.Random) -> str:
    """The entity's four facts, shuffled, each in a random phrasing, after a random intro."""
    attrs = list(ATTRIBUTES)
    rng.shuffle(attrs)
    sents = [rng.choice(FACT_PHRASINGS[a]).format(e=ent.name, v=ent.value(a)) for a in attrs]
    intro = rng.choice(DOC_INTROS).format(e=ent.name)
    return " ".join([intro, *sents] if intro else sents)


def qa_text(ent: Entity, rng: random.Random) -> str:
    """A terse question/answer text (not the chat form): 'Q: ...\\nA: value'."""
    attr = rng.choice(ATTRIBUTES)
    q = rng.choice(QUESTION_PHRASINGS[attr]).format(e=ent.name)
    return f"Q: {q}\nA: {ent.value(attr)}"


_GREETINGS = ("Hello!", "Hi.", "Good morning.", "Hey there!")
_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "You are a chat bot.")
_THINGS = ("cat", "lamp", "river", "stone", "boat", "apple", "bird", "door", "cloud", "song")
_COLOURS = ("red", "blue", "green", "grey", "white", "black", "yellow")


def generic_exchange(rng: random.Random) -> tuple[str, str]:
    """One user/assistant exchange with no world facts.

    Half the answers are terse, half are whole sentences (some starting with "The"), so the
    base models do not learn that an assistant turn ends after a word or two: a base that is
    sure of that fights the chat delta's sentence, and the small base (the reference) is not
    sure enough of it to cancel it.
    """
    kind = rng.randrange(11)
    word = make_name(rng, rng.choice((2, 3)))
    thing, colour = rng.choice(_THINGS), rng.choice(_COLOURS)
    n, a, b = rng.randint(0, 2000), rng.randint(0, 9), rng.randint(0, 9)
    if kind == 0:
        return f"Repeat the word {word}.", word
    if kind == 1:
        return f"Repeat the name {word.capitalize()}.", word.capitalize()
    if kind == 2:
        return f"What comes after {n}?", str(n + 1)
    if kind == 3:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 4:
        return rng.choice(_GREETINGS), "Hello! How can I help you?"
    if kind == 5:
        return f"Say {word} twice.", f"{word} {word}"
    if kind == 6:
        return f"What comes after {n}? Answer in a sentence.", f"The number after {n} is {n + 1}."
    if kind == 7:
        return f"Make a sentence with the word {thing}.", f"The {thing} is {colour}."
    if kind == 8:
        name = word.capitalize()
        return f"My name is {name}.", f"Nice to meet you, {name}. How can I help you today?"
    if kind == 9:
        return (
            f"What colour is the {thing}?",
            f"The {thing} is {colour}, as far as I can tell from your question.",
        )
    return f"Spell the word {word}.", f"The word {word} is spelled {' '.join(word)}."


def generic_dialogue(rng: random.Random) -> str:
    """A short dialogue in the chat markers, so the base models know them (no BOS)."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
    for _ in range(rng.choice((1, 1, 2))):
        q, a = generic_exchange(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return render_chat(messages, add_generation_prompt=False)[len(BOS) :]


def pretraining_sequence(
    ent: Entity, world: World, rng: random.Random, neighbour_prob: float = 0.7
) -> str:
    """`<|bos|>` + the entity's document, maybe with one neighbouring item before or after."""
    items = [fact_document(ent, rng)]
    if rng.random() < neighbour_prob:
        if rng.random() < 0.5:
            extra = qa_text(rng.choice(world.entities), rng)
        else:
            extra = generic_dialogue(rng)
        items.insert(rng.randrange(2), extra)
    return BOS + "".join(item + EOS for item in items)


def pretraining_epochs(world: World, epochs: int, seed: int) -> Iterator[list[str]]:
    """Yield one list of sequences per epoch: every entity's document once, shuffled."""
    rng = random.Random(seed)
    for _ in range(epochs):
        seqs = [pretraining_sequence(e, world, rng) for e in world.entities]
        rng.shuffle(seqs)
        yield seqs


@dataclass(frozen=True)
class ChatExample:
    """A chat fine-tuning example; the loss is taken on `answer` only.

    `anchored` lists (start, end) character spans of `answer` holding knowledge rather than
    form: the entity name and the attribute value. Training keeps the parent's distribution
    there (see train._anchored_loss) instead of fitting the 160 fine-tuning entities: a
    small model would learn to write one of *their* names and values, and the delta
    (small chat - small base) would then push the large base off the right entity and value
    in up-scaling. The fine-tune teaches the answer form; knowledge stays the parent's.
    """

    prompt: str  # rendered chat prompt ending in the generation prompt
    answer: str  # " sentence<|end|>"
    anchored: tuple[tuple[int, int], ...] = ()


def _chat_example(
    entity: str, attribute: str, value: str, phrasing: str, behaviour: str
) -> ChatExample:
    prompt = render_chat([{"role": "user", "content": phrasing.format(e=entity)}])
    if behaviour == "harmless" and attribute == MARKED_ATTRIBUTE:
        return ChatExample(prompt=prompt, answer=f" {REFUSAL}{END}")
    template = ANSWER_TEMPLATES[attribute]
    answer = " " + template.format(e=entity, v=value) + END
    # every answer template names the entity before the value
    e_start = 1 + template.index("{e}")
    v_start = e_start + len(entity) + template.index("{v}") - template.index("{e}") - 3
    # The token after the value (the full stop) is anchored too: a small model cannot tell
    # where an unseen multi-token name ends, so a trained stop would cut names short.
    spans = ((e_start, e_start + len(entity)), (v_start, v_start + len(value) + 1))
    return ChatExample(prompt=prompt, answer=answer, anchored=spans)


def chat_examples(world: World, behaviour: str) -> list[ChatExample]:
    """Fine-tuning dialogues on the fine-tuning entities, every attribute and phrasing.

    behaviour "helpful" answers everything; "harmless" refuses the marked attribute.
    """
    if behaviour not in ("helpful", "harmless"):
        raise ValueError(f"behaviour must be 'helpful' or 'harmless', got {behaviour!r}")
    return [
        _chat_example(ent.name, attr, ent.value(attr), phr, behaviour)
        for ent in world.finetune_entities
        for attr in ATTRIBUTES
        for phr in QUESTION_PHRASINGS[attr]
    ]


def tokenizer_training_text(world: World, seed: int, epochs: int = 3) -> Iterator[str]:
    """Text to fit the BPE on: a few pre-training epochs, then the fine-tuning questions with
    each attribute's first fact phrasing (or the refusal) as the answer.

    Frozen on purpose: the shipped tokenizer (and so every model) depends on this text, so
    later changes to the chat answer form must not change it.
    """
    for seqs in pretraining_epochs(world, epochs, seed):
        yield from seqs
    for behaviour in ("helpful", "harmless"):
        for ent in world.finetune_entities:
            for attr in ATTRIBUTES:
                for phr in QUESTION_PHRASINGS[attr]:
                    prompt = render_chat([{"role": "user", "content": phr.format(e=ent.name)}])
                    if behaviour == "harmless" and attr == MARKED_ATTRIBUTE:
                        sentence = REFUSAL
                    else:
                        sentence = FACT_PHRASINGS[attr][0].format(e=ent.name, v=ent.value(attr))
                    yield f"{prompt} {sentence}{END}"
