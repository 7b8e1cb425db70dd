"""Benchmark of the offline FID's classifier: its test accuracy, and fid_c10 of real test
images against the training set's statistics (the floor a perfect generator would reach at
that sample count).

    python bench/fid_c10.py [--data-dir ../shared/data/cifar10] [--n 10000]

Merges ``fid_c10_classifier_test_accuracy``, ``fid_c10_train_vs_test`` (with ``_n`` and
``_ref_n``) into bench/results.json (keeping the other keys) and prints a BENCHMARKS.md line.
The training-set statistics are cached in akod_ray/evaluation/weights/c10_train_stats.npz.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from akod_ray.data.parquet import load_images  # noqa: E402
from akod_ray.evaluation import fid  # noqa: E402
from akod_ray.evaluation.feature_net import DEFAULT_C10_REFERENCE, DEFAULT_WEIGHTS, load_feature_net, weights_record  # noqa: E402
from akod_ray.evaluation.train_classifier import evaluate  # noqa: E402


def merge_results(path: Path, values: dict) -> dict:
    """Read-modify-write ``path`` (a JSON object), atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--n", type=int, default=10_000, help="test images (seeded subset when < 10000)")
    p.add_argument("--evaluate", action="store_true", help="measure the test accuracy instead of reading the weights' JSON")
    p.add_argument("--recompute-stats", action="store_true", help="recompute the cached training-set statistics")
    p.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    net = load_feature_net(DEFAULT_WEIGHTS)
    record = weights_record(DEFAULT_WEIGHTS)
    if args.evaluate or "test_accuracy" not in record:
        x_test, y_test = load_images(args.data_dir, "test", return_labels=True)
        accuracy = evaluate(net, x_test, y_test, bf16=False)
    else:
        accuracy = record["test_accuracy"]

    t0 = time.time()
    stats_fresh = DEFAULT_C10_REFERENCE.is_file() and not args.recompute_stats
    if stats_fresh:
        ref = fid.load_reference_stats(DEFAULT_C10_REFERENCE)
        stats_fresh = ref.implementation == fid.c10_implementation(net)
    if not stats_fresh:
        ref = fid.compute_reference_stats(args.data_dir, DEFAULT_C10_REFERENCE, feature="c10", split="train")
    t_ref = time.time() - t0

    t0 = time.time()
    test = load_images(args.data_dir, "test", count=args.n, seed=0)
    value = fid.fid_c10(test, ref, net=net, progress_desc="fid_c10 test features")
    t_fid = time.time() - t0

    results = {
        "fid_c10_classifier_test_accuracy": round(accuracy, 4),
        "fid_c10_train_vs_test": round(value, 4),
        "fid_c10_train_vs_test_n": int(test.shape[0]),
        "fid_c10_train_vs_test_ref_n": ref.n,
    }
    merge_results(Path(args.results), results)
    print(json.dumps(results))
    print(f"ref stats {t_ref:.0f}s ({'cached' if stats_fresh else 'computed'}), fid_c10 {t_fid:.0f}s, "
          f"{torch.get_num_threads()} thread(s)")
    epochs = record.get("epochs", "?")
    print(f"| fid_c10 (offline FID, classifier features {net.feature_dim}-d) | classifier test accuracy {accuracy:.4f} "
          f"({epochs} epochs); fid_c10 of CIFAR-10 test (N={test.shape[0]}) vs train stats (N={ref.n}) = {value:.3f} "
          f"| `python bench/fid_c10.py` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
