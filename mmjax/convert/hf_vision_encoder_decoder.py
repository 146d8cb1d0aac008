"""Hugging Face ``VisionEncoderDecoderModel`` (a ViT encoder, a GPT-2 decoder with cross-attention) <->
:class:`mmjax.captioner.Captioner` parameters, both ways, exactly.

The encoder goes through :mod:`mmjax.convert.hf_vit` (``encoder.*``, either naming scheme; ``ViTModel``'s pooler,
which the captioner never reads, is kept as the ViT's representation layer so that the way back is exact). The
decoder map (``D`` = ``decoder.transformer``, ``L`` a layer, ``W`` the width; GPT-2's ``Conv1D`` weights are
already ``[in, out]``, so nothing is transposed except ``lm_head`` and ``enc_to_dec_proj``, torch ``nn.Linear`` s)::

    D.wte.weight                       [V, W]      text_decoder/token_embedding/embedding
    D.wpe.weight                       [N, W]      text_decoder/pos_embedding                (N = n_positions)
    D.h.L.ln_1 / ln_cross_attn / ln_2              text_decoder/decoderblock_L/ln1 / ln2 / ln3  (weight -> scale)
    D.h.L.attn.c_attn                  [W, 3W]     .../self_attn/{query,key,value}: columns split in 3, each
                                                   kernel [W, H, W/H], bias [H, W/H]
    D.h.L.crossattention.q_attn        [W, W]      .../cross_attn/query
    D.h.L.crossattention.c_attn        [W, 2W]     .../cross_attn/{key,value} (columns split in 2)
    D.h.L.{attn,crossattention}.c_proj [W, W]      .../{self_attn,cross_attn}/out: kernel [H, W/H, W]
    D.h.L.mlp.c_fc / c_proj                        .../mlp/fc1 / fc2
    D.ln_f                                         text_decoder/decoder_norm
    decoder.lm_head.weight             [V, W]      text_decoder/head/kernel [W, V]   (untied only; no bias)
    enc_to_dec_proj.{weight,bias}      [Wd, We]    encoder_proj/{kernel,bias}   (there when the widths differ)

Options: ``activation_function`` through :data:`mmjax.convert.hf_vit.HF_ACTIVATIONS` (``gelu_new`` -> ``"gelu_tanh"``),
``layer_norm_epsilon``, ``n_inner`` (``None``: ``4 W``), ``tie_word_embeddings`` of the decoder config (tied:
``lm_head`` is ``wte``; a state dict taken from a live model carries both, and they must be equal).
``reorder_and_upcast_attn`` is accepted (mmjax computes attention scores and softmax in at least float32 anyway);
``scale_attn_weights=False``, ``scale_attn_by_inverse_layer_idx=True``, a ``cross_attention_hidden_size`` other than
``n_embd`` and encoders other than ViT are refused with a :class:`mmjax.errors.UserError`. The causal-mask buffers of
old checkpoints (``attn.bias``, ``attn.masked_bias``) are dropped.

Special ids are resolved as transformers' ``generate`` does for this model (``GenerationConfig.from_model_config``
then ``_prepare_special_tokens``): each of ``decoder_start_token_id``, ``bos_token_id``, ``eos_token_id``,
``pad_token_id`` from the top-level config, else from the decoder config (a ``generation_config`` option, e.g.
``generation_config.json``, comes first); ``bos_id`` is the decoder start token (else ``bos_token_id``), ``pad_id``
falls back to the end-of-text id. The results become the :class:`mmjax.decoder.DecoderConfig`'s ``bos_id`` /
``eos_id`` / ``pad_id``, which :func:`mmjax.generate.generate` uses; pass ``bos_id=`` etc. to override.

Entry points: ``mmjax.convert.from_hf(source)`` (a directory, a ``transformers.VisionEncoderDecoderModel`` or a
state dict with its config) through :func:`from_hf_state_dict`; :func:`to_hf_state_dict`, :func:`to_hf_config`,
:func:`to_hf_dir` (loadable by ``VisionEncoderDecoderModel.from_pretrained``); :func:`convert_hf_dir`,
:func:`save_dir`, :func:`load_dir` for mmjax's own format (``params.safetensors`` + ``mmjax_config.json``, as
:mod:`mmjax.convert.hf_clip`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.captioner import Captioner
from mmjax.convert import hf_vit
from mmjax.convert.hf_clip import MMJAX_CONFIG, MMJAX_PARAMS, flatten_params, unflatten_params
from mmjax.convert.io import check_state_dict, f32, load_config, load_state_dict, save_hf_dir, to_numpy_state_dict
from mmjax.decoder import DecoderConfig
from mmjax.errors import UserError

__all__ = [
    "MODEL_TYPE",
    "special_ids",
    "decoder_config",
    "build_model",
    "expected_shapes",
    "from_hf_state_dict",
    "to_hf_config",
    "to_hf_state_dict",
    "to_hf_dir",
    "save_dir",
    "load_dir",
    "convert_hf_dir",
]

MODEL_TYPE = "vision-encoder-decoder"

_GPT2_DEFAULTS = dict(
    vocab_size=50257,
    n_positions=1024,
    n_embd=768,
    n_layer=12,
    n_head=12,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
    scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False,
    add_cross_attention=False,
)
_GPT2_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}
_BUFFER = re.compile(r"^decoder\.transformer\.h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$")
_ID_FIELDS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
# Options of the converted model: ViT-only, decoder-only, and both.
_VISION_OPTIONS = ("scan", "remat")
_DECODER_OPTIONS = ("bos_id", "eos_id", "pad_id", "mask_id", "dropout_rate", "attention_dropout_rate")
_SHARED_OPTIONS = ("dtype", "param_dtype", "attention_implementation")


def _as_dict(config: Any, what: str) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise UserError(f"{what} must be a dict or a transformers config (with to_dict()), got {type(config).__name__}.")


def _sub_configs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``encoder`` (ViT) and ``decoder`` (GPT-2 with cross-attention) sub-configs, checked."""
    if config.get("model_type") not in (None, MODEL_TYPE):
        raise UserError(
            f"config model_type={config.get('model_type')!r} is not {MODEL_TYPE!r}; this converter reads "
            "transformers.VisionEncoderDecoderModel checkpoints (use mmjax.convert.from_hf to dispatch on model_type)."
        )
    if "encoder" not in config or "decoder" not in config:
        raise UserError(
            f"a {MODEL_TYPE!r} config needs 'encoder' and 'decoder' sub-configs; got keys {sorted(config)}."
        )
    enc = _as_dict(config["encoder"], "config['encoder']")
    dec = _as_dict(config["decoder"], "config['decoder']")
    if enc.get("model_type") != "vit":
        raise UserError(
            f"encoder model_type={enc.get('model_type')!r} is not supported; mmjax converts VisionEncoderDecoderModel "
            "with a ViT encoder (encoder model_type 'vit', transformers.ViTModel). Use a ViT encoder or convert the "
            "encoder separately."
        )
    if dec.get("model_type") != "gpt2":
        raise UserError(
            f"decoder model_type={dec.get('model_type')!r} is not supported; mmjax converts VisionEncoderDecoderModel "
            "with a GPT-2 decoder (decoder model_type 'gpt2', GPT2LMHeadModel with add_cross_attention=True)."
        )
    return enc, dec


