"""The A100 sweep configs: one GPU per trial at the paper's batch (8 trials on one node), and one
trial over a node's 8 GPUs at a larger batch; both load, and agree with cluster/a100.yaml."""

from __future__ import annotations

import yaml

from akod_ray.config import load_config
from akod_ray.training.fast_step import resolve_compile
from ray_helpers import REPO, TUNE_CONFIGS

GPUS_PER_NODE = {"p4d.24xlarge": 8, "p4de.24xlarge": 8}


def cluster() -> tuple[int, int]:
    """(GPUs per worker node, the head's TRAIN_DRIVER units) of cluster/a100.yaml."""
    cfg = yaml.safe_load((REPO / "cluster" / "a100.yaml").read_text())
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    (gpus,) = {GPUS_PER_NODE[w["node_config"]["InstanceType"]] for w in workers}
    return gpus, head["resources"]["TRAIN_DRIVER"]


def test_one_gpu_per_trial_at_the_papers_batch():
    cfg = load_config(TUNE_CONFIGS / "cifar10_a100.yaml")
    gpus, drivers = cluster()
    tc = cfg.train
    assert (tc.num_workers, tc.batch_size, tc.use_gpu, tc.grad_accum) == (1, 64, True, 1)
    assert cfg.sweep.budget / tc.batch_size == 800_000  # Ho et al.'s steps
    assert cfg.sweep.max_concurrent_trials == gpus == 8  # one node's GPUs, one trial each
    assert drivers >= cfg.sweep.max_concurrent_trials  # every running trial gets its driver on the head
    assert resolve_compile(tc.compile, "cuda", distributed=tc.num_workers > 1)[0] == "reduce-overhead"
    assert cfg.data.val_size % tc.val_batch == 0


def test_one_trial_over_a_node_at_a_larger_batch():
    single = load_config(TUNE_CONFIGS / "cifar10_a100.yaml")
    cfg = load_config(TUNE_CONFIGS / "cifar10_a100_multigpu.yaml")
    gpus, _ = cluster()
    tc = cfg.train
    assert tc.num_workers == gpus and tc.batch_size // tc.num_workers == 256
    assert cfg.sweep.budget == single.sweep.budget  # the same images per arm
    assert cfg.sweep.arms == single.sweep.arms and cfg.sweep.kernel_sizes == single.sweep.kernel_sizes
    assert cfg.sweep.max_concurrent_trials * tc.num_workers <= gpus * 4  # cluster/a100.yaml: up to 4 nodes
    assert resolve_compile(tc.compile, "cuda", distributed=True)[0] == "default"
    assert cfg.run.root == single.run.root and cfg.sweep.name != single.sweep.name
    assert (cfg.data.val_size // tc.num_workers) % tc.val_batch == 0
