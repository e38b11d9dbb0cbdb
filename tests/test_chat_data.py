"""Chat (messages) data and every data source for training: the loss lands on exactly the assistant turns,
whichever way the template is masked, and every source gives the same Examples as JSON-lines.

The tiny world's tokenizer is byte-level (token id == byte value for ASCII), so expected labels are computed
here from the bytes of the text the template renders, independently of the code under test. Its tokenizer
has no chat template (the base-model case): `data.chat_template` supplies one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_preflight import assert_rejected, dist_bench

from conftest import PROJECT
from dist_bench import dataset, preflight
from dist_bench.config import DataConfig, load_config
from dist_bench.dataset import IGNORE, DataError, Example, collate, data_fingerprint, load_examples
from dist_bench.teacher import cache_format
from dist_bench.tinyworld.tokenizer import build_tokenizer

# ChatML with plain-text markers (the tiny vocabulary is bytes): no generation markers.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same rendering, with the assistant's content and end-of-turn inside {% generation %}.
CHATML_MARKED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Qwen3's: only the final assistant turn gets a (here empty) thinking block, so a conversation's earlier
# assistant turns render differently once later turns follow: not prefix-stable.
THINK_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1+1?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "and 2+2?"},
    {"role": "assistant", "content": "4"},
]
ONE_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


def expected(messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of CHATML's rendering: assistant content + '<|im_end|>\\n' supervised, all else
    (system, user, role headers) not."""
    ids: list[int] = []
    labels: list[int] = []
    for message in messages:
        for text, supervised in (
            (f"<|im_start|>{message['role']}\n", False),
            (f"{message['content']}<|im_end|>\n", message["role"] == "assistant"),
        ):
            tokens = list(text.encode())
            ids += tokens
            labels += tokens if supervised else [IGNORE] * len(tokens)
    return ids, labels


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_template(folder: Path, text: str, name: str = "chat.jinja") -> Path:
    (folder / name).write_text(text)
    return folder / name


def chat_config(data: Path | str, template: Path | str | None, **fields: object) -> DataConfig:
    return DataConfig(
        train=str(data),
        format="messages",
        chat_template=None if template is None else str(template),
        **fields,  # type: ignore[arg-type]
    )


# ---- the assistant mask -------------------------------------------------------------------------------


def test_only_assistant_turns_are_supervised(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}, {"messages": ONE_TURN}])
    tokenizer = build_tokenizer()
    examples = load_examples(chat_config(data, write_template(tmp_path, CHATML)), tokenizer)
    for example, messages in zip(examples, [TWO_TURNS, ONE_TURN], strict=True):
        ids, labels = expected(messages)
        assert example.input_ids == ids
        assert example.labels == labels
        assert example.supervised_tokens == sum(label != IGNORE for label in labels)
    two_turns = examples[0].labels
    supervised_text = bytes(t for t in two_turns if t != IGNORE).decode()
    assert supervised_text == "2<|im_end|>\n4<|im_end|>\n"  # two spans, each with its end-of-turn marker
    # The teacher cache's positions: the output at p predicts supervised token p + 1.
    batch = collate(examples, [0, 1], tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        targets = [p for p, label in enumerate(example.labels) if label != IGNORE]
        assert batch.predict_mask[row].nonzero().flatten().tolist() == [p - 1 for p in targets]
    assert batch.targets.tolist() == [t for e in examples for t in e.labels if t != IGNORE]


def test_generation_markers_take_transformers_mask_and_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}, {"messages": ONE_TURN}])
    tokenizer = build_tokenizer()
    by_prefixes = load_examples(chat_config(data, write_template(tmp_path, CHATML)), tokenizer)

    def not_this_path(*args: object) -> None:
        raise AssertionError("a template with generation markers must not be masked by prefixes")

    monkeypatch.setattr(dataset, "_mask_by_prefixes", not_this_path)
    marked = load_examples(chat_config(data, write_template(tmp_path, CHATML_MARKED, "m.jinja")), tokenizer)
    assert marked == by_prefixes
    assert marked[0].labels == expected(TWO_TURNS)[1]