def _gpt2(dec: Mapping[str, Any], name: str) -> Any:
    if name in dec and dec[name] is not None:
        return dec[name]
    alias = _GPT2_ALIASES.get(name)
    if alias is not None and dec.get(alias) is not None:
        return dec[alias]
    return _GPT2_DEFAULTS[name]


def _check_gpt2(dec: Mapping[str, Any]) -> None:
    if not _gpt2(dec, "add_cross_attention"):
        raise UserError(
            "decoder add_cross_attention=False: this GPT-2 has no cross-attention layers, so it cannot read the image "
            "tokens; a VisionEncoderDecoderModel needs decoder.add_cross_attention=True (and trained crossattention "
            "weights)."
        )
    if not _gpt2(dec, "scale_attn_weights"):
        raise UserError(
            "decoder scale_attn_weights=False (attention scores not divided by sqrt(head_dim)) is not supported; "
            "mmjax attention always scales by 1/sqrt(head_dim). Only checkpoints with scale_attn_weights=True convert."
        )
    if _gpt2(dec, "scale_attn_by_inverse_layer_idx"):
        raise UserError(
            "decoder scale_attn_by_inverse_layer_idx=True (scores of layer i also divided by i + 1) is not supported; "
            "only checkpoints with scale_attn_by_inverse_layer_idx=False convert."
        )
    width = int(_gpt2(dec, "n_embd"))
    cross = dec.get("cross_attention_hidden_size")
    if cross is not None and int(cross) != width:
        raise UserError(
            f"decoder cross_attention_hidden_size={cross} differs from n_embd={width}: GPT-2's cross-attention reads "
            "encoder states of width n_embd, so such a model does not run in transformers either; set "
            "cross_attention_hidden_size=None (an enc_to_dec_proj is then added when the widths differ)."
        )


