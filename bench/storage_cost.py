"""What a run in a bucket costs against the same run in a local folder (issue 22).

    .venv/bin/python bench/storage_cost.py [--steps 60] [--reps 3] [--no-write]

1. The same training run (akod_ray.training.loop.run_training with LocalEnv, one process, no Ray: only the
   storage differs), with ``run.root`` a local temporary folder and ``s3://<bucket>/runs`` on an S3 API server
   on 127.0.0.1 (moto's server mode, started here and stopped by its PID), interleaved rep by rep (local,
   bucket, then bucket, local, ...). The run writes what every run writes: config.yaml, the schedule files,
   metrics.jsonl (a record every ``log_every`` steps), TensorBoard events, checkpoints (state file and
   manifest, ``ckpt_every``), a sample grid at the end. Config: the tiny U-Net of tune_configs/tiny.yaml
   (channels 32-64), batch 32, CIFAR-10 subset, cosine schedule, bf16 off.
2. The storage calls alone, each timed on both: publishing one checkpoint of that U-Net (state + manifest),
   finding and loading the latest checkpoint, one metrics record appended to a metrics.jsonl of 200 records and
   to one of 2,000 (in a bucket the object is read and written whole: the cost grows with the file).

The server runs on this machine, so the figures are the client's cost (pyarrow's S3 client, HTTP, whole-object
rewrites), not a network's: against a real bucket add the round trips (a few ms each in the same region).

Figures: storage_bucket_vs_local_run_ratio, storage_run_s_local, storage_run_s_bucket and the per-call seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA_DIR, interleaved, loadavg, median, paired_ratios, write_figures  # noqa: E402

import torch  # noqa: E402

# a metrics.jsonl record as the loop writes it (its size: the fields of an interval record)
RECORD = {"step": 12345, "loss": 0.0571, "ref_loss": 0.2563, "img_per_s": 241.3, "lr": 0.0005, "wall_s": 1234.5,
          "budget_s": 1200.1, "grad_norm": 0.731, "loss_q0": 0.12, "loss_q1": 0.07, "loss_q2": 0.05, "loss_q3": 0.03}
LONG = 2000  # records in the long metrics.jsonl: a run of 200,000 steps logged every 100

ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"moto's server did not start on {url}")
            time.sleep(0.2)


def bench_config(root: str, name: str, steps: int, log_every: int, ckpt_every: int):
    from akod_ray.config import load_config

    return load_config(None, [
        f"run.name={name}", f"run.root={root}", "diffusion.schedule=cosine",
        "model.channels=[32,32,64,64]", "model.bottleneck_channels=64", "model.num_res_blocks=1",
        "model.attention_resolutions=[]", "model.dropout=0.0", f"data.data_dir={DATA_DIR}",
        "data.train_subset=1024", "data.val_size=32", f"train.steps={steps}", "train.batch_size=32",
        "train.warmup_steps=5", f"train.log_every={log_every}", f"train.ckpt_every={ckpt_every}",
        f"train.sample_every={steps}", "train.ref_grid=2", "eval.fid_samples=2", "eval.sampler_steps=2",
        "eval.grid_size=2", "eval.fid=c10"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print the figures, leave bench/results.json alone")
    args = p.parse_args()
    load_start = loadavg()
    torch.set_num_threads(2)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    proc, url = start_moto()
    os.environ.update(ENV, AWS_ENDPOINT_URL=url)
    local_root = Path(tempfile.mkdtemp(prefix="akod_storage_bench_"))
    try:
        import pyarrow.fs as pafs

        from akod_ray import storage
        from akod_ray.data.sources import load_training_data
        from akod_ray.diffusion.schedules import save_schedule
        from akod_ray.training.checkpoint import latest_checkpoint, load_state
        from akod_ray.training.local import LocalEnv
        from akod_ray.training.loop import run_training
        from akod_ray.training.schedule_source import fixed_betas, fixed_source

        pafs.S3FileSystem(endpoint_override=url.split("://")[1], scheme="http", allow_bucket_creation=True,
                          access_key="bench", secret_key="bench", region="us-east-1").create_dir("bench")
        roots = {"local": str(local_root / "runs"), "bucket": "s3://bench/runs"}
        data = load_training_data(bench_config(roots["local"], "x", 1, 1, 1), str(DATA_DIR))
        count = {"n": 0}

        def one_run(kind: str):
            def go():
                count["n"] += 1
                cfg = bench_config(roots[kind], f"{kind}{count['n']}", args.steps, args.log_every, args.ckpt_every)
                from akod_ray.config import save_config

                save_config(cfg, cfg.run_dir)
                save_schedule(cfg.run_dir / "schedule.json", fixed_betas(cfg), source="cosine", final=True)
                run_training(cfg, data, LocalEnv(cfg.run_dir), cfg.run_dir, fixed_source(cfg))
            return go

        print(f"[bench] {args.reps} interleaved runs of {args.steps} steps each way (metrics every {args.log_every}, "
              f"checkpoint every {args.ckpt_every})", flush=True)
        runs = interleaved({k: one_run(k) for k in roots}, warmup=1, reps=args.reps)

        # the calls alone, on the state of one such run
        first_local = min(p for p in Path(roots["local"]).iterdir() if p.name.startswith("local"))
        state = load_state(latest_checkpoint(first_local))  # a checkpoint of the runs above, as the loop wrote it
        calls: dict[str, dict[str, list[float]]] = {}
        for kind, root in roots.items():
            run = storage.location(root) / "calls"
            env = LocalEnv(run, num_to_keep=2)
            log, long_log = run / "metrics.jsonl", run / "long" / "metrics.jsonl"
            record = json.dumps(RECORD)
            storage.write_text(log, "".join(record + "\n" for _ in range(200)))
            storage.write_text(long_log, "".join(record + "\n" for _ in range(LONG)))
            timings = calls.setdefault(kind, {"checkpoint": [], "latest_and_load": [], "metrics_record": [],
                                              f"metrics_record_{LONG}": []})
            for i in range(5):
                t = time.perf_counter()
                env.report({}, state, 10 * (i + 1))
                timings["checkpoint"].append(time.perf_counter() - t)
                t = time.perf_counter()
                load_state(latest_checkpoint(run))
                timings["latest_and_load"].append(time.perf_counter() - t)
                t = time.perf_counter()
                storage.append_jsonl(log, RECORD)
                timings["metrics_record"].append(time.perf_counter() - t)
                t = time.perf_counter()
                storage.append_jsonl(long_log, RECORD)
                timings[f"metrics_record_{LONG}"].append(time.perf_counter() - t)
        ckpt_bytes = sum(e.size or 0 for e in storage.list_dir(storage.location(roots["local"]) / "calls" / "checkpoint_00000050"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(local_root, ignore_errors=True)

    ratio = median(paired_ratios(runs["bucket"], runs["local"]))
    results = {
        "storage_run_s_local": round(median(runs["local"]), 3),
        "storage_run_s_bucket": round(median(runs["bucket"]), 3),
        "storage_bucket_vs_local_run_ratio": round(ratio, 4),
        "storage_checkpoint_mb": round(ckpt_bytes / 1e6, 2),
    }
    for kind in ("local", "bucket"):
        for name, xs in calls[kind].items():
            results[f"storage_{name}_s_{kind}"] = round(median(xs), 4)
    for k, v in results.items():
        print(f"[bench] {k} = {v}", flush=True)
    details = {"runs_s": runs, "calls_s": calls, "steps": args.steps, "log_every": args.log_every,
               "ckpt_every": args.ckpt_every, "server": "moto server mode on 127.0.0.1"}
    write_figures("storage_cost", results, details, load_start, write=not args.no_write)


if __name__ == "__main__":
    main()
