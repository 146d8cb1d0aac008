"""Executes the teaching notebooks (``notebooks/*.ipynb``) in their quick mode and checks what they report.

Each notebook reads ``MMJAX_QUICK=1`` to shrink its work to seconds; its last cell (tagged ``summary``) prints a
JSON line of the values it measured, which the tests below check (numerical agreement, accuracies above chance).
A notebook that raises fails its test with the failing cell and traceback (``nbclient.CellExecutionError``).

The kernel is the ``python3`` kernel spec, which ``jupyter_client`` launches with the interpreter running pytest
(the venv's); the test checks that. The kernel's environment is this process's, minus the 8-virtual-device
``XLA_FLAGS`` of ``conftest.py`` (a notebook runs on one CPU device, as a reader's would) and ``MPLBACKEND`` (the
notebooks draw inline), with ``TMPDIR`` pointing into the test's ``tmp_path``. Works under ``pytest -n 2``: every
test starts its own kernel.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_attention",
    "02_vit",
    "03_graphs",
    "04_clip",
    "05_numerical_reference",
    "06_captioning",
    "07_diffusion",
    "08_multimodal_graph",
    "09_detection",
)
CELL_TIMEOUT_S = 300  # per cell; a quick notebook takes well under a minute on an idle 2-core machine


def kernel_env(tmp_dir) -> dict[str, str]:
    """The environment of the notebook kernel: quick mode, CPU, one device, inline plots, and ``TMPDIR`` set to
    ``tmp_dir`` so that the notebooks' working directories (checkpoints, metrics) land in pytest's temporary tree."""
    env = dict(os.environ)
    env["MMJAX_QUICK"] = "1"
    env["TMPDIR"] = str(tmp_dir)
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)
    return env


def execute(name: str, tmp_dir):
    """Runs notebook ``name`` top to bottom in a fresh kernel; returns ``(summary dict, kernel's sys.executable)``."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute(env=kernel_env(tmp_dir))  # raises CellExecutionError at the first failing cell
    summaries = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
    assert len(summaries) == 1, f"{name}: expected one cell tagged 'summary', found {len(summaries)}"
    text = "".join(o.get("text", "") for o in summaries[0].outputs if o.output_type == "stream")
    summary = json.loads(text.strip().splitlines()[-1])
    executable = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream").strip()
    return summary, executable


def check_01_attention(s):
    assert s["max_abs_error_vs_numpy"] < 1e-5, s
    assert s["max_rel_error_vs_reference"] < 1e-4, s
    mem = s["temp_mib_at_longest"]
    assert mem["chunked"] < mem["reference"], f"chunked attention should need less memory than the reference: {mem}"


def check_02_vit(s):
    assert s["steps"] > 0 and s["eval_accuracy"] > 0.2, f"ViT test accuracy at chance (0.1): {s}"
    assert s["patch_embedding_error"] < 1e-5, s
    assert s["attention_row_sum_error"] < 1e-5, s
    assert s["rollout_shape"] == [8, 7, 7], s


def check_03_graphs(s):
    for key in ("graphconv_error", "message_passing_error", "gcn_dense_error", "edge_weight_error"):
        assert s[key] < 1e-5, (key, s)
    assert s["karate_accuracy"] >= 0.8, s


def check_04_clip(s):
    assert s["last_train_loss"] < s["first_train_loss"] - 1.0, f"contrastive loss did not go down: {s}"
    assert s["zero_shot"]["colour"] > 1 / 8 + 0.1, f"zero-shot colour accuracy near chance (1/8): {s['zero_shot']}"
    # The notebook's zero-shot (mmjax.evaluate, NumPy) and the engine's evaluation (the task, JAX) are two code
    # paths over the same test images and prompts.
    for attr in ("item", "colour"):
        assert abs(s["zero_shot"][attr] - s["engine_eval"][f"eval_{attr}_accuracy"]) <= 0.02, (attr, s)


def check_05_numerical_reference(s):
    assert s["max_rel_error_float32"] < 1e-4, s
    assert s["max_rel_error_float64"] < 1e-12, s


def check_06_captioning(s):
    assert s["steps"] == s["num_steps"] > 0, f"the run stopped before its configured steps: {s}"
    assert s["final_loss"] < 0.5 * s["first_train_loss"], f"captioning loss did not go down: {s}"
    assert s["eval_token_accuracy"] > 0.4, s
    # greedy decoding over the KV cache = the task's captions = the argmax of one teacher-forced pass
    assert s["greedy_matches_caption_images"] and s["teacher_forced_matches_greedy"], s
    # generate's scores recomputed by teacher forcing (greedy: sum of log-probabilities; beams: / length)
    assert s["greedy_score_error"] < 1e-4 and s["beam_score_error"] < 1e-4, s
    # the cross-attention weights drawn are the ones the model used
    assert s["query_error"] < 1e-5 and s["key_error"] < 1e-5, s
    assert s["cross_attention_output_error"] < 1e-5 and s["attention_row_sum_error"] < 1e-5, s
    assert s["image_tokens"] == 1 + s["grid"] ** 2, s


def check_07_diffusion(s):
    assert s["steps"] == s["num_steps"] > 0, f"the run stopped before its configured steps: {s}"
    assert s["final_loss"] < 0.9 * s["first_train_loss"], f"diffusion loss did not go down: {s}"
    assert s["eval_loss"] < s["first_train_loss"], s
    # empirical mean and std of q_sample over the noise draws: within a few standard errors of the closed form
    assert s["q_sample_mean_error"] < 6 * s["q_sample_mean_se"], s
    assert s["q_sample_std_error"] < 6 * s["q_sample_std_se"], s
    # the notebook's hand-written DDIM loop and guidance at scale 1 against mmjax.diffusion.sample (float32)
    assert s["manual_ddim_vs_sample"] < 1e-4 * max(1.0, s["sample_scale"]), s
    assert s["guidance1_vs_conditional"] < 1e-4 * max(1.0, s["guidance_sample_scale"]), s
    assert sorted(s["colour_match"]) == ["0", "1", "3", "6"], s


def check_09_detection(s):
    assert s["steps"] == s["num_steps"] > 0, f"the run stopped before its configured steps: {s}"
    assert s["final_loss"] < 0.5 * s["first_train_loss"], f"detection loss did not go down: {s}"
    # the drawn top detection is the best (token, query) pair; both matchers give the same assignment and loss
    assert s["top_score_error"] < 1e-6 and s["matchers_agree"], s
    assert 0.0 <= s["test_AP50"] <= 1.0 and 0.0 <= s["heldout_AP50"] <= 1.0 and s["grounding_recall"] > 0.1, s


def check_08_multimodal_graph(s):
    assert s["steps"] == s["num_steps"] > 0, f"the run stopped before its configured steps: {s}"
    assert s["final_loss"] < s["first_train_loss"], f"matching loss did not go down: {s}"
    # every edge of the pair is counted once, by type or as a padding self loop
    assert s["edge_counts_total"] == s["edges_per_pair"], s
    # above chance (0.5) on the negatives that change what the image shows plainly
    assert s["test_accuracy"]["size"] > 0.6 and s["test_accuracy"]["mean"] > 0.55, s
    assert 0 < s["patch_share_min"] <= s["patch_share_max"] < 1 and s["padding_attention"] == 0, s
    assert s["late_fusion_blind"] and not s["full_fusion_blind"], s


CHECKS = {name: globals()[f"check_{name}"] for name in NOTEBOOKS}


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), f"{name} has stored outputs"
    assert any("MMJAX_QUICK" in c.source for c in code), f"{name} does not read MMJAX_QUICK"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    summary, executable = execute(name, tmp_path)
    assert os.path.abspath(executable) == os.path.abspath(sys.executable), (
        f"the python3 kernel ran {executable!r}, not this interpreter {sys.executable!r}"
    )
    CHECKS[name](summary)
