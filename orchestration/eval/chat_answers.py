"""Answering the chat benchmarks' questions (MT-Bench, KoMT-Bench): two turns, each question at
its category's temperature, written as FastChat's answer lines (chat_bench.py judges them).

Turn 1 of every question is asked as a user turn of the chat template through the backend's
generate (generative.generate_texts); turn 2 is asked after the question's own turn-1 answer. Each
question is answered at its category's temperature, as FastChat's gen_model_answer.py does
(CATEGORY_TEMPERATURE: greedy for extraction, math, coding and reasoning, 0.1 for stem and
humanities, 0.7 for writing and roleplay), or at the one `--chat-temperature` forces (0: all
greedy). Greedy answers are batched; a sampled one is generated alone from its own seed (the run's
`--seed`, the question, the turn), so the same seed gives the same answers however the questions
are batched or sharded (the price: sampled answers are not batched; a backend taking a seed per
row would lift it). Each answer line keeps FastChat's fields and adds "generate_params"
(temperature, do_sample, top_p, seed, max_new_token), which FastChat's readers pass over.
"""

from __future__ import annotations

import time
import uuid

from orchestration.eval import generative

# The temperature of a question's answers by its category: FastChat's `temperature_config`
# (lm-sys/FastChat fastchat/llm_judge/common.py; "arena-hard-200" came with a later version), which
# fastchat/llm_judge/gen_model_answer.py reads as `temperature_config[question["category"]]` when
# the category is listed, else 0.7, and decodes greedily (do_sample=False) below 1e-4; it passes
# no top_p (so 1.0) and seeds each question (torch.manual_seed before its turns).
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}  # fmt: skip
OTHER_TEMPERATURE = 0.7  # a category not in the table
GREEDY_BELOW = 1e-4  # gen_model_answer.py: `do_sample = temperature >= 1e-4`


def temperature(category: str, chat_temperature: str | float) -> float:
    """The temperature a question is answered at: its category's (FastChat's table), or the one forced."""
    if chat_temperature != "category":
        return float(chat_temperature)
    return CATEGORY_TEMPERATURE.get(category, OTHER_TEMPERATURE)


def question_seed(seed: int, question_id: int, turn: int) -> int:
    """The seed of one sampled answer: the same for a question and turn whatever else is asked, and
    however the questions are batched or sharded (numpy's SeedSequence: stable across versions)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, question_id, turn]).generate_state(1)[0])


def answer(backend, model, tokenizer, spec, config, questions: list) -> list[dict]:
    """Per question {"turns": [turn-1 answer, turn-2 answer], "temperature": t}: one pass per turn."""
    temps = [temperature(q.category, config.chat_temperature) for q in questions]
    chats = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    first = reply(backend, model, tokenizer, spec, config, chats, questions, temps, turn=1)
    for chat, q, a in zip(chats, questions, first):
        chat += [{"role": "assistant", "content": a}, {"role": "user", "content": q.turns[1]}]
    second = reply(backend, model, tokenizer, spec, config, chats, questions, temps, turn=2)
    return [{"turns": [a, b], "temperature": t} for a, b, t in zip(first, second, temps)]


def reply(backend, model, tokenizer, spec, config, chats: list[list[dict]], questions: list,
          temps: list[float], turn: int) -> list[str]:  # fmt: skip
    """The model's next turn in each chat: the greedy ones in batches; each sampled one alone, from
    its own seed, so its answer depends on the seed only (FastChat seeds each question too)."""
    from orchestration.data.chat import render

    texts = [render(chat, add_generation_prompt=True) for chat in chats]
    out = [""] * len(texts)
    greedy = [i for i, t in enumerate(temps) if t < GREEDY_BELOW]
    replies = generative.generate_texts(backend, model, tokenizer, spec, [texts[i] for i in greedy],
                                        config.max_new_tokens, config.batch_rows, until=())  # fmt: skip
    for i, text in zip(greedy, replies):
        out[i] = text
    for i in (i for i, t in enumerate(temps) if t >= GREEDY_BELOW):
        seed = question_seed(config.seed, questions[i].question_id, turn)
        out[i] = generative.generate_texts(backend, model, tokenizer, spec, [texts[i]], config.max_new_tokens, 1,
                                           until=(), temperature=temps[i], seed=seed)[0]  # fmt: skip
    return [text.strip() for text in out]  # FastChat strips each answer too


def answer_records(questions: list, answered: list[dict], config) -> list[dict]:
    """FastChat's answer lines, sorted by question_id; how each was generated in "generate_params"
    (FastChat's readers take the lines whole and read choices[0]["turns"], so a field more is safe)."""
    pairs = sorted(zip(questions, answered), key=lambda p: p[0].question_id)
    return [{"question_id": q.question_id, "answer_id": uuid.uuid4().hex, "model_id": config.model_id,
             "choices": [{"index": 0, "turns": a["turns"]}], "tstamp": time.time(),
             "generate_params": {"temperature": a["temperature"], "do_sample": a["temperature"] >= GREEDY_BELOW,
                                 "top_p": 1.0, "seed": config.seed, "max_new_token": config.max_new_tokens}}
            for q, a in pairs]  # fmt: skip