def test_template_that_is_not_prefix_stable_is_refused_naming_the_row(tmp_path: Path) -> None:
    # Row 0 has one assistant turn, the last message: stable. Row 1's first assistant turn is not.
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": ONE_TURN}, {"messages": TWO_TURNS}])
    template = write_template(tmp_path, THINK_LAST)
    with pytest.raises(DataError) as caught:
        load_examples(chat_config(data, template), build_tokenizer())
    assert str(caught.value).startswith(
        f"data.chat_template: {data}:2: row 1: the template is not prefix-stable: the conversation up to "
        "message 2 (assistant) does not tokenize to a prefix of the whole conversation"
    )
    # Supervising every token needs no turn boundaries: the same template is fine then.
    examples = load_examples(chat_config(data, template, supervise="all"), build_tokenizer())
    assert len(examples) == 2


def test_supervise_all_truncation_and_max_samples(tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": TWO_TURNS}, {"messages": ONE_TURN}, {"messages": [{"role": "user"}]}],  # row 2: bad
    )
    template = write_template(tmp_path, CHATML)
    tokenizer = build_tokenizer()
    ids, labels = expected(TWO_TURNS)

    everything = load_examples(chat_config(data, template, supervise="all", max_samples=1), tokenizer)
    assert len(everything) == 1  # max_samples=1: the bad row 2 is never read
    assert everything[0].labels == [IGNORE, *ids[1:]]

    # Cut inside the second assistant turn: the first span whole, the second up to the cut.
    cut = len(ids) - 5
    truncated = load_examples(chat_config(data, template, max_length=cut, max_samples=2), tokenizer)
    assert truncated[0].input_ids == ids[:cut] and truncated[0].labels == labels[:cut]

    # Cut before any assistant token: nothing to learn, named like a prompt that fills max_length.
    first_assistant = next(p for p, label in enumerate(labels) if label != IGNORE)
    with pytest.raises(DataError) as caught:
        load_examples(chat_config(data, template, max_length=first_assistant, max_samples=1), tokenizer)
    assert str(caught.value) == (
        f"{data}:1: row 0: the assistant turns all fall beyond data.max_length={first_assistant}; "
        "nothing to learn"
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: row 2: field 'messages\[0\]\.content' missing"):
        load_examples(chat_config(data, template), tokenizer)


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([{"role": "user", "content": "Hi"}], "field 'messages': no assistant turn, so nothing to learn"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}],
            "field 'messages[1].role': 'bot' is not one of system, user, assistant, tool",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}],
            "field 'messages[1].content' missing or not a string",
        ),
        ("Hi", "field 'messages' missing or not a list of messages"),
    ],
)
def test_bad_conversation_names_line_row_and_field(tmp_path: Path, messages: object, said: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": ONE_TURN}, {"messages": messages}])
    with pytest.raises(DataError) as caught:
        load_examples(chat_config(data, write_template(tmp_path, CHATML)), build_tokenizer())
    assert str(caught.value) == f"{data}:2: row 1: {said}"


def test_where_the_chat_template_comes_from(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}])
    tokenizer = build_tokenizer()
    want = expected(TWO_TURNS)[1]
    # A base model: no template of its own and none given.
    with pytest.raises(DataError, match=r"^data\.chat_template: the tokenizer of .* has no chat template"):
        load_examples(chat_config(data, None), tokenizer)
    # A relative path is relative to the project root, as other paths in the config.
    relative = os.path.relpath(write_template(tmp_path, CHATML), PROJECT)
    assert load_examples(chat_config(data, relative), tokenizer)[0].labels == want
    # A model folder whose tokenizer has one.
    chat_model = build_tokenizer()
    chat_model.chat_template = CHATML
    chat_model.save_pretrained(str(tmp_path / "chat-model"))
    assert load_examples(chat_config(data, tmp_path / "chat-model"), tokenizer)[0].labels == want
    # The tokenizer's own template when data.chat_template is unset.
    assert load_examples(chat_config(data, None), chat_model)[0].labels == want
    with pytest.raises(DataError, match=r"^data\.chat_template: .*gone\.jinja: not found"):
        load_examples(chat_config(data, tmp_path / "gone.jinja"), tokenizer)
    with pytest.raises(DataError, match=r"^data\.chat_template: not valid Jinja"):
        load_examples(
            chat_config(data, write_template(tmp_path, "{% for m in messages %}", "b.jinja")), tokenizer
        )


