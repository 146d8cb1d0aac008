"""Hugging Face ViT (``ViTModel``, ``ViTForImageClassification``) <-> :class:`mmjax.vit.ViT` parameters.

Both naming schemes of ``transformers`` are read: the one of files on the Hub and of ``save_pretrained``
(``encoder.layer.{i}.attention.attention.query``, ``intermediate.dense``, ``output.dense``) and the in-memory one of
transformers 5 (``layers.{i}.attention.q_proj``, ``mlp.fc1``, ``mlp.fc2``), with or without the ``vit.`` prefix.

Mapping (HF name, after normalisation -> mmjax name; ``W`` a torch Linear weight ``[out, in]``)::

    embeddings.patch_embeddings.projection.weight [D, C, p, p] -> embedding/kernel [p, p, C, D] (transpose 2,3,1,0)
    embeddings.cls_token [1, 1, D]                             -> cls
    embeddings.position_embeddings [1, N + 1, D]               -> pos_embedding (cls_posemb=True)
    layers.{i}.layernorm_before / layernorm_after              -> encoder/encoderblock_{i}/ln1 / ln2 (weight->scale)
    layers.{i}.attention.{q,k,v}_proj                          -> .../attn/{query,key,value}: kernel W.T -> [D, H, hd]
                                                                  (bias [H, hd]; zeros when qkv_bias=False)
    layers.{i}.attention.o_proj                                -> .../attn/out: kernel W.T -> [H, hd, D]
    layers.{i}.mlp.fc1 / fc2                                   -> .../mlp/fc1 / fc2: kernel W.T
    layernorm                                                  -> encoder/encoder_norm
    pooler.dense (ViTModel)                                    -> pre_logits (representation layer, pooler_act)
    classifier (ViTForImageClassification)                     -> head

``embeddings.mask_token`` (masked-image-modelling only) is ignored. The way back (:func:`to_hf_state_dict`,
:func:`to_hf_dir`) writes the file names, which ``from_pretrained`` of transformers 4 and 5 reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.io import attention_from_torch, check_state_dict, dense_from_torch, f32
from mmjax.errors import UserError
from mmjax.layers import stack_layers
from mmjax.vit import ViT

__all__ = [
    "HF_ACTIVATIONS",
    "normalize_names",
    "vit_options",
    "expected_shapes",
    "from_hf_state_dict",
    "to_hf_config",
    "to_hf_state_dict",
    "to_hf_dir",
]

# Hugging Face ACT2FN names -> mmjax.layers activation names.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "identity",
}

_IGNORED = ("embeddings.mask_token",)

_LEGACY = [
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.query\."), r"layers.\1.attention.q_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.key\."), r"layers.\1.attention.k_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.value\."), r"layers.\1.attention.v_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"layers.\1.attention.o_proj."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"layers.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"layers.\1.mlp.fc2."),
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.gamma$"), ".weight"),
    (re.compile(r"\.beta$"), ".bias"),
]


def normalize_names(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Maps a HF ViT state dict to the transformers-5 in-memory names without the ``vit.`` prefix.

    Args:
      state_dict: ``{name: array}`` in either naming scheme.

    Returns:
      ``(normalised, original)``: the renamed dict (``embeddings.mask_token`` dropped) and a map from each new
      name to the name it had, for error messages.

    Raises:
      ValueError: if two names map to the same normalised name.

    Example:
      >>> sd, _ = normalize_names({"vit.encoder.layer.0.intermediate.dense.weight": 1, "classifier.bias": 2})
      >>> sorted(sd)
      ['classifier.bias', 'layers.0.mlp.fc1.weight']
    """
    out: dict[str, Any] = {}
    original: dict[str, str] = {}
    for name, value in state_dict.items():
        new = name[len("vit.") :] if name.startswith("vit.") else name
        for pattern, repl in _LEGACY:
            new = pattern.sub(repl, new)
        if new in _IGNORED:
            continue
        if new in out:
            raise UserError(f"state dict has both {original[new]!r} and {name!r}, which are the same weight {new!r}.")
        out[new] = value
        original[new] = name
    return out, original


def _pair(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"config {name}={value!r}: only square sizes are supported.")
        value = value[0]
    return int(value)


