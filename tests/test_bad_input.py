"""Bad files, data, numbers and lengths get a one-line error saying what was wrong, never a traceback from deep
inside a library, a NaN or a silently wrong result; the valid neighbours of each case still work."""

import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers import BertTokenizer

import jaxpeft
from jaxpeft import data
from jaxpeft.config import ConfigError
from jaxpeft.data import DataError
from jaxpeft.models import AutoModelForCausalLM, read_gguf_checkpoint
from jaxpeft.models.attention import SequenceTooLongError
from jaxpeft.models.bert import BertForSequenceClassification
from jaxpeft.models.distilbert import DistilBertForSequenceClassification
from jaxpeft.models.roberta import RobertaForSequenceClassification

GPT2 = dict(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
ENCODERS = {  # family -> (sequence classifier module, config with a 16-row position table)
    "bert": (BertForSequenceClassification, transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16)),
    "roberta": (RobertaForSequenceClassification, transformers.RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, pad_token_id=1)),
    "distilbert": (DistilBertForSequenceClassification, transformers.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16)),
}


def one_line(error_info) -> str:
    message = str(error_info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def gpt2():
    return AutoModelForCausalLM.from_config(transformers.GPT2Config(**GPT2))


@pytest.fixture(scope="module")
def tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film", "dull", "ann", "ran"]
    return BertTokenizer(vocab={word: i for i, word in enumerate(words)})


# ----------------------------------------------------------------------------------------------- data files


@pytest.mark.parametrize("name", ["train.csv", "train.jsonl"])
def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, name):
    lines = ["text,label", "good,1", "dull\xe9,0"] if name.endswith(".csv") else [
        '{"text": "good", "label": 1}', '{"text": "dull\xe9", "label": 0}']
    (tmp_path / name).write_bytes("\n".join(lines).encode("latin-1"))
    line, column = len(lines), lines[-1].index("\xe9") + 1
    with pytest.raises(DataError) as error:
        data.load_dataset_file(tmp_path / name)
    assert f"{name}:{line}:{column}: byte 0xe9 is not UTF-8 text; save the file as UTF-8" in one_line(error)


@pytest.mark.parametrize("name,text", [
    ("train.csv", "text,label\r\ngood film,1\r\ndull,0\r\n"),
    ("train.tsv", "text\tlabel\ngood film\t1\ndull\t0\n"),
    ("train.jsonl", '{"text": "good film", "label": 1}\n{"text": "dull", "label": 0}\n'),
    ("train.json", '[{"text": "good film", "label": 1}, {"text": "dull", "label": 0}]'),
])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, name, text):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert data.load_dataset_file(tmp_path / name) == [{"text": "good film", "label": 1}, {"text": "dull", "label": 0}]


def test_a_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": 1}\n\n{"text": dull}\n')
    with pytest.raises(DataError) as error:
        data.load_dataset_file(tmp_path / "train.jsonl")
    assert "train.jsonl:3: not valid JSON" in one_line(error)


# ---------------------------------------------------------------------------------------------------- labels


@pytest.fixture
def csv_examples(tmp_path):
    """Writes ``text,label`` rows to ``train.csv`` (labels as written) and loads them back."""

    def write(*labels):
        rows = "".join(f"good film,{label}\n" for label in labels)
        (tmp_path / "train.csv").write_text("text,label\n" + rows)
        return data.load_dataset_file(tmp_path / "train.csv")

    return write


@pytest.mark.parametrize("labels,expected", [
    ((0, 1, 2), r"example 2 \(.*train\.csv:4\): label 2 is out of range for 2 classes \(0\.\.1\)"),
    ((0, -1), r"example 1 \(.*train\.csv:3\): label -1 is negative; class ids run 0\.\.1"),
    ((0.0, 1.5), r"example 1 \(.*train\.csv:3\): label 1\.5 is not a class id; .*needs a num_labels=1 model"),
])
def test_bad_class_labels_name_the_example_and_its_line(csv_examples, tokenizer, labels, expected):
    with pytest.raises(DataError, match=expected) as error:
        data.tokenize(csv_examples(*labels), tokenizer, num_labels=2)
    one_line(error)


def test_whole_float_labels_of_a_classifier_become_class_ids(csv_examples, tokenizer):
    features = data.tokenize(csv_examples(0.0, 1.0), tokenizer, num_labels=2)
    assert [feature["labels"] for feature in features] == [0, 1]
    assert all(type(feature["labels"]) is int for feature in features)


def test_regression_labels_need_finite_numbers(tokenizer):
    examples = [{"text": "good", "label": 0.25}, {"text": "dull", "label": -3.5}]
    assert [f["labels"] for f in data.tokenize(examples, tokenizer, num_labels=1)] == [0.25, -3.5]
    with pytest.raises(DataError, match="example 1: label nan is not a finite number") as error:
        data.tokenize([examples[0], {"text": "dull", "label": math.nan}], tokenizer, num_labels=1)
    one_line(error)


