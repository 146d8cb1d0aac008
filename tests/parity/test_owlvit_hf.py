"""OWL-ViT parity: Hugging Face ``OwlViTForObjectDetection`` weights converted into mmjax's OWLViT
(``box_anchor="corner"``) give the same boxes, logits and class embeddings (1e-5), for shared and per-image queries,
and a padded query is masked the same way."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import OwlViTConfig, OwlViTForObjectDetection

from mmjax.convert import from_hf
from mmjax.detection import OWLViT
from tests.tolerances import assert_matches_reference

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = OwlViTConfig(
        text_config={"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 7},
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,  # Hugging Face ties it to the text width (the class head projects to text hidden_size)
    )  # fmt: skip
    model = OwlViTForObjectDetection(config).eval()
    with torch.no_grad():  # random heads and norms (their init is ones / zeros): every weight matters
        for name, p in model.named_parameters():
            if "layer_norm" in name or "head" in name or "layernorm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(batch, queries, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
    ids = rng.integers(1, 39, size=(batch * queries, 7))
    length = rng.integers(2, 7, size=batch * queries)
    for row, n in enumerate(length):  # the end-of-text id is the largest id; padding after it is 0
        ids[row, n] = 39
        ids[row, n + 1 :] = 0
    mask = (np.arange(7)[None] <= length[:, None]).astype(np.int64)
    return pixels, ids, mask


@pytest.mark.parametrize("batch,queries", [(1, 3), (2, 4)])
def test_converted_owlvit_matches_transformers(hf_model, batch, queries):
    pixels, ids, mask = _inputs(batch, queries)
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask)
        )
    model, params = from_hf(hf_model)
    assert isinstance(model, OWLViT) and model.box_anchor == "corner"
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    out = model.apply({"params": params}, images, jnp.asarray(ids.reshape(batch, queries, 7)))
    assert_matches_reference(out.boxes, ref.pred_boxes.numpy())
    assert_matches_reference(out.logits, ref.logits.numpy())
    assert_matches_reference(out.class_embeds, ref.class_embeds.numpy())
    if batch == 1:  # the same queries for every image: [Q, T] ids
        shared = model.apply({"params": params}, images, jnp.asarray(ids))
        assert_matches_reference(shared.logits, ref.logits.numpy())


def test_a_padded_query_is_masked_as_transformers_masks_it(hf_model):
    pixels, ids, mask = _inputs(1, 3, seed=1)
    ids[2], mask[2] = 0, 0  # the third query is padding (its first id is 0)
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask)
        )
    model, params = from_hf(hf_model)
    out = model.apply(
        {"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), query_mask=ids[:, 0] > 0
    )
    assert_matches_reference(out.logits[..., :2], ref.logits.numpy()[..., :2])
    assert (np.asarray(out.logits[..., 2]) == ref.logits.numpy()[..., 2]).all()  # finfo(float32).min in both
