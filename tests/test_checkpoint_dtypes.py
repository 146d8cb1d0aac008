"""Restoring a checkpoint into a train state of other dtypes is a clear error (orbax alone casts silently)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.train import Checkpointer


def _state(dtype):
    return {"params": {"dense": {"kernel": jnp.ones((2, 3), dtype)}, "scale": jnp.float32(2.0)}, "step": jnp.int32(4)}


def test_restore_into_other_dtypes_names_the_leaf_and_both_dtypes(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(4, _state(jnp.float32))
    with pytest.raises(ValueError, match=r"params/dense/kernel was saved as float32 but this run expects bfloat16"):
        ckpt.restore(_state(jnp.bfloat16))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(jnp.float16))
    with pytest.raises(ValueError, match=r"dense/kernel was saved as float32 but this run expects float16.*--workdir"):
        ckpt.restore(abstract)
    wrong_step = {**_state(jnp.float32), "step": jnp.float32(0)}
    with pytest.raises(ValueError, match=r"step was saved as int32 but this run expects float32"):
        ckpt.restore(wrong_step)
    restored = ckpt.restore(_state(jnp.float32))  # the same dtypes restore as before
    assert restored["params"]["dense"]["kernel"].dtype == jnp.float32 and int(restored["step"]) == 4
    np.testing.assert_array_equal(np.asarray(restored["params"]["dense"]["kernel"]), np.ones((2, 3), np.float32))
    ckpt.close()