def special_ids(config: Mapping[str, Any], generation_config: Any = None) -> dict[str, int | None]:
    """The decoder start, end-of-text and padding ids that transformers' ``generate`` uses for this model.

    Each of ``decoder_start_token_id``, ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` comes from
    ``generation_config`` (when given), else the top-level config, else the decoder sub-config; then the start
    token falls back to ``bos_token_id`` and the padding to the (first) end-of-text id.

    Args:
      config: the ``VisionEncoderDecoderConfig`` as a dict.
      generation_config: optional ``GenerationConfig`` or dict (``generation_config.json``), read first.

    Returns:
      ``{"bos_id": start, "eos_id": eos, "pad_id": pad}`` (``None`` where nothing is set).

    Raises:
      UserError: several end-of-text ids (mmjax generation stops on one).

    Example:
      >>> cfg = {"decoder_start_token_id": 5, "encoder": {}, "decoder": {"bos_token_id": 7, "eos_token_id": 9}}
      >>> special_ids(cfg)
      {'bos_id': 5, 'eos_id': 9, 'pad_id': 9}
    """
    gen = _as_dict(generation_config, "generation_config")
    dec = _as_dict(config.get("decoder"), "config['decoder']")
    found: dict[str, Any] = {}
    for field in _ID_FIELDS:
        for source in (gen, config, dec):
            if source.get(field) is not None:
                found[field] = source[field]
                break
        else:
            found[field] = None
    eos = found["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise UserError(
                f"eos_token_id={list(eos)!r}: mmjax generation stops on one end-of-text id; pass eos_id=<one of "
                "them> to the converter."
            )
        eos = eos[0]
    start = found["decoder_start_token_id"]
    if start is None:
        start = found["bos_token_id"]
    pad = found["pad_token_id"]
    if pad is None:
        pad = eos
    as_int = lambda x: None if x is None else int(x)  # noqa: E731
    return {"bos_id": as_int(start), "eos_id": as_int(eos), "pad_id": as_int(pad)}


def decoder_config(config: Mapping[str, Any], generation_config: Any = None, **overrides: Any) -> DecoderConfig:
    """The :class:`mmjax.decoder.DecoderConfig` equivalent to the GPT-2 decoder of a ``VisionEncoderDecoderConfig``.

    Args:
      config: the ``VisionEncoderDecoderConfig`` as a dict (``encoder`` a ViT, ``decoder`` a GPT-2 config).
      generation_config: optional generation config read first for the special ids (see :func:`special_ids`).
      **overrides: :class:`~mmjax.decoder.DecoderConfig` fields to set (``bos_id``, ``eos_id``, ``pad_id``,
        ``dtype``, ...).

    Returns:
      The decoder config (``max_length = n_positions``, ``activation`` from ``activation_function``, ...).

    Raises:
      UserError: a non-GPT-2 decoder, no cross-attention, an unsupported option or activation, or special ids
        missing or outside the vocabulary (the message says which option fixes it).

    Example:
      >>> cfg = {"encoder": {"model_type": "vit"}, "eos_token_id": 2, "decoder_start_token_id": 1,
      ...        "decoder": {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1,
      ...                    "n_head": 2, "add_cross_attention": True}}
      >>> c = decoder_config(cfg)
      >>> c.activation, c.mlp_dim, c.max_length, (c.bos_id, c.eos_id, c.pad_id)
      ('gelu_tanh', 32, 8, (1, 2, 2))
    """
    _, dec = _sub_configs(config)
    _check_gpt2(dec)
    ids = special_ids(config, generation_config)
    vocab = int(_gpt2(dec, "vocab_size"))
    for name in ("bos_id", "eos_id", "pad_id"):
        value = overrides.get(name, ids[name])
        if value is None:
            raise UserError(
                f"the checkpoint sets no {name} (decoder_start_token_id / bos_token_id, eos_token_id, pad_token_id "
                f"in the config or the decoder config); pass {name}=<token id> to the converter."
            )
        if not 0 <= int(value) < vocab:
            raise UserError(
                f"{name}={value} (from the config's special token ids) is outside the decoder vocabulary of "
                f"{vocab} tokens; pass {name}=<an id below {vocab}> to the converter (or fix the config)."
            )
        overrides.setdefault(name, int(value))
    activation = _gpt2(dec, "activation_function")
    if activation not in hf_vit.HF_ACTIVATIONS:
        raise UserError(
            f"decoder activation_function={activation!r} is not supported; expected one of "
            f"{sorted(hf_vit.HF_ACTIVATIONS)}."
        )
    width = int(_gpt2(dec, "n_embd"))
    inner = _gpt2(dec, "n_inner")
    options = dict(
        vocab_size=vocab,
        width=width,
        depth=int(_gpt2(dec, "n_layer")),
        num_heads=int(_gpt2(dec, "n_head")),
        mlp_dim=int(inner) if inner is not None else 4 * width,
        max_length=int(_gpt2(dec, "n_positions")),
        activation=hf_vit.HF_ACTIVATIONS[activation],
        layer_norm_eps=float(_gpt2(dec, "layer_norm_epsilon")),
        tie_embeddings=bool(_gpt2(dec, "tie_word_embeddings")),
        head_bias=False,
        cross_attention=True,
    )
    options.update(overrides)
    try:
        return DecoderConfig(**options)
    except (TypeError, ValueError) as e:
        raise UserError(f"the GPT-2 decoder config gives an invalid mmjax DecoderConfig: {e}") from e