def test_token_labels_may_be_minus_100_but_not_other_negatives(tokenizer):
    words = {"text": ["ann", "ran"]}
    features = data.tokenize([{**words, "label": [1, -100]}], tokenizer, num_labels=2)
    assert features[0]["labels"] == [-100, 1, -100, -100]
    with pytest.raises(DataError, match="example 0: token 2: label -2 is negative; only -100") as error:
        data.tokenize([{**words, "label": [1, -2]}], tokenizer)
    one_line(error)
    with pytest.raises(DataError, match="token 1: label 2 is out of range for 2 classes") as error:
        data.tokenize([{**words, "label": [2, 0]}], tokenizer, num_labels=2)
    one_line(error)


def test_training_data_with_a_single_class_is_refused():
    features = data.FileExamples([{"labels": 1}, {"labels": 1}], "train.csv", [2, 3])
    data.check_labels(features, 2, "seq_cls")  # evaluation data may hold one class
    with pytest.raises(DataError) as error:
        data.check_labels(features, 2, "SEQ_CLS", training=True)
    assert one_line(error).startswith("training data (train.csv) has a single class (every label is 1); a "
                                      "classifier needs at least two")
    data.check_labels([{"labels": [-100, 0]}, {"labels": [1, -100]}], 2, "token_cls", training=True)
    data.check_labels([{"labels": 0.5}, {"labels": 0.5}], 1, "seq_cls", training=True)  # regression


def test_collators_check_each_batch_against_num_labels():
    collate = data.SequenceClassificationCollator(pad_token_id=0, num_labels=3, buckets=(4,))
    assert collate([{"input_ids": [2, 3], "labels": 2}, {"input_ids": [2], "labels": 1.0}])["labels"].tolist() == [2, 1]
    with pytest.raises(DataError, match="batch item 1: label 3 is out of range for 3 classes") as error:
        collate([{"input_ids": [2, 3], "labels": 0}, {"input_ids": [2], "labels": 3}])
    one_line(error)
    token_collate = data.TokenClassificationCollator(pad_token_id=0, num_labels=3, buckets=(4,))
    with pytest.raises(DataError, match="batch item 0: token 1: label -1 is negative") as error:
        token_collate([{"input_ids": [2, 3], "labels": [-100, -1]}])
    one_line(error)


# ------------------------------------------------------------------------------------------------ model files


