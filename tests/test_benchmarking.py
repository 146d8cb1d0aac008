"""The benchmark harness (experiments/benchmarking.py): each side in a process of its own, A B A B, statistics,
machine and load records; and every benchmark's sides run (at tiny sizes, in this process). No timing asserted."""

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def benchmarking(monkeypatch):
    """experiments/benchmarking.py, imported with experiments/ on sys.path for this test only (the bench scripts put
    it there when imported; the original list comes back afterwards, see tests/test_gnn_tasks.py)."""
    import importlib

    monkeypatch.setattr(sys, "path", [os.path.join(REPO, "experiments"), *sys.path])
    return importlib.import_module("benchmarking")


FAKE = """
import json, os, sys, time
sys.path.insert(0, {experiments!r})
import benchmarking

def side(name):
    def run(steps, warmup, log):
        with open(log, "a") as f:
            f.write(json.dumps([name, os.getpid()]) + "\\n")
        if name == "broken":
            raise RuntimeError("this side is broken on purpose")
        return {{**benchmarking.time_calls(lambda: time.sleep(0.001), steps=steps, warmup=warmup), "pid": os.getpid()}}
    return run

benchmarking.main_or_side({{n: side(n) for n in ("a", "b", "broken")}}, lambda argv: print("main", argv))
"""


@pytest.fixture
def fake_script(tmp_path):
    path = tmp_path / "bench_fake.py"
    path.write_text(FAKE.format(experiments=os.path.join(REPO, "experiments")))
    return str(path)


def test_sides_run_interleaved_each_in_a_process_of_its_own(benchmarking, fake_script, tmp_path):
    log = str(tmp_path / "order.jsonl")
    result = benchmarking.compare(fake_script, ["a", "b"], {"steps": 4, "warmup": 1, "log": log}, rounds=3)
    order = [json.loads(line) for line in open(log)]
    assert [name for name, _ in order] == ["a", "b"] * 3  # A B A B A B
    assert len({pid for _, pid in order}) == 6 and os.getpid() not in {pid for _, pid in order}
    for name in ("a", "b"):
        side = result["sides"][name]
        assert [r["pid"] for r in side["runs"]] == [pid for n, pid in order if n == name]
        for key in ("wall_s", "cpu_s"):
            s = side[key]
            assert s["n"] == 3 * 4  # warm-up calls excluded
            samples = [x for r in side["runs"] for x in r[key]]
            assert s["min"] == min(samples) <= s["median"] <= s["max"] == max(samples)
    ratio = benchmarking.ratio(result, "a", "b")
    assert ratio == result["sides"]["b"]["wall_s"]["median"] / result["sides"]["a"]["wall_s"]["median"]
    assert set(result["load"]) == {"others_cpu_share", "loaded"}
    assert result["load"]["loaded"] in (True, False)  # this machine has /proc/stat


def test_a_failing_side_is_reported_with_its_error(benchmarking, fake_script, tmp_path):
    options = {"steps": 1, "warmup": 0, "log": str(tmp_path / "log")}
    result = benchmarking.compare(fake_script, ["a", "broken"], options, rounds=1)
    assert "wall_s" in result["sides"]["a"]
    assert "this side is broken on purpose" in result["sides"]["broken"]["error"]
    assert benchmarking.ratio(result, "a", "broken") is None


def test_machine_record_and_descriptions(benchmarking):
    info = benchmarking.machine()
    assert info["cores"] >= 1 and len(info["load_average"]) == 3 and info["cpu"]
    assert {"jax", "jaxlib", "torch"} <= set(info["versions"])
    line = benchmarking.describe_machine(info)
    assert f"{info['cores']} cores" in line and "load average" in line and "jax " in line
    assert "LOADED" in benchmarking.describe_load({"others_cpu_share": 0.4, "loaded": True})
    assert "idle" in benchmarking.describe_load({"others_cpu_share": 0.01, "loaded": False})
    # the verdict subtracts this process tree's own CPU time from the machine's
    assert benchmarking.load_verdict(busy_s=9.0, own_s=8.0, wall_s=5.0, n_cores=2)["loaded"] is False
    assert benchmarking.load_verdict(busy_s=9.0, own_s=6.0, wall_s=5.0, n_cores=2)["loaded"] is True


