"""mmjax: multimodal models in pure JAX/Flax, exact against the references people trust.

One concept per submodule: :mod:`~mmjax.attention` (scaled dot-product attention), :mod:`~mmjax.layers`
(transformer blocks), :mod:`~mmjax.vit`, :mod:`~mmjax.text`, :mod:`~mmjax.clip`, :mod:`~mmjax.tokenizer`,
:mod:`~mmjax.graph`, :mod:`~mmjax.gnn`, :mod:`~mmjax.graph_models`, :mod:`~mmjax.multimodal_graph` (patches and words
in one graph), :mod:`~mmjax.graph_fusion` (matching over that graph; the cross-attention baseline),
:mod:`~mmjax.diffusion`,
:mod:`~mmjax.dit`, :mod:`~mmjax.decoder` (text decoder with cross-attention and a KV cache),
:mod:`~mmjax.captioner`, :mod:`~mmjax.coca`, :mod:`~mmjax.generate` (greedy, sampling and beam search),
:mod:`~mmjax.detection` (OWL-ViT), :mod:`~mmjax.boxes` (box maths, focal loss), :mod:`~mmjax.matching` (Hungarian
matching), :mod:`~mmjax.losses`,
:mod:`~mmjax.evaluate`, :mod:`~mmjax.convert`, :mod:`~mmjax.data`, :mod:`~mmjax.train`.

The names below are re-exported lazily (a submodule is imported on first use, so ``import mmjax`` stays cheap):

>>> import mmjax
>>> mmjax.dot_product_attention is mmjax.attention.dot_product_attention
True
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "dot_product_attention": "attention",
    "MultiHeadAttention": "attention",
    "ViT": "vit",
    "TextTransformer": "text",
    "CLIP": "clip",
    "CLIPConfig": "clip",
    "CLIPTokenizer": "tokenizer",
    "WordTokenizer": "tokenizer",
    "Graph": "graph",
    "GCNConv": "gnn",
    "GATConv": "gnn",
    "RGCNConv": "gnn",
    "TransformerConv": "gnn",
    "GraphFusion": "graph_fusion",
    "CrossAttentionMatcher": "graph_fusion",
    "build_joint_graph": "multimodal_graph",
    "JointGraphLayout": "multimodal_graph",
    "GraphConv": "gnn",
    "DiT": "dit",
    "Captioner": "captioner",
    "CoCa": "coca",
    "OWLViT": "detection",
    "MessagePassing": "gnn",
    "softmax_contrastive_loss": "losses",
    "sigmoid_contrastive_loss": "losses",
    "from_hf": "convert",
    "train_and_evaluate": "train",
}
_SUBMODULES = (
    "attention",
    "layers",
    "vit",
    "text",
    "clip",
    "tokenizer",
    "preprocess",
    "graph",
    "segment",
    "gnn",
    "graph_models",
    "multimodal_graph",
    "graph_fusion",
    "diffusion",
    "dit",
    "decoder",
    "captioner",
    "coca",
    "generate",
    "detection",
    "boxes",
    "matching",
    "losses",
    "evaluate",
    "convert",
    "data",
    "train",
    "cli",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mmjax.{_EXPORTS[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mmjax.{name}")
    raise AttributeError(f"module 'mmjax' has no attribute {name!r}")


def __dir__():
    return __all__