@pytest.fixture(scope="module")
def gpt2_folder(gpt2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    gpt2.save_pretrained(folder)
    return folder


def test_a_truncated_safetensors_checkpoint_says_so(gpt2_folder, tmp_path):
    content = (gpt2_folder / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_bytes((gpt2_folder / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = f"model.safetensors: the file is truncated: {len(content) // 2} bytes of the {len(content)} its header"
    assert expected in one_line(error)


def test_a_file_that_is_not_safetensors_says_so(gpt2_folder, tmp_path):
    (tmp_path / "config.json").write_bytes((gpt2_folder / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    one_line(error)


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut,expected", [
    (lambda content: content[:-40], r"tiny\.gguf: the file is truncated or damaged \(\d+ bytes; reading it failed"),
    (lambda content: b"PK\x03\x04" + content[4:], r"tiny\.gguf: not a GGUF file \(it does not start with b'GGUF'\)"),
])
def test_a_truncated_or_foreign_gguf_file_says_so(gguf_bytes, tmp_path, cut, expected):
    (tmp_path / "tiny.gguf").write_bytes(cut(gguf_bytes))
    with pytest.raises(ValueError, match=expected) as error:
        read_gguf_checkpoint(tmp_path / "tiny.gguf")
    one_line(error)


# --------------------------------------------------------------------------------------------------- positions


def test_gpt2_refuses_inputs_longer_than_its_position_table(gpt2):
    assert gpt2(np.ones((1, 32), np.int32)).logits.shape == (1, 32, 50)
    with pytest.raises(SequenceTooLongError) as error:
        gpt2(np.ones((1, 33), np.int32))
    assert one_line(error).startswith("the input has 33 tokens but this model takes at most 32 (n_positions=32); "
                                      "truncate it")


@pytest.mark.parametrize("family,max_tokens,detail", [
    ("bert", 16, "max_position_embeddings=16"),
    ("roberta", 14, "max_position_embeddings=16, positions starting at 2"),
    ("distilbert", 16, "max_position_embeddings=16"),
])
def test_encoders_refuse_inputs_longer_than_their_position_table(family, max_tokens, detail):
    module = ENCODERS[family][0](config=ENCODERS[family][1])
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.full((1, 4), 5))  # shapes only: nothing runs
    assert jax.eval_shape(module.apply, variables, jnp.full((1, max_tokens), 5)).logits.shape == (1, 2)
    with pytest.raises(SequenceTooLongError) as error:
        jax.eval_shape(module.apply, variables, jnp.full((1, max_tokens + 1), 5))
    assert f"this model takes at most {max_tokens} ({detail})" in one_line(error)


def test_generate_refuses_more_tokens_than_positions(gpt2):
    prompt = np.ones((1, 30), np.int32)
    assert gpt2.generate(prompt, max_new_tokens=2, eos_token_id=None).shape == (1, 32)
    with pytest.raises(ValueError) as error:
        gpt2.generate(prompt, max_new_tokens=5)
    assert one_line(error) == ("the longest prompt (30 tokens) + max_new_tokens=5 needs 35 positions, but the model "
                               "has 32 (max_position_embeddings); lower max_new_tokens to 2 or shorten the prompt.")


@pytest.mark.parametrize("config,expected", [
    (jaxpeft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
     "prompt tuning puts 4 virtual tokens in front of the input: 33 positions, but the model takes at most 32; give "
     "at most 28 tokens"),
    (jaxpeft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
     "prefix tuning numbers the input's positions after its 4 virtual tokens: 33 positions, but the model has 32 "
     "(n_positions); give at most 28 tokens"),
])
def test_prompt_and_prefix_tuning_count_their_virtual_tokens(gpt2, config, expected):
    model = jaxpeft.get_peft_model(gpt2, config)
    assert model(input_ids=np.ones((1, 28), np.int32)).logits.shape[-1] == 50
    with pytest.raises(jaxpeft.AdapterError) as error:
        model(input_ids=np.ones((1, 29), np.int32))
    assert one_line(error).startswith(expected)


# ------------------------------------------------------------------------------------------------ config numbers


@pytest.mark.parametrize("config_class,options,expected", [
    (jaxpeft.LoraConfig, {"r": True}, "r must be a positive integer, got r=True"),
    (jaxpeft.LoraConfig, {"r": "8"}, "r must be a positive integer, got r='8'"),
    (jaxpeft.LoraConfig, {"lora_alpha": math.nan}, "lora_alpha must be positive and finite, got lora_alpha=nan"),
    (jaxpeft.LoraConfig, {"lora_alpha": math.inf}, "lora_alpha must be positive and finite, got lora_alpha=inf"),
    (jaxpeft.LoraConfig, {"lora_alpha": "16"}, "lora_alpha must be positive and finite, got lora_alpha='16'"),
    (jaxpeft.LoraConfig, {"lora_dropout": math.nan}, r"lora_dropout must be in \[0, 1\), got lora_dropout=nan"),
    (jaxpeft.LoraConfig, {"lora_dropout": "0.1"}, r"lora_dropout must be in \[0, 1\), got lora_dropout='0.1'"),
    (jaxpeft.LoraConfig, {"rank_pattern": {"q": 2.5}}, r"rank_pattern\['q'\]=2.5 must be a positive integer"),
    (jaxpeft.LoraConfig, {"alpha_pattern": {"q": math.inf}}, r"alpha_pattern\['q'\]=inf must be positive and finite"),
    (jaxpeft.LoraConfig, {"layers_to_transform": ["0"]}, "layers_to_transform must be a layer index"),
    (jaxpeft.LoraConfig, {"target_modules": ".*q", "layers_to_transform": [0]},
     "layers_to_transform cannot be used with target_modules='.*q', a string"),
    (jaxpeft.AdapterConfig, {"reduction_factor": math.inf}, "reduction_factor must be a number >= 1 and finite"),
    (jaxpeft.AdapterConfig, {"scaling": math.nan}, "scaling must be a finite number, got scaling=nan"),
    (jaxpeft.PrefixTuningConfig, {"num_virtual_tokens": True}, "needs num_virtual_tokens .* positive int, got True"),
    (jaxpeft.PromptTuningConfig, {"num_virtual_tokens": 2.5}, "needs num_virtual_tokens .* positive int, got 2.5"),
])
def test_numeric_options_must_be_finite_and_in_range(config_class, options, expected):
    with pytest.raises(ConfigError, match=expected) as error:
        config_class(**options)
    one_line(error)


def test_numpy_numbers_are_accepted_as_plain_numbers():
    config = jaxpeft.LoraConfig(r=np.int64(4), lora_alpha=np.float32(8), rank_pattern={"q": np.int32(2)},
                                layers_to_transform=np.arange(2))
    assert (config.r, config.lora_alpha, config.rank_pattern, config.layers_to_transform) == (4, 8.0, {"q": 2}, [0, 1])
    assert '"r": 4' in config.to_json()


# ------------------------------------------------------------------------------------------ layers_to_transform


@pytest.mark.parametrize("config", [
    jaxpeft.LoraConfig(target_modules=["c_attn"], layers_to_transform=[1, 7]),
    jaxpeft.AdapterConfig(preset="pfeiffer", feedforward_modules=["mlp.c_proj"], leave_out=[7]),
])
def test_layers_the_model_does_not_have_are_named(gpt2, config):
    option = "layers_to_transform=[1, 7]" if isinstance(config, jaxpeft.LoraConfig) else "leave_out=[7]"
    with pytest.raises(jaxpeft.AdapterError) as error:
        jaxpeft.get_peft_model(gpt2, config)
    assert one_line(error) == f"{option} names a layer [7] the model does not have; its layers are [0, 1]"