def test_side_environment_and_bad_arguments(benchmarking, tmp_path):
    env = benchmarking.side_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO and env["GLIBC_TUNABLES"]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        benchmarking.time_calls(lambda: None, steps=0, warmup=0)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        benchmarking.compare("x.py", ["a"], {}, rounds=0)
    with pytest.raises(SystemExit, match="usage: --side"):
        benchmarking.main_or_side({"a": None}, None, ["--side", "nope", "--options", "{}"])
    path = str(tmp_path / "out.json")
    benchmarking.write_json(path, {"x": 1})
    assert json.load(open(path)) == {"x": 1} and os.listdir(tmp_path) == ["out.json"]


def _check_timed(result, prefix=""):
    assert len(result[prefix + "wall_s"]) == len(result[prefix + "cpu_s"]) == 1
    assert np.isfinite(result[prefix + "wall_s"][0])


def test_every_benchmarks_sides_run_at_a_tiny_size(benchmarking):
    import bench_attention
    import bench_clip
    import bench_gnn
    import bench_vit

    for side in ("mmjax", "torch"):
        _check_timed(bench_vit.SIDES[side](config="tiny", steps=1, warmup=0))
        _check_timed(bench_clip.SIDES[side](batch=4, steps=1, warmup=0))
    assert bench_vit.SIDES["torch"](config="tiny", steps=1, warmup=0)["threads"] == benchmarking.cores()
    sums = {}
    for path in bench_gnn.PATHS:
        out = bench_gnn.SIDES[path](graph="tiny", steps=1, warmup=0)
        _check_timed(out, "fwd_")
        _check_timed(out, "fwdbwd_")
        sums[path] = out["checksum"]
    for path, checksum in sums.items():  # same graph, same weights: the same output on every path
        np.testing.assert_allclose(checksum, sums["pyg edge_index"], rtol=1e-4, err_msg=path)
    rgcn = {}
    for path in bench_gnn.RGCN_PATHS:
        out = bench_gnn.SIDES[path](graph="tiny", steps=1, warmup=0)
        _check_timed(out, "fwd_")
        _check_timed(out, "fwdbwd_")
        rgcn[path] = out["checksum"]
    np.testing.assert_allclose(rgcn["mmjax rgcn"], rgcn["pyg rgcn"], rtol=1e-4)
    for impl in bench_attention.IMPLS:
        out = bench_attention.SIDES[impl](T=32, causal=True, mode="fwdbwd")
        assert out["peak_mib"] >= 0 and 1 <= len(out["wall_s"]) <= 5


def test_vit_profile_variants_and_breakdown_run_at_a_tiny_size(benchmarking):
    import bench_vit
    import bench_vit_profile

    for name in ("no_donate", "remat", "attn_reference", "gelu_tanh", "adamw_flat"):  # in this process
        _check_timed(bench_vit_profile.SIDES[name](config="tiny", steps=1, warmup=0))
    # a variant with its own environment runs in a process of its own, which re-executes itself with it
    out = benchmarking.run_side(bench_vit_profile.__file__, "xnnpack", {"config": "tiny", "steps": 1, "warmup": 0})
    assert "error" not in out, out
    assert out["xla_flags"] == "--xla_cpu_use_xnnpack=true" and len(out["wall_s"]) == 1
    res = bench_vit_profile.breakdown("tiny", steps=1, warmup=0)
    parts = res["parts"]
    assert parts["step (fwd + bwd + AdamW)"]["share_of_step"] == 1.0
    assert all(p["median_s"] > 0 and p["count"] >= 1 for p in parts.values())
    assert parts["    LayerNorm"]["count"] == 2 * bench_vit.CONFIGS["tiny"]["depth"]
    assert res["hlo_census"]["dot"] > 0 and res["hlo_census"]["fusion"] > 0
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'adamw_flat'"):
        bench_vit.bench_mmjax("tiny", 1, 0, optimizer="sgd")