def vit_options(config: Mapping[str, Any], *, num_classes: int, pooler: bool) -> dict[str, Any]:
    """The :class:`mmjax.vit.ViT` keyword arguments equivalent to a HF ``ViTConfig`` (as a dict).

    Args:
      config: ``ViTConfig.to_dict()`` or the parsed ``config.json``.
      num_classes: classifier outputs (0: no classifier, as ``ViTModel``).
      pooler: whether the checkpoint has ``ViTModel``'s pooler (-> representation layer).

    Returns:
      dict of ViT options (sizes, activation, layer_norm_eps, token pooling, class-token posemb, ...).

    Raises:
      ValueError: an unknown ``hidden_act`` / ``pooler_act``, or a ``head_dim`` other than
        ``hidden_size / num_attention_heads``.

    Example:
      >>> cfg = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
      ...        "patch_size": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
      >>> vit_options(cfg, num_classes=0, pooler=False)["width"]
      32
    """
    get = lambda key, default=None: config.get(key, default)  # noqa: E731
    width, heads = int(get("hidden_size", 768)), int(get("num_attention_heads", 12))
    head_dim = get("head_dim")
    if head_dim is not None and heads * int(head_dim) != width:
        raise UserError(
            f"config head_dim={head_dim} with num_attention_heads={heads} gives {heads * int(head_dim)} != "
            f"hidden_size={width}; mmjax ViT needs head_dim = hidden_size / num_attention_heads."
        )
    options: dict[str, Any] = dict(
        variant=None,
        width=width,
        depth=int(get("num_hidden_layers", 12)),
        num_heads=heads,
        mlp_dim=int(get("intermediate_size", 3072)),
        patch_size=_pair(get("patch_size", 16), "patch_size"),
        activation=_activation(get("hidden_act", "gelu"), "hidden_act"),
        layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
        class_token=True,
        cls_posemb=True,
        pool_type="token",
        final_norm="sequence",
        posemb="learn",
        num_classes=num_classes,
    )
    if pooler:
        options["representation_size"] = int(get("pooler_output_size") or width)
        options["representation_activation"] = _activation(get("pooler_act", "tanh"), "pooler_act")
    return options


