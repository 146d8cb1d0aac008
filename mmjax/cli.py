"""The ``mmjax`` command line: ``mmjax train``, ``eval``, ``generate``, ``caption``, ``convert`` and ``bench``
(subcommands live in :data:`COMMANDS`).

``mmjax train --config experiments/fashion_mnist_vit.py --workdir /tmp/fm --config.batch_size=256``

Overrides ``--config.a.b=value`` (or ``--config.a.b value``) set nested config fields; the value is parsed like a
Python literal (``3``, ``0.1``, ``True``, ``(1, 2)``, ``None``) and otherwise taken as a string, then coerced to the
type of the existing field (an ``int`` field given ``3.0`` is an error, a ``float`` field given ``3`` becomes
``3.0``). An unknown key is an error naming the closest valid ones. ``--config.seed=0,1,2`` runs a seed sweep
(:mod:`mmjax.train.sweep`): one run per seed in ``DIR/seed_N``, then ``DIR/seeds.json``.

Exit status: 0 on success, 2 for a usage error or a :class:`mmjax.errors.UserError` (its message is printed), 1 for
any other exception (a bug: its traceback is printed).

Adding a subcommand is one line in :data:`COMMANDS`: ``name: (help, add_arguments(parser), run(args) -> int)``.

>>> parse_override_value("0.5"), parse_override_value("True"), parse_override_value("vit")
(0.5, True, 'vit')
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable

import ml_collections

from mmjax.errors import ConfigError, UserError
from mmjax.keypath import set_path


def parse_override_value(text: str):
    """A command-line value as a Python literal when it is one, else the string itself.

    >>> parse_override_value("3e-4"), parse_override_value("[1, 2]"), parse_override_value("adamw")
    (0.0003, [1, 2], 'adamw')
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a config file and returns its ``get_config()``.

    Raises:
      UserError: if the file does not exist or has no ``get_config``.

    >>> load_config_file("/nonexistent.py")
    Traceback (most recent call last):
    ...
    mmjax.errors.UserError: --config '/nonexistent.py': no such file (expected a Python file with get_config())
    """
    if not os.path.isfile(path):
        raise UserError(f"--config {path!r}: no such file (expected a Python file with get_config())")
    spec = importlib.util.spec_from_file_location(f"mmjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path!r} defines no get_config() function")
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """Sets ``config.<dotted key> = value`` for each ``(key, text)`` (:func:`mmjax.keypath.set_path`), the value
    coerced to the type of the field it replaces; unknown keys are reported when the config is validated
    (:func:`mmjax.train.config.prepare_config`), with the closest valid names.

    >>> c = ml_collections.ConfigDict({"a": {"b": 1.0}, "n": 2})
    >>> apply_overrides(c, [("a.b", "3"), ("n", "5")]).a.b
    3.0
    """
    for key, text in overrides:

        def coerce(old, value, key=key, text=text):
            if old is None or isinstance(old, ml_collections.ConfigDict):
                return value
            if isinstance(old, bool) and not isinstance(value, bool):
                raise ConfigError(f"--config.{key}={text!r}: expected True or False")
            if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if isinstance(old, str) and not isinstance(value, str):
                return text
            if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float):
                raise ConfigError(f"--config.{key}={text!r}: expected an int (the field is {old!r})")
            if isinstance(old, tuple) and isinstance(value, list):
                return tuple(value)
            return value

        set_path(config, key, parse_override_value(text), convert=coerce)
    return config


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and len(arg) > len("--config."):
            body = arg[len("--config.") :]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{arg}: missing value (use {arg}=VALUE)")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def initialize_distributed(config) -> bool:
    """Starts multi-process JAX when ``config.distributed`` or the environment asks for it (see
    :mod:`mmjax.train.distributed`); a single-process run is left alone.

    >>> initialize_distributed(ml_collections.ConfigDict())
    False
    """
    from mmjax.train.distributed import initialize

    return initialize(config)


# ------------------------------------------------------------------------------------------------------ train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        metavar="FILE",
        help="experiment config file defining get_config() (e.g. experiments/fashion_mnist_vit.py)",
    )
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="run directory: config.json, checkpoints/, metrics.jsonl, tensorboard/, curves.png; "
        "rerunning with the same DIR resumes from its latest checkpoint",
    )
    p.epilog = (
        "Overrides: --config.KEY=VALUE sets a (nested) config field, e.g. --config.batch_size=256 "
        "--config.optimizer.lr=1e-3 --config.parallel.mode=pmap --config.data.data_dir=/path. "
        "Seed sweep: --config.seed=0,1,2 trains one run per seed in DIR/seed_N and writes DIR/seeds.json (mean, "
        "min and max of each final metric over the seeds, each run's wall time). "
        "SIGTERM saves a checkpoint and exits 0; rerun the same command to continue."
    )


def split_seed_sweep(overrides: list[tuple[str, str]]) -> tuple[list[int] | None, list[tuple[str, str]]]:
    """``(seeds, other overrides)``: ``seeds`` is the list of a comma-separated ``--config.seed=0,1,2`` (a seed
    sweep), else ``None`` (``seed`` is the only key that takes a list).

    >>> split_seed_sweep([("seed", "0,1,2"), ("batch_size", "8")])
    ([0, 1, 2], [('batch_size', '8')])
    >>> split_seed_sweep([("seed", "3")])
    (None, [('seed', '3')])
    """
    from mmjax.train.sweep import parse_seed_list

    seeds, rest = None, []
    for key, text in overrides:
        if key == "seed" and "," in text:
            seeds = parse_seed_list(text)
        else:
            rest.append((key, text))
    return seeds, rest


def _run_train(args) -> int:
    from mmjax.train import train_and_evaluate

    seeds, overrides = split_seed_sweep(args.overrides)
    config = apply_overrides(load_config_file(args.config), overrides)
    initialize_distributed(config)
    if seeds is not None:
        return _run_seed_sweep(config, args.workdir, seeds)
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps(result, indent=2, default=str))
    if result.get("preempted"):
        print(
            f"stopped by SIGTERM at step {result['step']}; checkpoint saved in {result['workdir']}; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
    else:
        acc = result.get("eval_accuracy")
        print(
            f"done: step {result['step']}, "
            + (f"eval accuracy {acc:.4f}, " if acc is not None else "")
            + f"wall time {result['wall_time_s']:.1f} s, workdir {result['workdir']}"
        )
    return 0


def _run_seed_sweep(config, workdir: str, seeds: list[int]) -> int:
    from mmjax.train.sweep import SUMMARY_FILE, format_summary, run_seed_sweep

    summary = run_seed_sweep(config, workdir, seeds)
    if summary.get("preempted"):
        print(
            f"stopped by SIGTERM in the run of seed {summary['seed']} ({summary['workdir']}); checkpoint saved; "
            "rerun the same command to resume the sweep",
            file=sys.stderr,
        )
        return 0
    print(json.dumps(summary, indent=2, default=str))
    print(format_summary(summary))
    print(f"done: {len(seeds)} seeds, summary in {os.path.join(os.path.abspath(workdir), SUMMARY_FILE)}")
    return 0


# ------------------------------------------------------------------------------------------------------- eval
def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="a training run's directory: its config.json and latest checkpoint are evaluated",
    )
    p.epilog = (
        "Overrides: --config.KEY=VALUE changes the saved config for this evaluation, e.g. "
        "--config.data.eval_split=test --config.eval_batch_size=1000 --config.parallel.mode=single."
    )


def _run_eval(args) -> int:
    from mmjax.train import evaluate

    overrides = apply_overrides(ml_collections.ConfigDict(), args.overrides) if args.overrides else None
    print(json.dumps(evaluate(args.workdir, overrides), indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------------- generate
def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, metavar="DIR", help="a diffusion training run's directory")
    p.add_argument(
        "--prompt", required=True, action="append", metavar="TEXT", help="a caption to draw (repeat for several)"
    )
    p.add_argument("--num", type=int, default=16, metavar="N", help="samples per prompt (default 16)")
    p.add_argument("--out", required=True, metavar="PNG", help="the grid: one row per prompt, N samples each")
    p.add_argument("--sampler", default=None, help="ddpm, ddim or dpm_solver++ (default: the run's)")
    p.add_argument("--steps", type=int, default=None, metavar="K", help="sampling steps (default: the run's)")
    p.add_argument("--guidance", type=float, default=None, metavar="W", help="guidance scale (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampler option of mmjax.diffusion.sample, named as diffusers names it (eta=0.5, "
        "timestep_spacing=trailing, ...); repeat for several",
    )
    p.add_argument("--npy", default=None, metavar="FILE", help="also save the images, uint8 [P * N, S, S, 3]")
    p.epilog = (
        "Samples the latest checkpoint of the run (its EMA parameters when it kept them) with classifier-free "
        "guidance, the conditional and null-condition halves in one batch."
    )


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option eta=0.5")
        out[key] = parse_override_value(value)
    return out


def _run_generate(args) -> int:
    import jax

    from mmjax.train import restore_run
    from mmjax.train.diffusion import sample_grid

    if args.overrides:
        key = args.overrides[0][0]
        raise UserError(f"--config.{key}: mmjax generate takes no config overrides (it samples the run as trained)")
    if args.num < 1:
        raise UserError(f"--num={args.num} is not valid; expected an int >= 1 (samples per prompt)")
    options = _parse_options(args.option)
    config, task, params, step = restore_run(args.workdir)
    if not hasattr(task, "generate"):
        raise UserError(
            f"--workdir {args.workdir!r} is a {config.task!r} run; mmjax generate samples a 'diffusion' run"
        )
    captions = [p for p in args.prompt for _ in range(args.num)]
    kw = dict(guidance_scale=args.guidance, num_steps=args.steps, sampler=args.sampler, **options)
    images = task.generate_many(params, captions, jax.random.key(args.seed), chunk=min(len(captions), 128), **kw)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sample_grid(images, args.prompt, args.num, args.out)
    if args.npy:
        import numpy as np

        np.save(args.npy, images)
    o = task.opts
    print(
        f"wrote {args.out}: {len(args.prompt)} prompt(s) x {args.num} samples of step {step} of {args.workdir} "
        f"({args.sampler or o.sampler}, {args.steps or o.num_sampling_steps} steps, guidance "
        f"{o.guidance_scale if args.guidance is None else args.guidance})"
    )
    return 0


# ---------------------------------------------------------------------------------------------------- caption
def _add_caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, metavar="DIR", help="a captioning training run's directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to caption (PNG, JPEG: anything PIL reads)")
    p.add_argument(
        "--num-beams", type=int, default=1, metavar="N", help="beam search with N beams (default 1: greedy decoding)"
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        metavar="A",
        help="beam search: a finished caption scores sum(log p) / length ** A (default: the run's "
        "config.captioning.length_penalty)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="K",
        help="the most tokens to generate (default: every decoder position after the start token, "
        "config.model.context_length - 1)",
    )
    p.add_argument(
        "--scores",
        action="store_true",
        help="add each caption's score as a third column (greedy: the sum of its tokens' log-probabilities; beam "
        "search: that sum divided by length ** length_penalty)",
    )
    p.epilog = (
        "Prints one line per image: PATH<TAB>caption (<TAB>score with --scores). Each image is converted to RGB and "
        "resized (bilinear) to the run's config.data.image_size square, then normalised as the run's training "
        "images were; captions come from the latest checkpoint of the run (its EMA parameters when it kept them) "
        "through mmjax.generate.generate."
    )


def _load_images(paths: list[str], size: int | None):
    """The files ``paths`` as uint8 ``[N, size, size, 3]`` RGB (as the training images; ``size=None``: as they are);
    a file PIL cannot read is a :class:`UserError` naming it."""
    import numpy as np
    from PIL import Image

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"IMAGE {path!r}: no such file (expected a PNG or JPEG image file)")
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")  # also reads the pixels: a truncated file fails here
                if size is not None and image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                out.append(np.asarray(image, np.uint8))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(
                f"IMAGE {path!r} is not an image PIL can read ({type(e).__name__}: {e}); pass PNG or JPEG files"
            ) from e
    return np.stack(out)


def _run_caption(args) -> int:
    from mmjax.train import restore_run
    from mmjax.train.loop import load_config

    if args.overrides:
        key = args.overrides[0][0]
        raise UserError(
            f"--config.{key}: mmjax caption takes no config overrides (it captions with the run as trained)"
        )
    if args.num_beams < 1:
        raise UserError(
            f"--num-beams={args.num_beams} is not valid; expected an int >= 1 (1: greedy decoding, N > 1: beam "
            "search with N beams)"
        )
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} is not valid; expected an int >= 1")
    saved = load_config(args.workdir)
    if saved.get("task") != "captioning":
        raise UserError(
            f"--workdir {args.workdir!r} is a {saved.get('task')!r} run; mmjax caption needs a 'captioning' run "
            "(train one with mmjax train --config experiments/caption_fashion_mnist.py --workdir DIR)"
        )
    pixels = _load_images(args.images, int(saved.data.image_size))
    config, task, params, _ = restore_run(args.workdir)
    model = task.model
    limit = model.decoder.max_length - 1  # positions after the start token
    max_new_tokens = limit if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens > limit:
        raise UserError(
            f"--max-new-tokens={max_new_tokens} does not fit the decoder: it has {model.decoder.max_length} positions "
            f"(config.model.context_length), the start token takes one; use at most {limit}"
        )
    texts, scores = task.caption_images(
        params,
        pixels,
        batch_size=min(len(pixels), int(config.eval_batch_size)),
        decode="autoregressive",
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens=max_new_tokens,
        with_scores=True,
    )
    for path, text, score in zip(args.images, texts, scores):
        print(f"{path}\t{text}" + (f"\t{score:.4f}" if args.scores else ""))
    return 0


# ----------------------------------------------------------------------------------------------------- detect
def _add_detect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, metavar="DIR", help="a detection training run's directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG) of the run's image size")
    p.add_argument(
        "--query", action="append", default=[], metavar="TEXT", help='a text query, e.g. "a red sneaker" (repeatable)'
    )
    p.add_argument(
        "--threshold", type=float, default=0.3, metavar="S", help="also print further boxes scoring at least S (0.3)"
    )
    p.add_argument("--out", default=None, metavar="PNG", help="draw the images with their boxes into this PNG file")
    p.epilog = (
        "Prints one line per box: PATH<TAB>QUERY<TAB>x0 y0 x1 y1<TAB>score (pixels; score = sigmoid probability). "
        "For each query the best box is printed, then every other box scoring at least --threshold that overlaps no "
        "better box of that query (IoU < 0.5). Images must have the run's config.data.image_size; queries are any "
        "text, read with the run's tokenizer."
    )


def _run_detect(args) -> int:
    import numpy as np

    from mmjax.train import restore_run
    from mmjax.train.loop import load_config

    if args.overrides:
        raise UserError(f"--config.{args.overrides[0][0]}: mmjax detect takes no config overrides")
    if not args.query:
        raise UserError('no query given: add one or more --query "a red sneaker"')
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold={args.threshold} is not valid; expected a score in [0, 1]")
    saved = load_config(args.workdir)
    if saved.get("task") != "detection":
        raise UserError(
            f"--workdir {args.workdir!r} is a {saved.get('task')!r} run; mmjax detect needs a 'detection' run "
            "(train one with mmjax train --config experiments/detect_fashion_mnist.py --workdir DIR)"
        )
    size = int(saved.data.image_size)
    pixels = []
    for path in args.images:
        image = _load_images([path], None)[0]
        if image.shape[:2] != (size, size):
            raise UserError(
                f"IMAGE {path!r} is {image.shape[1]}x{image.shape[0]} px; the run detects in {size}x{size} images "
                "(config.data.image_size): resize it first"
            )
        pixels.append(image)
    pixels = np.stack(pixels)
    _, task, params, _ = restore_run(args.workdir, {"detection": {"final_report": False}})
    found = task.detect_phrases(params, pixels, args.query, threshold=args.threshold)
    for path, boxes in zip(args.images, found):
        for d in boxes:
            print(f"{path}\t{d['query']}\t" + " ".join(f"{v:.1f}" for v in d["box"]) + f"\t{d['score']:.4f}")
    if args.out:
        from mmjax.train.detection import draw_detections

        dets = []
        for boxes in found:
            keep = [d for d in boxes if d["score"] >= args.threshold]
            dets.append(
                {
                    "boxes": np.array([d["box"] for d in keep]).reshape(-1, 4),
                    "labels": np.array([args.query.index(d["query"]) for d in keep], int),
                    "scores": np.array([d["score"] for d in keep]),
                }
            )
        draw_detections(pixels, dets, list(args.query), args.out, threshold=args.threshold)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------- convert
def _add_convert_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--from-hf",
        metavar="DIR",
        help="a Hugging Face CLIP directory (config.json + model.safetensors or pytorch_model.bin)",
    )
    src.add_argument(
        "--to-hf",
        metavar="DIR",
        help="an mmjax directory written by 'mmjax convert --from-hf' (mmjax_config.json + "
        "params.safetensors), written back in the Hugging Face layout",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.epilog = (
        "--from-hf writes params.safetensors (flat 'a/b/c' keys of the mmjax parameter tree) and "
        "mmjax_config.json; load them with mmjax.convert.hf_clip.load_dir(DIR). --to-hf writes model.safetensors "
        "+ config.json that transformers.CLIPModel.from_pretrained(DIR) loads. Weights are read without "
        "unpickling (safetensors; pytorch_model.bin only through torch.load(weights_only=True)). "
        "ViT checkpoints: use mmjax.convert.from_hf(DIR) in Python."
    )


def _convert_module(kind: str, where: str):
    """The converter module of a model type (``clip`` or ``vision-encoder-decoder``)."""
    import importlib

    modules = {"clip": "hf_clip", "vision-encoder-decoder": "hf_vision_encoder_decoder"}
    if kind not in modules:
        raise UserError(
            f"{where} model_type {kind!r}; the command line converts {sorted(modules)} (for 'vit' use "
            "mmjax.convert.from_hf in Python)"
        )
    return importlib.import_module(f"mmjax.convert.{modules[kind]}")


def _run_convert(args) -> int:
    import json

    from mmjax.convert.io import load_config

    if args.from_hf:
        model_type = load_config(args.from_hf).get("model_type")
        module = _convert_module(model_type, f"--from-hf {args.from_hf!r}: config.json has")
        converted = module.convert_hf_dir(args.from_hf, args.out)
        if model_type == "clip":
            detail = (
                f"CLIP, vision width {converted.vision_width}, text width {converted.text_width}, embedding "
                f"{converted.embed_dim}"
            )
        else:
            detail = f"Captioner, decoder width {converted.decoder.width}, {converted.decoder.depth} blocks"
        print(f"converted {args.from_hf} -> {args.out} (mmjax {detail})")
    else:
        meta = os.path.join(args.to_hf, "mmjax_config.json")
        kind = "clip"
        if os.path.isfile(meta):
            with open(meta) as f:
                kind = json.load(f).get("model", "clip")
        module = _convert_module(kind, f"--to-hf {args.to_hf!r}: mmjax_config.json has")
        model, params = module.load_dir(args.to_hf)
        module.to_hf_dir(model, params, args.out)
        print(f"wrote the Hugging Face layout of {args.to_hf} to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------ bench
BENCHMARKS = ("attention", "vit", "gnn", "clip", "diffusion", "generate", "all")


def _experiments_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name", choices=BENCHMARKS, help="which benchmark: experiments/bench_NAME.py (all: every one, as make bench)"
    )
    p.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="arguments passed to the benchmark (see 'mmjax bench NAME --help'), e.g. --json out.json",
    )
    p.epilog = (
        "Each benchmark runs mmjax and its reference (torch SDPA / jax.nn, transformers, PyTorch Geometric), each "
        "side in a process of its own, interleaved (experiments/benchmarking.py), and prints times with the ratios "
        "reference / mmjax, the machine and whether other processes loaded it. Needs a source checkout "
        "(experiments/) and the test extra (pip install -e '.[test]')."
    )


def _run_bench(args) -> int:
    import runpy

    path = os.path.join(_experiments_dir(), f"bench_{args.name}.py")
    if not os.path.isfile(path):
        raise UserError(f"bench {args.name!r}: {path} not found; benchmarks live in a source checkout's experiments/")
    saved = sys.argv
    sys.argv = [path, *args.bench_args]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0


#: Subcommands: name -> (one-line help, add_arguments(parser), run(args) -> exit code).
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "train": ("train a config (resumes from the workdir's latest checkpoint)", _add_train_args, _run_train),
    "eval": ("evaluate the latest checkpoint of a training run", _add_eval_args, _run_eval),
    "generate": ("draw images for prompts with a diffusion run", _add_generate_args, _run_generate),
    "caption": ("print captions of image files with a captioning run", _add_caption_args, _run_caption),
    "detect": ("print the boxes of text queries in image files with a detection run", _add_detect_args, _run_detect),
    "convert": (
        "convert CLIP or ViT-GPT2 captioner weights between Hugging Face and mmjax layouts",
        _add_convert_args,
        _run_convert,
    ),
    "bench": (
        "run a benchmark of mmjax against its reference (experiments/bench_NAME.py)",
        _add_bench_args,
        _run_bench,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of :data:`COMMANDS`.

    >>> build_parser().parse_args(["eval", "--workdir", "/tmp/run"]).workdir
    '/tmp/run'
    """
    parser = argparse.ArgumentParser(
        prog="mmjax", description="mmjax: multimodal models in JAX/Flax - train, evaluate, convert weights, benchmark."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


HUGE_PAGES = "glibc.malloc.hugetlb=1"
HUGE_PAGE_COMMANDS = ("train", "eval")  # the commands that run XLA:CPU programs for long


def huge_page_environment(environ, argv, platform: str = sys.platform, glibc: str | None = None):
    """The environment to run ``mmjax argv`` in with malloc's large blocks on transparent huge pages, or ``None``.

    XLA:CPU allocates each step's large buffers with malloc; backed by 4 KiB pages they cost TLB misses and page
    faults on every step. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) makes malloc ask for
    transparent huge pages; measured on the 2-core CPU, the Fashion-MNIST ViT training step ran 1.75x faster with it
    (227 instead of 130 images/s; PyTorch's 1.09x) and the CLIP job 1.17x. glibc reads it only when a process
    starts, so ``mmjax train`` and ``mmjax eval`` start themselves again with it (:func:`main`). ``None`` when
    ``GLIBC_TUNABLES`` is already set (to anything: set it to ``""`` to opt out), off Linux, with an older glibc,
    or for another command.

    >>> env = huge_page_environment({}, ["train", "--config", "c.py"], platform="linux", glibc="glibc 2.36")
    >>> env["GLIBC_TUNABLES"]
    'glibc.malloc.hugetlb=1'
    >>> huge_page_environment({"GLIBC_TUNABLES": ""}, ["train"], platform="linux", glibc="glibc 2.36") is None
    True
    >>> huge_page_environment({}, ["train"], platform="linux", glibc="glibc 2.31") is None
    True
    """
    if platform != "linux" or "GLIBC_TUNABLES" in environ or not argv or argv[0] not in HUGE_PAGE_COMMANDS:
        return None
    if glibc is None:
        try:
            glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):
            glibc = ""
    name, _, version = glibc.partition(" ")
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35):
        return None
    return {**environ, "GLIBC_TUNABLES": HUGE_PAGES}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmjax`` script; returns the exit code.

    0 on success; 2 for a usage error or a :class:`mmjax.errors.UserError` (a bad setting, a missing file: its
    one-line message is printed); 1 for any other exception, whose traceback is printed (that is a bug in mmjax or
    in the code a config names, not a problem with the command).

    Run as the program (``argv`` None), ``train`` and ``eval`` first start themselves again in the same process
    (``os.execve``: same PID, same arguments) with huge pages for malloc unless ``GLIBC_TUNABLES`` is set; see
    :func:`huge_page_environment`.

    >>> main(["eval", "--workdir", "/nonexistent"])
    2
    """
    if argv is None:
        env = huge_page_environment(os.environ, sys.argv[1:])
        if env is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", "mmjax", *sys.argv[1:]], env)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        rest, overrides = _split_config_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(rest)
    args.overrides = overrides
    try:
        return args._run(args)
    except (UserError, FileNotFoundError) as e:
        print(f"mmjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:  # a bug, not a user error: show where it happened
        traceback.print_exc()
        print(
            f"mmjax {args.command}: internal error (traceback above); this is not a problem with the command's "
            "arguments, please report it",
            file=sys.stderr,
        )
        return 1