def test_diffusion_benchmark_sides_run_at_a_tiny_size(benchmarking):
    import bench_diffusion

    cfg = bench_diffusion.CONFIGS["tiny"]
    checksums = {}
    for workload in bench_diffusion.WORKLOADS:
        for side in ("mmjax", "torch"):
            out = bench_diffusion.SIDES[side](cfg=cfg, workload=workload, steps=1, warmup=0)
            _check_timed(out)
            assert out["params"] > 0
            if workload == "sample":
                checksums[side] = out["checksum"]
    # same sizes, weights, noise, labels and DDIM schedule: the same samples on both sides
    np.testing.assert_allclose(checksums["mmjax"], checksums["torch"], rtol=1e-4)
    with pytest.raises(ValueError, match="workload must be one of"):
        bench_diffusion.SIDES["mmjax"](cfg=cfg, workload="nope", steps=1, warmup=0)


def test_summary_plot_and_bad_benchmark_names(benchmarking, tmp_path):
    import bench_all

    load = {"others_cpu_share": 0.01, "loaded": False}
    result = {"sides": {"ours": {"wall_s": {"median": 2.0}}, "theirs": {"wall_s": {"median": 3.0}}}, "load": load}
    row = bench_all._row("w1", "ref", result, "ours", "theirs")
    assert (row["mmjax_s"], row["reference_s"], row["ratio"], row["loaded"]) == (2.0, 3.0, 1.5, False)
    failed = bench_all._row(
        "failed", "ref", {**result, "sides": {"ours": {"error": "x"}, "theirs": {}}}, "ours", "theirs"
    )
    assert failed["ratio"] is None
    slower = bench_all._record_row("w2", "ref", 1.0, 0.8, {**load, "loaded": True})
    bench_all.plot([row, slower, failed], str(tmp_path / "b.png"), title="a title")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--only must name benchmarks"):
        bench_all.main(["--only", "nope", "--out", str(tmp_path)])


def test_generate_benchmark_sides_run_at_a_tiny_size(benchmarking, tmp_path):
    import bench_all
    import bench_generate

    assert "generate" in bench_all.BENCHMARKS

    cfg = bench_generate.CONFIGS["tiny"]
    directory = str(tmp_path / "hf")
    assert bench_generate.SIDES["build"](cfg=cfg, directory=directory)["params"] > 0
    common = dict(cfg=cfg, directory=directory, steps=1, warmup=0)
    for workload in ("greedy", "beam"):
        runs = {side: bench_generate.SIDES[side](workload=workload, **common) for side in ("mmjax", "torch")}
        for out in runs.values():
            _check_timed(out)
            assert out["params"] == runs["torch"]["params"]
        # the same weights (converted from the saved directory) and images: the same sequences, every one running
        # to max_new_tokens (end of text is never chosen)
        seqs = np.array(runs["mmjax"]["sequences"])
        assert seqs.shape == (cfg["batch"], 1 + cfg["new_tokens"]) and not (seqs == bench_generate.EOS).any()
        np.testing.assert_array_equal(seqs, runs["torch"]["sequences"], err_msg=workload)
    prefix = cfg["prefixes"][0]
    runs = {side: bench_generate.SIDES[side](workload="prefix", prefix=prefix, **common) for side in ("mmjax", "torch")}
    for out in runs.values():
        for key in ("cached_step_s", "cached_full_s", "cached_one_s", "uncached_step_s"):
            assert len(out[key]) == 1 and np.isfinite(out[key][0]), key
    assert runs["mmjax"]["uncached_length"] == prefix + cfg["uncached_new"] // 2
    np.testing.assert_array_equal(runs["mmjax"]["sequences"], runs["torch"]["sequences"])
    assert np.array(runs["mmjax"]["sequences"]).shape == (cfg["prefix_batch"], cfg["prefix_new"])
    with pytest.raises(ValueError, match="workload must be one of"):
        bench_generate.SIDES["mmjax"](workload="nope", **common)
    with pytest.raises(ValueError, match="needs prefix"):
        bench_generate.SIDES["torch"](workload="prefix", **common)
