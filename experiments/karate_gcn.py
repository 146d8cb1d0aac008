"""Semi-supervised node classification on Zachary's karate club with a 2-layer GCN (Kipf & Welling, 2017),
trained by the mmjax engine (task ``"node_classification"``, model ``"gcn"`` = :class:`mmjax.graph_models.GCN`).

Graph: ``networkx.karate_club_graph()`` (34 members, 78 friendships, both directions; :mod:`mmjax.data.karate`);
label: the club each member joined after the split ("Mr. Hi" = 0, "Officer" = 1). Features: one-hot node ids
(``X = I``). Only the two leaders (node 0, Mr. Hi; node 33, the administrator) are labelled; the loss is masked to
them and accuracy is reported on the other 32 nodes. Model: ``GCNConv(16) -> tanh -> GCNConv(2)``; the 2-D output
is both the logits and the embedding plotted in ``WORKDIR/embedding.png`` (the task's final report). Full-batch:
one step is the whole graph; Adam (no weight decay, no clipping), constant learning rate 0.01, 200 steps.

Command:

    .venv/bin/python -m mmjax train --config experiments/karate_gcn.py --workdir /tmp/karate_gcn

(or ``.venv/bin/python experiments/karate_gcn.py --workdir /tmp/karate_gcn``).

Expected: ``eval_accuracy`` (the 32 unlabelled members) 0.938 (30 of 32) with seed 0, in a few seconds on a CPU;
``embedding.png`` shows the two clubs at opposite ends of a line (logit 0 minus logit 1), node 8 and node 2 the
misclassified / borderline members near the middle.
"""

from __future__ import annotations

import argparse
import json

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The engine config of this job (merged over :func:`mmjax.train.config.default_config`)."""
    from mmjax.train.config import default_config

    c = default_config("node_classification")  # the engine's and the task's defaults
    c.task = "node_classification"
    c.model = ml_collections.ConfigDict({"name": "gcn", "hidden": 16, "activation": "tanh", "dropout": 0.0})
    c.data = ml_collections.ConfigDict({"name": "karate_club", "train_nodes": [0, 33]})
    c.batch_size = 1  # one graph per step
    c.eval_batch_size = 1
    c.num_steps = 200
    c.optimizer.lr = 0.01
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 0.0
    c.optimizer.end_lr_ratio = 1.0  # constant learning rate, as in the original full-batch Adam loop
    c.log_every = 20
    c.checkpoint_every = 0  # a checkpoint at the end only
    c.progress = False
    c.tensorboard = False
    return c


def main(argv=None) -> dict:
    """Trains with :func:`mmjax.train.train_and_evaluate` and prints the result; returns it."""
    from mmjax.train import train_and_evaluate

    ap = argparse.ArgumentParser(description="2-layer GCN on Zachary's karate club (mmjax engine)")
    ap.add_argument("--workdir", default="/tmp/karate_gcn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = get_config()
    config.num_steps, config.seed = args.steps, args.seed
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps(result, indent=1, default=str))
    print(f"accuracy on the {int(result['eval_count'])} unlabelled members: {result['eval_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