def _activation(name: str, field: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise UserError(f"config {field}={name!r} is not supported; expected one of {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def expected_shapes(config: Mapping[str, Any], *, num_classes: int, pooler: bool) -> dict[str, tuple[int, ...]]:
    """The normalised HF names and shapes a ViT checkpoint of this config must have (see :func:`normalize_names`).

    Example:
      >>> cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
      ...        "patch_size": 4, "image_size": 8, "num_channels": 3}
      >>> expected_shapes(cfg, num_classes=0, pooler=False)["embeddings.position_embeddings"]
      (1, 5, 8)
    """
    o = vit_options(config, num_classes=num_classes, pooler=pooler)
    d, p, m = o["width"], o["patch_size"], o["mlp_dim"]
    image = _pair(config.get("image_size", 224), "image_size")
    channels = int(config.get("num_channels", 3))
    tokens = (image // p) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, tokens, d),
        "embeddings.patch_embeddings.projection.weight": (d, channels, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    qkv_bias = bool(config.get("qkv_bias", True))
    for i in range(o["depth"]):
        pre = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[pre + f"attention.{proj}.weight"] = (d, d)
            if qkv_bias or proj == "o_proj":
                shapes[pre + f"attention.{proj}.bias"] = (d,)
        for ln in ("layernorm_before", "layernorm_after"):
            shapes[pre + f"{ln}.weight"] = (d,)
            shapes[pre + f"{ln}.bias"] = (d,)
        shapes[pre + "mlp.fc1.weight"] = (m, d)
        shapes[pre + "mlp.fc1.bias"] = (m,)
        shapes[pre + "mlp.fc2.weight"] = (d, m)
        shapes[pre + "mlp.fc2.bias"] = (d,)
    if pooler:
        r = o["representation_size"]
        shapes["pooler.dense.weight"] = (r, d)
        shapes["pooler.dense.bias"] = (r,)
    if num_classes:
        feat = o.get("representation_size", d)
        shapes["classifier.weight"] = (num_classes, feat)
        shapes["classifier.bias"] = (num_classes,)
    return shapes


_f32, _dense = f32, dense_from_torch


def _layer_norm(sd, name):
    return {"scale": _f32(sd[name + ".weight"]), "bias": _f32(sd[name + ".bias"])}


def _block(sd, i, width, heads):
    pre = f"layers.{i}."
    attn = attention_from_torch(sd, pre + "attention.", ("q_proj", "k_proj", "v_proj", "o_proj"), width, heads)
    return {
        "ln1": _layer_norm(sd, pre + "layernorm_before"),
        "attn": attn,
        "ln2": _layer_norm(sd, pre + "layernorm_after"),
        "mlp": {"fc1": _dense(sd, pre + "mlp.fc1"), "fc2": _dense(sd, pre + "mlp.fc2")},
    }


def from_hf_state_dict(
    state_dict: Mapping[str, Any], config: Mapping[str, Any], **model_options: Any
) -> tuple[ViT, dict[str, Any]]:
    """Builds the :class:`mmjax.vit.ViT` and its parameters from a HF ViT state dict and config.

    The head is read from the weights: ``classifier.*`` -> ``num_classes = classifier rows`` (else 0);
    ``pooler.*`` -> representation layer (``ViTModel``'s pooler, so ``pre_logits`` = ``pooler_output``).
    ``intermediates["encoded"]`` equals HF's ``last_hidden_state``.

    Args:
      state_dict: ``{name: numpy array}`` in either HF naming scheme.
      config: the ``ViTConfig`` as a dict.
      **model_options: extra :class:`ViT` fields (``dtype``, ``scan``, ``remat``, ``attention_implementation``,
        dropout rates, ...). ``scan=True`` stacks the layers.

    Returns:
      ``(model, params)`` with float32 jax arrays.

    Raises:
      ValueError: naming every unknown, missing or mis-shaped weight.

    Example:
      >>> import numpy as np
      >>> cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
      ...        "patch_size": 4, "image_size": 8, "num_channels": 1}
      >>> sd = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg, num_classes=0, pooler=False).items()}
      >>> model, params = from_hf_state_dict(sd, cfg)
      >>> params["encoder"]["encoderblock_0"]["attn"]["query"]["kernel"].shape
      (8, 2, 4)
    """
    sd, original = normalize_names(state_dict)
    num_classes = int(np.shape(sd["classifier.weight"])[0]) if "classifier.weight" in sd else 0
    pooler = "pooler.dense.weight" in sd
    expected = expected_shapes(config, num_classes=num_classes, pooler=pooler)
    check_state_dict(sd, expected, what="Hugging Face ViT state dict", display=original)

    options = vit_options(config, num_classes=num_classes, pooler=pooler)
    options.update(model_options)
    model = ViT(**options)
    width, heads, depth = options["width"], options["num_heads"], options["depth"]

    encoder = {f"encoderblock_{i}": _block(sd, i, width, heads) for i in range(depth)}
    encoder["encoder_norm"] = _layer_norm(sd, "layernorm")
    if model.scan:
        encoder = stack_layers(encoder, depth)
    patch_w = _f32(sd["embeddings.patch_embeddings.projection.weight"])
    params: dict[str, Any] = {
        "embedding": {
            "kernel": patch_w.transpose(2, 3, 1, 0),
            "bias": _f32(sd["embeddings.patch_embeddings.projection.bias"]),
        },
        "cls": _f32(sd["embeddings.cls_token"]),
        "pos_embedding": _f32(sd["embeddings.position_embeddings"]),
        "encoder": encoder,
    }
    if pooler:
        params["pre_logits"] = _dense(sd, "pooler.dense")
    if num_classes:
        params["head"] = _dense(sd, "classifier")
    params = jax.tree.map(lambda x: jnp.asarray(x, model.param_dtype), params)
    return model, params


_TO_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "identity": "linear",
}


def _check_hf_compatible(model: ViT) -> None:
    needs = dict(
        class_token=True,
        cls_posemb=True,
        pool_type="token",
        final_norm="sequence",
        posemb="learn",
        pre_norm=False,
        patch_bias=True,
        attention_bias=True,
    )
    have = {k: getattr(model, k) for k in needs}
    have["attention_bias"] = model.get_encoder_config().attention_bias  # also when given as encoder_config
    wrong = {k: have[k] for k, v in needs.items() if have[k] != v}
    if wrong:
        raise UserError(f"this ViT has no Hugging Face ViT equivalent: {wrong} (HF ViT needs {needs}).")
    if model.num_classes and model.representation_size is not None:
        raise UserError(
            "ViTForImageClassification has no pooler: a ViT with both num_classes > 0 and "
            f"representation_size={model.representation_size} cannot be written in HF layout."
        )


def to_hf_config(model: ViT, params: Mapping[str, Any]) -> dict[str, Any]:
    """The HF ``ViTConfig`` dict of ``model`` (image size and channels read from ``params``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ViT(variant="mu/4", num_classes=3)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
      >>> cfg = to_hf_config(model, params); cfg["image_size"], cfg["num_channels"], cfg["num_labels"]
      (8, 1, 3)
    """
    _check_hf_compatible(model)
    s = model.sizes()
    enc = model.get_encoder_config()
    patches = int(np.shape(params["pos_embedding"])[1]) - 1
    side = int(round(patches**0.5))
    if side * side != patches:
        raise UserError(f"pos_embedding covers {patches} patches, not a square grid; HF ViT needs square images.")
    config = dict(
        model_type="vit",
        architectures=["ViTForImageClassification" if model.num_classes else "ViTModel"],
        hidden_size=s["width"],
        num_hidden_layers=s["depth"],
        num_attention_heads=s["num_heads"],
        intermediate_size=s["mlp_dim"],
        patch_size=s["patch_size"],
        image_size=side * s["patch_size"],
        num_channels=int(np.shape(params["embedding"]["kernel"])[2]),
        hidden_act=_TO_HF_ACTIVATIONS[enc.activation],
        layer_norm_eps=enc.layer_norm_eps,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if model.num_classes:
        config["num_labels"] = model.num_classes
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(model.num_classes)}
    if model.representation_size is not None:
        config["pooler_output_size"] = model.representation_size
        config["pooler_act"] = _TO_HF_ACTIVATIONS[model.representation_activation]
    return config


def to_hf_state_dict(model: ViT, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our ViT parameters in the HF file layout (the names ``save_pretrained`` writes; inverse of the mapping above).

    ``ViTForImageClassification`` names (``vit.`` prefix, ``classifier``) when ``num_classes > 0``, else
    ``ViTModel`` names (with ``pooler`` when ``representation_size`` is set). Float32 numpy arrays.

    Raises:
      ValueError: if the model uses an option HF ViT lacks (MAP / GAP pooling, sin-cos posemb, pre-norm, ...).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ViT(variant="mu/4", num_classes=0)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> to_hf_state_dict(model, params)["encoder.layer.0.attention.attention.query.weight"].shape
      (32, 32)
    """
    _check_hf_compatible(model)
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    encoder = p["encoder"]
    if model.scan:
        from mmjax.layers import unstack_layers

        encoder = unstack_layers(encoder)
    pre = "vit." if model.num_classes else ""
    width = model.sizes()["width"]
    out = {
        pre + "embeddings.cls_token": p["cls"],
        pre + "embeddings.position_embeddings": p["pos_embedding"],
        pre + "embeddings.patch_embeddings.projection.weight": p["embedding"]["kernel"].transpose(3, 2, 0, 1),
        pre + "embeddings.patch_embeddings.projection.bias": p["embedding"]["bias"],
        pre + "layernorm.weight": encoder["encoder_norm"]["scale"],
        pre + "layernorm.bias": encoder["encoder_norm"]["bias"],
    }
    for i in range(model.sizes()["depth"]):
        b, hf = encoder[f"encoderblock_{i}"], f"{pre}encoder.layer.{i}."
        for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
            out[hf + f"attention.attention.{theirs}.weight"] = b["attn"][ours]["kernel"].reshape(width, width).T
            out[hf + f"attention.attention.{theirs}.bias"] = b["attn"][ours]["bias"].reshape(width)
        out[hf + "attention.output.dense.weight"] = b["attn"]["out"]["kernel"].reshape(width, width).T
        out[hf + "attention.output.dense.bias"] = b["attn"]["out"]["bias"]
        for ln, theirs in (("ln1", "layernorm_before"), ("ln2", "layernorm_after")):
            out[hf + f"{theirs}.weight"], out[hf + f"{theirs}.bias"] = b[ln]["scale"], b[ln]["bias"]
        for ours, theirs in (("fc1", "intermediate.dense"), ("fc2", "output.dense")):
            out[hf + f"{theirs}.weight"] = b["mlp"][ours]["kernel"].T
            out[hf + f"{theirs}.bias"] = b["mlp"][ours]["bias"]
    if model.representation_size is not None:
        out["pooler.dense.weight"] = p["pre_logits"]["kernel"].T
        out["pooler.dense.bias"] = p["pre_logits"]["bias"]
    if model.num_classes:
        out["classifier.weight"] = p["head"]["kernel"].T
        out["classifier.bias"] = p["head"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf_dir(model: ViT, params: Mapping[str, Any], directory: str) -> None:
    """Writes ``model``/``params`` as a HF ViT directory (``config.json`` + ``model.safetensors``) that
    ``transformers.ViTModel`` / ``ViTForImageClassification.from_pretrained`` loads.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> model = ViT(variant="mu/4", num_classes=2)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> d = tempfile.mkdtemp(); to_hf_dir(model, params, d); sorted(os.listdir(d))
      ['config.json', 'model.safetensors']
    """
    from mmjax.convert.io import save_hf_dir

    save_hf_dir(directory, to_hf_state_dict(model, params), to_hf_config(model, params))