def _split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    valid = _VISION_OPTIONS + _DECODER_OPTIONS + _SHARED_OPTIONS
    unknown = sorted(set(options) - set(valid) - {"generation_config"})
    if unknown:
        raise UserError(
            f"from_hf ({MODEL_TYPE}): unknown model options {unknown}; valid: {sorted(valid + ('generation_config',))}."
        )
    vision = {k: v for k, v in options.items() if k in _VISION_OPTIONS + _SHARED_OPTIONS}
    decoder = {k: v for k, v in options.items() if k in _DECODER_OPTIONS + _SHARED_OPTIONS}
    return vision, decoder


def build_model(config: Mapping[str, Any], *, pooler: bool = True, **model_options: Any) -> Captioner:
    """The :class:`mmjax.captioner.Captioner` of a ``VisionEncoderDecoderConfig`` (no weights needed).

    Args:
      config: the ``VisionEncoderDecoderConfig`` as a dict.
      pooler: keep the ViT encoder's pooler as the representation layer (``ViTModel``'s default; the captioner
        never reads it, it is only carried so the way back to transformers is exact).
      **model_options: ``generation_config``; ViT options ``scan``, ``remat``; decoder options ``bos_id``,
        ``eos_id``, ``pad_id``, ``mask_id``, ``dropout_rate``, ``attention_dropout_rate``; both: ``dtype``,
        ``param_dtype``, ``attention_implementation``.

    Returns:
      ``Captioner(vision=ViT(num_classes=0, ...), decoder=DecoderConfig(...), project_encoder=widths differ)``.

    Example:
      >>> cfg = {"eos_token_id": 2, "decoder_start_token_id": 1,
      ...        "encoder": {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...                    "intermediate_size": 16, "patch_size": 4, "image_size": 8},
      ...        "decoder": {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 16, "n_layer": 1,
      ...                    "n_head": 2, "add_cross_attention": True}}
      >>> model = build_model(cfg)
      >>> model.vision.sizes()["width"], model.decoder.width, model.project_encoder
      (8, 16, True)
    """
    options = dict(model_options)
    generation_config = options.pop("generation_config", None)
    vision_options, decoder_options = _split_options(options)
    enc, dec = _sub_configs(config)
    cfg = decoder_config(config, generation_config, **decoder_options)
    vit_kwargs = hf_vit.vit_options(enc, num_classes=0, pooler=pooler)
    vit_kwargs.update(vision_options)
    vision = hf_vit.ViT(**vit_kwargs)
    return Captioner(vision=vision, decoder=cfg, project_encoder=vit_kwargs["width"] != cfg.width)