def test_example_mask_and_its_first_target_form() -> None:
    assert Example.from_first_target([5, 6, 7, 8], 2) == Example([5, 6, 7, 8], [False, False, True, True])
    assert Example([5, 6, 7], [False, True, False]).labels == [IGNORE, 6, IGNORE]
    with pytest.raises(ValueError, match="token 0 cannot be supervised"):
        Example([5, 6], [True, True])
    with pytest.raises(ValueError, match="2 supervised flags for 3 tokens"):
        Example([5, 6, 7], [False, True])


# ---- every source, the same Examples ------------------------------------------------------------------

CHATS = [{"id": f"c{i}", "messages": m} for i, m in enumerate([TWO_TURNS, ONE_TURN, ONE_TURN[:1] + ONE_TURN])]
PAIRS = [
    {"prompt": "Q: 1+1?", "completion": " 2"},
    {"prompt": "Hi", "completion": " yo"},
    {"prompt": "a", "completion": "b"},
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(("rows", "fmt"), [(CHATS, "messages"), (PAIRS, "prompt_completion")])
def test_parquet_shards_and_saved_datasets_load_like_jsonl(
    tmp_path: Path, rows: list[dict], fmt: str
) -> None:
    template = write_template(tmp_path, CHATML)
    tokenizer = build_tokenizer()

    def load(train: Path, **fields: object) -> list[Example]:
        cfg = DataConfig(
            train=str(train),
            format=fmt,  # type: ignore[arg-type]
            chat_template=str(template),
            **fields,  # type: ignore[arg-type]
        )
        return load_examples(cfg, tokenizer)

    want = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(want) == 3
    assert load(write_parquet(tmp_path / "d.parquet", rows)) == want
    # A Hub-style folder: two train shards and a test shard; data.split picks the shards.
    shards = tmp_path / "snapshot" / "data"
    write_parquet(shards / "train-00000-of-00002.parquet", rows[:2])
    write_parquet(shards / "train-00001-of-00002.parquet", rows[2:])
    write_parquet(shards / "test-00000-of-00001.parquet", rows[1:2])
    assert load(tmp_path / "snapshot") == want
    assert load(tmp_path / "snapshot", split="test") == want[1:2]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert load(tmp_path / "saved") == want
    assert load(tmp_path / "saved", split="test", max_samples=5) == want[:1]


def test_bad_row_in_parquet_names_the_row_and_field(tmp_path: Path) -> None:
    rows = [*CHATS[:2], {"id": "c2", "messages": [{"role": "user", "content": "Hi"}]}]
    data = write_parquet(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError) as caught:
        load_examples(chat_config(data, write_template(tmp_path, CHATML)), build_tokenizer())
    assert str(caught.value) == f"{data}: row 2: field 'messages': no assistant turn, so nothing to learn"
    with pytest.raises(DataError) as caught:
        load_examples(DataConfig(train=str(data)), build_tokenizer())
    assert str(caught.value) == f"{data}: row 0: field 'prompt' missing (the data has id, messages)"


def test_fingerprint_is_the_data_files_bytes(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    assert (
        data_fingerprint(DataConfig(train=str(data)))
        == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    )
    write_parquet(tmp_path / "shards" / "train-0.parquet", PAIRS[:2])
    write_parquet(tmp_path / "shards" / "train-1.parquet", PAIRS[2:])
    write_parquet(tmp_path / "shards" / "test-0.parquet", PAIRS[:1])
    train = data_fingerprint(DataConfig(train=str(tmp_path / "shards")))
    both = b"".join((tmp_path / "shards" / f"train-{i}.parquet").read_bytes() for i in (0, 1))
    assert train == "sha256:" + hashlib.sha256(both).hexdigest()
    assert data_fingerprint(DataConfig(train=str(tmp_path / "shards"), split="test")) != train
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "saved"))
    saved = data_fingerprint(DataConfig(train=str(tmp_path / "saved")))
    datasets.Dataset.from_list(PAIRS[:2]).save_to_disk(str(tmp_path / "saved2"))
    assert saved.startswith("sha256:") and saved != data_fingerprint(
        DataConfig(train=str(tmp_path / "saved2"))
    )
    # A chat template file is part of what is trained on.
    template = write_template(tmp_path, CHATML)
    chat = write_jsonl(tmp_path / "c.jsonl", CHATS)
    with_template = data_fingerprint(chat_config(chat, template))
    template.write_text(CHATML_MARKED)
    assert data_fingerprint(chat_config(chat, template)) != with_template


