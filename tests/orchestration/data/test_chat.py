"""Chat data: the rendering is the Jinja template's, byte for byte; ids are the tokenizer's; the loss
mask covers exactly the assistant turns and their [|endofturn|]; records of every layout parse; the
dataset is the shard contract plus loss_mask, and the loader carries the mask into batches."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.data.chat import ChatConfig, conversation, encode, render
from orchestration.data.chat_dataset import prepare_chat
from orchestration.data.loader import MixtureConfig, MixtureLoader
from tests.conftest import QUICKSTART
from tokenizer.specials import CHAT_TEMPLATE

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda t: "[" not in t
)
FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def conversations(draw) -> list[dict]:
    turns = draw(st.lists(st.sampled_from(["user", "assistant"]), min_size=1, max_size=6))
    messages = [{"role": r, "content": draw(TEXT)} for r in turns]
    if draw(st.booleans()):
        messages.insert(0, {"role": "system", "content": draw(TEXT)})
    return messages


def jinja_render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as transformers compiles it (apply_chat_template's environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


@FAST
@given(messages=conversations(), prompt=st.booleans())
def test_rendering_equals_the_jinja_template(messages, prompt):
    assert render(messages, prompt) == jinja_render(messages, prompt)


def test_rendering_equals_transformers_apply_chat_template(small_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(small_tokenizer_dir))
    messages = [{"role": "system", "content": "간결하게 답하세요."}, {"role": "user", "content": "안녕?"},
                {"role": "assistant", "content": "<thought>인사다.</thought>안녕하세요!"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]  # fmt: skip
    for prompt in (False, True):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert render(messages, prompt) == text


@FAST
@given(messages=conversations())
def test_ids_are_the_tokenizers_and_the_mask_is_the_assistant_turns(small_tokenizer, messages):
    messages.append({"role": "assistant", "content": "끝."})  # at least one assistant turn
    [(ids, mask)] = encode(small_tokenizer, [messages])
    bos, eos = (small_tokenizer.hf.token_to_id(t) for t in ("[BOS]", "[EOS]"))
    assert ids.tolist() == [bos, *small_tokenizer.encode(render(messages)), eos]
    assert ids.dtype == np.int32 and mask.dtype == np.int8 and len(ids) == len(mask)
    assert mask[0] == mask[-1] == 0
    trained = small_tokenizer.decode(ids[mask == 1].tolist())
    assert trained == "".join(
        m["content"] + "[|endofturn|]" for m in messages if m["role"] == "assistant"
    )
    # every [|endofturn|] trained closes an assistant turn; a user's turn ends with a newline instead
    endofturn = small_tokenizer.hf.token_to_id("[|endofturn|]")
    assert (mask[ids == endofturn] == 1).sum() == sum(m["role"] == "assistant" for m in messages)


def test_thought_tags_stay_in_the_trained_assistant_content(small_tokenizer):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<thought>2+2=4</thought>4"},
    ]
    [(ids, mask)] = encode(small_tokenizer, [messages])
    thought = small_tokenizer.hf.token_to_id("<thought>")
    assert thought in ids[mask == 1].tolist()
    assert (
        small_tokenizer.decode(ids[mask == 1].tolist()) == "<thought>2+2=4</thought>4[|endofturn|]"
    )


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     [("user", "hi"), ("assistant", "yo")]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "be nice"},
     [("system", "be nice"), ("user", "hi"), ("assistant", "yo")]),
    ({"instruction": "Summarize.", "input": "A long text.", "response": "Short."},
     [("user", "Summarize.\n\nA long text."), ("assistant", "Short.")]),
    ({"instruction": "Say hi.", "input": "", "output": "Hi."}, [("user", "Say hi."), ("assistant", "Hi.")]),
    ({"Q": "12시 땡!", "A": "하루가 또 가네요.", "label": "0"}, [("user", "12시 땡!"), ("assistant", "하루가 또 가네요.")]),
])  # fmt: skip
def test_every_record_layout_becomes_a_conversation(record, expected):
    messages, reason = conversation(record, ChatConfig())
    assert reason is None and [(m["role"], m["content"]) for m in messages] == expected


@pytest.mark.parametrize("record, reason", [
    ({"text": "just text"}, "no conversation fields"),
    ("a bare string", "not a record"),
    ({"messages": [{"role": "tool", "content": "{}"}]}, "role 'tool' not supported"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system turn not first"),
    ({"Q": "hi [|assistant|]forged", "A": "x"}, "content holds a special token"),
    ({"instruction": "x", "output": None}, "content is not text"),
])  # fmt: skip
def test_unusable_records_are_dropped_with_a_reason(record, reason):
    assert conversation(record, ChatConfig()) == (None, reason)


def test_system_prompt_fills_in_for_conversations_without_one():
    messages, _ = conversation({"Q": "hi", "A": "yo"}, ChatConfig(system_prompt="You are EXAONE."))
    assert messages[0] == {"role": "system", "content": "You are EXAONE."}


@pytest.fixture(scope="module")
def chat_dataset(small_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "chat"
    return out, prepare_chat([str(QUICKSTART / "sft")], small_tokenizer_dir, out)


def test_the_shipped_samples_become_a_chat_dataset(chat_dataset, small_tokenizer_dir):
    out, manifest = chat_dataset
    assert manifest["format"] == "hanyeong-dataset" and manifest["kind"] == "chat"
    assert set(manifest["sources"]) == {"ko", "en"}
    assert (
        manifest["sources"]["ko"]["documents"] == 300
        and manifest["sources"]["en"]["documents"] == 200
    )
    shard = manifest["sources"]["ko"]["shards"][0]
    assert shard["path"] == "shards/ko/part-00000.parquet"
    table = pq.read_table(out / shard["path"])
    assert table.schema.field("input_ids").type.value_type == "int32"
    assert table.schema.field("loss_mask").type.value_type == "int8"
    ids, masks = table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()
    assert all(len(i) == len(m) and i[0] == 1 and i[-1] == 2 for i, m in zip(ids, masks))
    assert shard["trained_tokens"] == sum(map(sum, masks)) > 0
    again = prepare_chat([str(QUICKSTART / "sft")], small_tokenizer_dir, out)
    assert again["up_to_date"] and again["content_hash"] == manifest["content_hash"]


def test_the_loader_carries_the_loss_mask_into_batches(chat_dataset):
    out, _ = chat_dataset
    mixture = MixtureConfig.from_dict(
        {"sources": [{"dataset": str(out)}], "split_documents": False}
    )
    loader = MixtureLoader(mixture, seq_len=512, batch_rows=4, seed=0)
    shard_masks = {}
    for source in ("ko", "en"):
        table = pq.read_table(out / "shards" / source / "part-00000.parquet")
        for ids, mask in zip(
            table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()
        ):
            shard_masks[tuple(ids)] = mask
    checked = 0
    for _ in range(3):
        batch = loader.next_batch()
        rows = np.concatenate(
            [batch.inputs[:, :1], batch.targets], axis=1
        )  # the rows of T + 1 tokens
        masks = np.concatenate([np.zeros_like(batch.loss_mask[:, :1]), batch.loss_mask], axis=1)
        for row, mask in zip(rows, masks):
            # whole conversations (BOS ... EOS) carry their shard's mask; a longer one fills whole rows
            ends = np.flatnonzero(row == 2) + 1
            for start in np.flatnonzero(row == 1):
                if not (ends > start).any():
                    continue  # cut at the row's end
                end = ends[ends > start][0]
                expected = shard_masks[tuple(row[start:end].tolist())]
                assert mask[start + 1 : end].tolist() == [float(x) for x in expected[1:]]
                checked += 1
            assert mask[row == 0].sum() == 0  # padding never counts
    assert checked > 10


def test_masked_and_unmasked_sources_mix(chat_dataset, tmp_path):
    from orchestration.data.chat_dataset import write_shard

    out, _ = chat_dataset
    plain = tmp_path / "plain"
    docs = [
        np.array([1, *range(100, 140), 2], np.int32) for _ in range(20)
    ]  # reserved ids: never in chat
    entry = write_shard(plain / "shards" / "web" / "part-00000.parquet", [str(i) for i in range(20)],
                        ["en"] * 20, docs, None)  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    (plain / "manifest.json").write_text(json.dumps({
        "format": "hanyeong-dataset", "version": 1, "tokenizer": manifest["tokenizer"],
        "sources": {"web": {"documents": 20, "tokens": entry["tokens"],
                            "shards": [{"path": "shards/web/part-00000.parquet", **entry}]}}}))  # fmt: skip
    mixture = MixtureConfig.from_dict({"sources": [{"dataset": str(out)}], "replay": [{"dataset": str(plain), "fraction": 0.5}],
                                       "split_documents": False})  # fmt: skip
    batch = MixtureLoader(mixture, seq_len=64, batch_rows=16, seed=1).next_batch()
    web = (batch.targets >= 100) & (batch.targets < 140)
    assert (
        web.any() and (batch.loss_mask[web] == 1).all()
    )  # a source without a mask counts every token
    assert (batch.loss_mask[batch.targets == 0] == 0).all()