def expected_shapes(config: Mapping[str, Any], *, tied: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the decoder side of a ``VisionEncoderDecoderModel`` state dict (``decoder.*`` and
    ``enc_to_dec_proj.*``; the ``encoder.*`` side is :func:`mmjax.convert.hf_vit.expected_shapes`).

    Args:
      config: the ``VisionEncoderDecoderConfig`` as a dict.
      tied: whether ``decoder.lm_head.weight`` is absent (``None``: from ``decoder.tie_word_embeddings``).

    Example:
      >>> cfg = {"encoder": {"model_type": "vit", "hidden_size": 8},
      ...        "decoder": {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 16, "n_layer": 1,
      ...                    "n_head": 2, "add_cross_attention": True}}
      >>> shapes = expected_shapes(cfg)
      >>> shapes["decoder.transformer.h.0.attn.c_attn.weight"], shapes["enc_to_dec_proj.weight"]
      ((16, 48), (16, 8))
    """
    enc, dec = _sub_configs(config)
    _check_gpt2(dec)
    v, w, n = int(_gpt2(dec, "vocab_size")), int(_gpt2(dec, "n_embd")), int(_gpt2(dec, "n_positions"))
    inner = _gpt2(dec, "n_inner")
    m = int(inner) if inner is not None else 4 * w
    if tied is None:
        tied = bool(_gpt2(dec, "tie_word_embeddings"))
    D = "decoder.transformer."
    shapes: dict[str, tuple[int, ...]] = {
        D + "wte.weight": (v, w),
        D + "wpe.weight": (n, w),
        D + "ln_f.weight": (w,),
        D + "ln_f.bias": (w,),
    }
    for i in range(int(_gpt2(dec, "n_layer"))):
        pre = f"{D}h.{i}."
        for ln in ("ln_1", "ln_cross_attn", "ln_2"):
            shapes[pre + ln + ".weight"] = (w,)
            shapes[pre + ln + ".bias"] = (w,)
        for name, out in (
            ("attn.c_attn", 3 * w),
            ("attn.c_proj", w),
            ("crossattention.q_attn", w),
            ("crossattention.c_attn", 2 * w),
            ("crossattention.c_proj", w),
            ("mlp.c_fc", m),
        ):
            shapes[pre + name + ".weight"] = (w, out)
            shapes[pre + name + ".bias"] = (out,)
        shapes[pre + "mlp.c_proj.weight"] = (m, w)
        shapes[pre + "mlp.c_proj.bias"] = (w,)
    if not tied:
        shapes["decoder.lm_head.weight"] = (v, w)
    enc_width = int(enc.get("hidden_size", 768))
    if enc_width != w:
        shapes["enc_to_dec_proj.weight"] = (w, enc_width)
        shapes["enc_to_dec_proj.bias"] = (w,)
    return shapes


def _ln(sd, name):
    return {"scale": f32(sd[name + ".weight"]), "bias": f32(sd[name + ".bias"])}


def _conv1d(sd, name):
    return {"kernel": f32(sd[name + ".weight"]), "bias": f32(sd[name + ".bias"])}


def _heads(conv, parts: int, heads: int) -> list[dict[str, np.ndarray]]:
    """A Conv1D ``[W, parts * W]`` -> ``parts`` projections of kernel ``[W, H, W/H]``, bias ``[H, W/H]``."""
    kernels = np.split(conv["kernel"], parts, axis=1)
    biases = np.split(conv["bias"], parts)
    return [{"kernel": k.reshape(k.shape[0], heads, -1), "bias": b.reshape(heads, -1)} for k, b in zip(kernels, biases)]


def _out(conv, heads: int) -> dict[str, np.ndarray]:
    k = conv["kernel"]
    return {"kernel": k.reshape(heads, -1, k.shape[1]), "bias": conv["bias"]}


def _decoder_block(sd, i: int, heads: int) -> dict[str, Any]:
    pre = f"decoder.transformer.h.{i}."
    q, k, v = _heads(_conv1d(sd, pre + "attn.c_attn"), 3, heads)
    (cq,) = _heads(_conv1d(sd, pre + "crossattention.q_attn"), 1, heads)
    ck, cv = _heads(_conv1d(sd, pre + "crossattention.c_attn"), 2, heads)
    return {
        "ln1": _ln(sd, pre + "ln_1"),
        "self_attn": {"query": q, "key": k, "value": v, "out": _out(_conv1d(sd, pre + "attn.c_proj"), heads)},
        "ln2": _ln(sd, pre + "ln_cross_attn"),
        "cross_attn": {
            "query": cq,
            "key": ck,
            "value": cv,
            "out": _out(_conv1d(sd, pre + "crossattention.c_proj"), heads),
        },
        "ln3": _ln(sd, pre + "ln_2"),
        "mlp": {"fc1": _conv1d(sd, pre + "mlp.c_fc"), "fc2": _conv1d(sd, pre + "mlp.c_proj")},
    }


def from_hf_state_dict(
    state_dict: Mapping[str, Any], config: Any, **model_options: Any
) -> tuple[Captioner, dict[str, Any]]:
    """The :func:`mmjax.convert.from_hf` converter for ``model_type == "vision-encoder-decoder"``.

    ``model.apply({"params": params}, images_nhwc, decoder_input_ids)`` returns ``(logits, intermediates)`` with
    the logits of transformers' ``VisionEncoderDecoderModel(pixel_values=images_nchw, decoder_input_ids=...)``;
    :func:`mmjax.generate.generate` uses the special ids of the config (see :func:`special_ids`).

    Args:
      state_dict: ``{name: tensor or array}``: the in-memory names of a live model or the names of
        ``model.safetensors`` (``encoder.*`` in either ViT scheme, ``decoder.transformer.*``, ``decoder.lm_head``,
        ``enc_to_dec_proj``).
      config: the ``VisionEncoderDecoderConfig`` (dict or transformers config).
      **model_options: see :func:`build_model` (``bos_id=``, ``eos_id=``, ``pad_id=``, ``generation_config=``,
        ``dtype=``, ``scan=``, ...).

    Returns:
      ``(Captioner, params)``; params are float32 (or ``param_dtype``) jax arrays.

    Raises:
      UserError: a non-ViT encoder, a non-GPT-2 decoder or one without cross-attention, an unsupported option;
        unknown, missing or mis-shaped weights (each named); a tied ``lm_head`` that differs from ``wte``.

    Example (a tiny model of zeros):
      >>> cfg = {"eos_token_id": 2, "decoder_start_token_id": 1, "model_type": "vision-encoder-decoder",
      ...        "encoder": {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      ...                    "intermediate_size": 16, "patch_size": 4, "image_size": 8},
      ...        "decoder": {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 16, "n_layer": 1,
      ...                    "n_head": 2, "add_cross_attention": True}}
      >>> vit = hf_vit.expected_shapes(cfg["encoder"], num_classes=0, pooler=True)
      >>> sd = {"encoder." + k: np.zeros(s, np.float32) for k, s in vit.items()}
      >>> sd |= {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
      >>> model, params = from_hf_state_dict(sd, cfg)
      >>> logits, _ = model.apply({"params": params}, np.zeros((1, 8, 8, 3), np.float32), np.array([[1, 4]]))
      >>> logits.shape, sorted(params)
      ((1, 2, 10), ['encoder_proj', 'text_decoder', 'vision'])
    """
    config = _as_dict(config, "config")
    sd = to_numpy_state_dict(state_dict)
    enc, dec = _sub_configs(config)
    _check_gpt2(dec)
    encoder_sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("encoder.") and not _BUFFER.match(k)}
    tied = bool(_gpt2(dec, "tie_word_embeddings"))
    if tied and "decoder.lm_head.weight" in rest:
        head, wte = rest.pop("decoder.lm_head.weight"), rest.get("decoder.transformer.wte.weight")
        if wte is not None and not np.array_equal(np.asarray(head), np.asarray(wte)):
            raise UserError(
                "decoder.lm_head.weight differs from decoder.transformer.wte.weight but the decoder config has "
                "tie_word_embeddings=True; set config.decoder.tie_word_embeddings=False to keep a separate lm_head."
            )
    check_state_dict(rest, expected_shapes(config, tied=tied), what="Hugging Face VisionEncoderDecoder state dict")

    options = dict(model_options)
    generation_config = options.pop("generation_config", None)
    vision_options, decoder_options = _split_options(options)
    cfg = decoder_config(config, generation_config, **decoder_options)
    try:
        vision_model, vision = hf_vit.from_hf_state_dict(encoder_sd, enc, **vision_options)
    except UserError as e:
        raise UserError(f"encoder.*: {e}") from e
    if vision_model.num_classes:
        raise UserError(
            "encoder.* has a classifier (ViTForImageClassification weights); a VisionEncoderDecoderModel's encoder "
            "is a ViTModel without one: drop the classifier.* weights."
        )
    model = Captioner(vision=vision_model, decoder=cfg, project_encoder=vision_model.sizes()["width"] != cfg.width)
    text = {
        "token_embedding": {"embedding": f32(rest["decoder.transformer.wte.weight"])},
        "pos_embedding": f32(rest["decoder.transformer.wpe.weight"]),
        "decoder_norm": _ln(rest, "decoder.transformer.ln_f"),
    }
    for i in range(cfg.depth):
        text[f"decoderblock_{i}"] = _decoder_block(rest, i, cfg.num_heads)
    if not cfg.tie_embeddings:
        text["head"] = {"kernel": f32(rest["decoder.lm_head.weight"]).T}
    params: dict[str, Any] = {"vision": vision, "text_decoder": text}
    if "enc_to_dec_proj.weight" in rest:
        params["encoder_proj"] = {
            "kernel": f32(rest["enc_to_dec_proj.weight"]).T,
            "bias": f32(rest["enc_to_dec_proj.bias"]),
        }
    params = jax.tree.map(lambda x: jnp.asarray(np.ascontiguousarray(x), cfg.param_dtype), params)
    return model, params


def _check_hf_compatible(model: Captioner, params: Mapping[str, Any]) -> None:
    if not isinstance(model, Captioner):
        raise UserError(f"expected an mmjax.captioner.Captioner, got {type(model).__name__}.")
    cfg = model.decoder
    problems = []
    if model.num_map_queries is not None:
        problems.append(f"num_map_queries={model.num_map_queries} (a MAP pooler between encoder and decoder)")
    if not cfg.cross_attention:
        problems.append("decoder cross_attention=False")
    if cfg.head_bias and not cfg.tie_embeddings:
        problems.append("decoder head_bias=True (GPT-2's lm_head has no bias)")
    if cfg.activation not in hf_vit._TO_HF_ACTIVATIONS:
        problems.append(f"decoder activation={cfg.activation!r}")
    widths_differ = model.vision.sizes()["width"] != cfg.width
    if ("encoder_proj" in params) != widths_differ:
        problems.append(
            f"encoder_proj {'present' if 'encoder_proj' in params else 'absent'} with vision width "
            f"{model.vision.sizes()['width']} and decoder width {cfg.width} (transformers adds enc_to_dec_proj exactly "
            "when the widths differ)"
        )
    if problems:
        raise UserError(
            "this Captioner has no transformers VisionEncoderDecoderModel (ViT + GPT-2) equivalent: "
            + "; ".join(problems)
            + "."
        )


def to_hf_config(model: Captioner, params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``VisionEncoderDecoderConfig`` dict of ``model`` (image size read from ``params``).

    The special ids go to the top level (``decoder_start_token_id``, ``eos_token_id``, ``pad_token_id``) and to the
    decoder config (``bos_token_id = decoder_start_token_id``), where transformers' ``generate`` reads them.

    Example:
      >>> from mmjax.vit import ViT
      >>> vit = ViT(variant="mu/4", num_classes=0)
      >>> model = Captioner(vision=vit, decoder=DecoderConfig(12, 32, 1, 2, 64, 8, activation="gelu_tanh"))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> cfg = to_hf_config(model, params)
      >>> cfg["decoder"]["activation_function"], cfg["decoder"]["tie_word_embeddings"], cfg["decoder_start_token_id"]
      ('gelu_new', True, 1)
    """
    _check_hf_compatible(model, params)
    cfg = model.decoder
    encoder = hf_vit.to_hf_config(model.vision, params["vision"])
    decoder = dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_length,
        n_embd=cfg.width,
        n_layer=cfg.depth,
        n_head=cfg.num_heads,
        n_inner=cfg.mlp_dim,
        activation_function=hf_vit._TO_HF_ACTIVATIONS[cfg.activation],
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=cfg.dropout_rate,
        embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=True,
        is_decoder=True,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
    )
    return dict(
        model_type=MODEL_TYPE,
        architectures=["VisionEncoderDecoderModel"],
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        decoder_start_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
        encoder=encoder,
        decoder=decoder,
    )


def _conv1d_to_hf(out: dict, name: str, kernel, bias) -> None:
    out[name + ".weight"], out[name + ".bias"] = kernel, bias


def to_hf_state_dict(model: Captioner, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our Captioner parameters in the layout of transformers' ``VisionEncoderDecoderModel.save_pretrained`` (the
    inverse of :func:`from_hf_state_dict`; float32 numpy arrays).

    ``decoder.lm_head.weight`` is written only for an untied head (``save_pretrained`` leaves the tied one out);
    ``encoder.pooler.*`` only when the ViT has a representation layer (a converted checkpoint has one).

    Raises:
      UserError: a Captioner with no transformers equivalent (MAP pooler, head bias, a projection where the widths
        are equal or none where they differ, a ViT option HF ViT lacks).

    Example:
      >>> from mmjax.vit import ViT
      >>> model = Captioner(vision=ViT(variant="mu/4", num_classes=0), decoder=DecoderConfig(12, 16, 1, 2, 32, 8))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> sd = to_hf_state_dict(model, params)
      >>> sd["decoder.transformer.h.0.attn.c_attn.weight"].shape, sd["enc_to_dec_proj.weight"].shape
      ((16, 48), (16, 32))
    """
    _check_hf_compatible(model, params)
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    cfg = model.decoder
    out = {"encoder." + k: v for k, v in hf_vit.to_hf_state_dict(model.vision, p["vision"]).items()}
    t, D = p["text_decoder"], "decoder.transformer."
    w = cfg.width
    out[D + "wte.weight"] = t["token_embedding"]["embedding"]
    out[D + "wpe.weight"] = t["pos_embedding"]
    for i in range(cfg.depth):
        b, pre = t[f"decoderblock_{i}"], f"{D}h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_cross_attn"), ("ln3", "ln_2")):
            out[pre + theirs + ".weight"], out[pre + theirs + ".bias"] = b[ours]["scale"], b[ours]["bias"]
        sa, ca = b["self_attn"], b["cross_attn"]
        cat = lambda a, names: (  # noqa: E731
            np.concatenate([a[n]["kernel"].reshape(w, w) for n in names], axis=1),
            np.concatenate([a[n]["bias"].reshape(w) for n in names]),
        )
        _conv1d_to_hf(out, pre + "attn.c_attn", *cat(sa, ("query", "key", "value")))
        _conv1d_to_hf(out, pre + "attn.c_proj", sa["out"]["kernel"].reshape(w, w), sa["out"]["bias"])
        _conv1d_to_hf(out, pre + "crossattention.q_attn", *cat(ca, ("query",)))
        _conv1d_to_hf(out, pre + "crossattention.c_attn", *cat(ca, ("key", "value")))
        _conv1d_to_hf(out, pre + "crossattention.c_proj", ca["out"]["kernel"].reshape(w, w), ca["out"]["bias"])
        _conv1d_to_hf(out, pre + "mlp.c_fc", b["mlp"]["fc1"]["kernel"], b["mlp"]["fc1"]["bias"])
        _conv1d_to_hf(out, pre + "mlp.c_proj", b["mlp"]["fc2"]["kernel"], b["mlp"]["fc2"]["bias"])
    out[D + "ln_f.weight"], out[D + "ln_f.bias"] = t["decoder_norm"]["scale"], t["decoder_norm"]["bias"]
    if not cfg.tie_embeddings:
        out["decoder.lm_head.weight"] = t["head"]["kernel"].T
    if "encoder_proj" in p:
        out["enc_to_dec_proj.weight"] = p["encoder_proj"]["kernel"].T
        out["enc_to_dec_proj.bias"] = p["encoder_proj"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def to_hf_dir(model: Captioner, params: Mapping[str, Any], directory: str | os.PathLike) -> None:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers.VisionEncoderDecoderModel.from_pretrained``
    loads (see :func:`to_hf_state_dict`, :func:`to_hf_config`).

    Example:
      >>> import tempfile
      >>> from mmjax.vit import ViT
      >>> model = Captioner(vision=ViT(variant="mu/4", num_classes=0), decoder=DecoderConfig(12, 32, 1, 2, 64, 8))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     to_hf_dir(model, params, d)
      ...     sorted(os.listdir(d))
      ['config.json', 'model.safetensors']
    """
    save_hf_dir(directory, to_hf_state_dict(model, params), to_hf_config(model, params))


def save_dir(model: Captioner, params: Mapping[str, Any], out_dir: str | os.PathLike) -> None:
    """Writes mmjax's format: ``params.safetensors`` (flat ``a/b/c`` keys of the parameter tree) and
    ``mmjax_config.json`` (``{"model": "vision-encoder-decoder", "config": <the HF config>, "options": ...}``).

    Example:
      >>> import tempfile
      >>> from mmjax.vit import ViT
      >>> model = Captioner(vision=ViT(variant="mu/4", num_classes=0), decoder=DecoderConfig(12, 32, 1, 2, 64, 8))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_dir(model, params, d)
      ...     sorted(os.listdir(d))
      ['mmjax_config.json', 'params.safetensors']
    """
    from safetensors.numpy import save_file

    config = to_hf_config(model, params)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    save_file(flat, os.path.join(out_dir, MMJAX_PARAMS), metadata={"format": "mmjax", "model": MODEL_TYPE})
    meta = {"model": MODEL_TYPE, "config": config, "options": {"scan": bool(model.vision.scan)}}
    with open(os.path.join(out_dir, MMJAX_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)


def load_dir(directory: str | os.PathLike) -> tuple[Captioner, dict[str, Any]]:
    """Reads what :func:`save_dir` / :func:`convert_hf_dir` wrote: ``(Captioner, params)``.

    Example:
      >>> import tempfile
      >>> from mmjax.vit import ViT
      >>> model = Captioner(vision=ViT(variant="mu/4", num_classes=0), decoder=DecoderConfig(12, 32, 1, 2, 64, 8))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     save_dir(model, params, d)
      ...     model2, params2 = load_dir(d)
      >>> model2.decoder == model.decoder, jax.tree.structure(params2) == jax.tree.structure(params)
      (True, True)
    """
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    cfg_path, params_path = os.path.join(directory, MMJAX_CONFIG), os.path.join(directory, MMJAX_PARAMS)
    for path in (cfg_path, params_path):
        if not os.path.isfile(path):
            raise UserError(f"load_dir: {path!r} is missing; expected a directory written by convert_hf_dir/save_dir.")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("model") != MODEL_TYPE:
        raise UserError(f"load_dir: {cfg_path!r} describes model {meta.get('model')!r}, not {MODEL_TYPE!r}.")
    params = jax.tree.map(jnp.asarray, unflatten_params(load_file(params_path)))
    pooler = "pre_logits" in params.get("vision", {})
    model = build_model(meta["config"], pooler=pooler, **meta.get("options", {}))
    return model, params


def convert_hf_dir(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Captioner:
    """Converts a Hugging Face ``VisionEncoderDecoderModel`` directory to mmjax's format in ``out_dir`` (see
    :func:`save_dir`); the special ids of ``generation_config.json`` (when there) take precedence, as in
    transformers. Returns the model; :func:`load_dir` reads the result back.

    Example (a directory written by :func:`to_hf_dir`):
      >>> import tempfile
      >>> from mmjax.vit import ViT
      >>> model = Captioner(vision=ViT(variant="mu/4", num_classes=0), decoder=DecoderConfig(12, 32, 1, 2, 64, 8))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 2), int))["params"]
      >>> with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as out:
      ...     to_hf_dir(model, params, src)
      ...     converted = convert_hf_dir(src, out)
      ...     sorted(os.listdir(out))
      ['mmjax_config.json', 'params.safetensors']
      >>> converted.decoder == model.decoder
      True
    """
    generation = os.path.join(os.fspath(src_dir), "generation_config.json")
    options = {}
    if os.path.isfile(generation):
        with open(generation) as f:
            options["generation_config"] = json.load(f)
    model, params = from_hf_state_dict(load_state_dict(src_dir), load_config(src_dir), **options)
    save_dir(model, params, out_dir)
    return model