# ---- pre-flight ---------------------------------------------------------------------------------------


def sft_config(folder: Path, data: Path, *data_lines: str) -> Path:
    """tiny_sft.yaml with data.train (and the given data keys) replaced."""
    text = (PROJECT / "configs" / "experiments" / "tiny_sft.yaml").read_text()
    text = text.replace(
        "  train: tinyworld:kd_train\n", f"  train: {data}\n" + "".join(f"  {line}\n" for line in data_lines)
    )
    config = folder / "chat_sft.yaml"
    config.write_text(text)
    return config


def test_preflight_names_a_message_without_content(tmp_path: Path) -> None:
    rows = [*CHATS, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    template = write_template(tmp_path, CHATML)
    config = sft_config(tmp_path, data, "format: messages", f"chat_template: {template}")
    done = dist_bench(tmp_path, "validate", "sft", "--config", str(config))
    assert_rejected(
        done, tmp_path, f"data.train: {data}:4: row 3: field 'messages[1].content' missing or not a string"
    )


def test_preflight_names_a_missing_chat_template(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    # The tiny student is a base model: no template of its own.
    done = dist_bench(
        tmp_path, "validate", "sft", "--config", str(sft_config(tmp_path, data, "format: messages"))
    )
    assert_rejected(done, tmp_path, "data.chat_template: the tokenizer of", "has no chat template")
    gone = tmp_path / "templates" / "chatml.jinja"
    config = sft_config(tmp_path, data, "format: messages", f"chat_template: {gone}")
    assert_rejected(dist_bench(tmp_path, "validate", "sft", "--config", str(config)), tmp_path,
                    f"data.chat_template: {gone}: not found")  # fmt: skip


def test_preflight_scan_and_cache_estimate_for_chats(workdir: Path) -> None:
    data = write_jsonl(workdir / "chats.jsonl", CHATS)
    template = write_template(workdir, CHATML)
    cfg = load_config(
        None,
        [
            f"data.train={data}",
            "data.format=messages",
            f"data.chat_template={template}",
            f"output.run_dir={workdir / 'runs'}",
        ],
    )
    scan = preflight.data_records(cfg, trained_on=True)
    assert scan.records == 3 and scan.chat_template == CHATML
    assert (
        "3 records, every one well-formed; the first 3 rendered with the chat template" in scan.check.detail
    )
    tokenizer = build_tokenizer()
    positions = sum(e.supervised_tokens for e in load_examples(cfg.data, tokenizer))
    per_position = cache_format.bytes_per_position(cfg.logits.top_k, len(tokenizer))  # at most
    assert preflight.planned_cache_bytes(cfg, tokenizer, scan) == int(
        positions / 3 * 3 * per_position + 3 * 16
    )
    # A template the stages would refuse stops the scan too.
    cfg.data.chat_template = str(write_template(workdir, THINK_LAST, "think.jinja"))
    with pytest.raises(
        preflight.PreflightError,
        match=r"^data\.chat_template: .*chats\.jsonl:1: row 0: the template is not prefix-stable",
    ):
        preflight.data_records(cfg, trained_on=True)
