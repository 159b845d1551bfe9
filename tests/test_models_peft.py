"""The PEFT core on jaxpeft's own model families, scanned and unscanned, against torch PEFT.

torch PEFT adapts a transformers torch model; the same LoRA weights, copied into the layers that jaxpeft found
under the same Hugging Face names (``transformer.h.1.attn.c_attn``, ``model.layers.0.self_attn.q_proj``, ...), must
give the same outputs. That checks target matching, the per-layer names of scanned stacks, and the forward pass.
"""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxpeft
from jaxpeft._tracing import trace_layers
from jaxpeft.models import AutoModelForCausalLM, AutoModelForSequenceClassification

CONFIGS = {
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=99, n_positions=64,
                                             pad_token_id=0), "causal_lm", ["c_attn", "c_proj"]),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                               pad_token_id=0), "causal_lm", ["q_proj", "v_proj", "down_proj"]),
    "bert": (lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=99, num_labels=3), "seq_cls",
             ["query", "value", "output.dense"]),
}
TORCH_CLASSES = {"causal_lm": transformers.AutoModelForCausalLM,
                 "seq_cls": transformers.AutoModelForSequenceClassification}
JAX_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq_cls": AutoModelForSequenceClassification}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def torch_reference(request, tmp_path_factory):
    torch.manual_seed(0)
    make_config, head, targets = CONFIGS[request.param]
    config = make_config()
    config._attn_implementation = "eager"
    model = TORCH_CLASSES[head].from_config(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                           layers_to_transform=[0, 2])
    peft_model = peft.get_peft_model(model, lora).eval()
    return request.param, folder, head, targets, peft_model


def _batch():
    ids = np.array([[5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return ids, mask


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unscanned", "scanned"])
def test_torch_peft_lora_weights_reproduce_torch_peft_outputs(torch_reference, scan_layers):
    family, folder, head, targets, peft_model = torch_reference
    model = JAX_CLASSES[head].from_pretrained(folder, scan_layers=scan_layers)
    ids, mask = _batch()
    config = jaxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=[0, 2])
    variables = jaxpeft.init_adapters(jax.random.key(0), config, model.apply_fn, model.params, ids, mask)

    lora_weights = {name: p.detach().numpy() for name, p in peft_model.named_parameters() if "lora_" in name}
    trace = trace_layers(model.apply_fn, model.params, (ids, mask), {})
    by_name = {name: (path, index) for path, layer in trace.layers.items()
               for index, name in layer.virtual_paths.items()}
    params = jax.tree_util.tree_map(np.array, variables["params"])
    torch_names = set()
    for key, value in lora_weights.items():
        module_name, leaf = key.removeprefix("base_model.model.").split(".lora_")
        torch_names.add(module_name)
        path, index = by_name[module_name]
        node = params
        for part in path:
            node = node[part]
        target = node["lora_A" if leaf.startswith("A") else "lora_B"]["default"]
        target[index] = value.T
    ours = {name for path, layer in trace.layers.items() for index, name in layer.virtual_paths.items()
            if "lora_scaling" in _get(params, path) and _get(params, path)["lora_scaling"]["default"][index] != 0}
    assert ours == torch_names and len(ours) >= 2 * len(targets)

    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    adapted = jaxpeft.rewrite(model.apply_fn, config)
    got = np.asarray(_logits(jax.jit(adapted)({"params": params}, ids, mask)))
    keep = mask.astype(bool) if head == "causal_lm" else np.ones(len(ids), bool)
    np.testing.assert_allclose(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    base = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    assert np.abs(base[keep] - expected[keep]).max() > 1e-3


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _logits(output):
    return output.logits if hasattr(output, "logits") else output["logits"] if isinstance(output, dict) else output
