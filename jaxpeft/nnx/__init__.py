"""jaxpeft for Flax NNX: every method on NNX models, trained with ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``.

``get_peft_model(model, config, *example_inputs)`` returns a ``PeftModel``, an ``nnx.Module`` called like the
model. It goes through the same pure functions as linen models (``view`` shows an NNX model to them), so the
configs, layer search, merging and HF PEFT files are the linen ones. ``quantize(model, qconfig)`` holds the
selected weights as ``QuantizedArray`` values (QLoRA's frozen base), read dequantized when their modules run.
"""

from jaxpeft.nnx._graph import AdaptedModule, AdapterConstant, view
from jaxpeft.nnx._model import PeftModel, get_peft_model, quantize

__all__ = ["AdaptedModule", "AdapterConstant", "PeftModel", "get_peft_model", "quantize", "view"]
