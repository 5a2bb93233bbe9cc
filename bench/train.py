"""Training throughput with 1 and 2 Horovod processes in the same run, the share of step time
spent waiting for data (target < 5%), and the same training on batches already in memory.

    python -m bench.train [--models model2,resnet18] [--epochs 2] [--rounds 3] [--json]

Runs `horovodrun -np {1,2} --gloo python -m trainer.train` on a synthetic TinyImageNet-layout set
(ingested first) and reads each run's results.json. The first epoch includes tf.function tracing,
so the figures are of the last epoch. Then, in this process, one trainer (trainer.loop.Trainer, one
worker) trains epochs alternately from the real pipeline and from one epoch's batches held in
memory (the same train step, so the ratio is what the input pipeline costs the training), and a
second one with its step compiled by XLA (--jit-compile) from the same batches in memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ingest import synth

HOROVODRUN = Path(sys.executable).parent / "horovodrun"


def prepare(workdir: Path, classes: int, per_class: int) -> Path:
    shards = workdir / "shards"
    synth.generate(str(workdir / "tiny"), classes=classes, train_per_class=per_class, val_per_class=10)
    subprocess.run([sys.executable, "-m", "ingest.shard", "--input", str(workdir / "tiny"), "--output", str(shards),
                    "--processes", "2", "--log-level", "WARNING"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return shards


def train(shards: Path, output: Path, model: str, workers: int, epochs: int, batch_size: int) -> dict:
    subprocess.run([str(HOROVODRUN), "-np", str(workers), "-H", f"localhost:{workers}", "--gloo",
                    sys.executable, "-m", "trainer.train", "--data", str(shards), "--output", str(output),
                    "--model", model, "--epochs", str(epochs), "--batch-size", str(batch_size),
                    "--log-level", "WARNING"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history = json.loads((output / "checkpoints" / "latest.json").read_text())["history"]
    last = history[-1]
    return {"model": model, "workers": workers, "batch_size_per_worker": batch_size,
            "images_per_second_per_worker": round(last["images_per_second"], 1),
            "images_per_second_total": round(last["images_per_second"] * workers, 1),
            "data_wait_share": round(last["data_wait_share"], 4)}


def against_memory(shards: Path, model: str, batch_size: int, rounds: int) -> dict:
    """Training images/s of one worker from the pipeline and from batches in memory, and from memory
    with the step compiled by XLA (--jit-compile), alternating epochs after one epoch of tracing
    each; medians."""
    from trainer.quiet import import_tensorflow

    import_tensorflow()
    from trainer import dist, loop
    from trainer.config import TrainConfig
    from trainer.models import ModelConfig

    config = TrainConfig(data=str(shards), output=str(shards.parent / "memory"), model=ModelConfig(model),
                         batch_size=batch_size, epochs=2 * rounds + 2, stall_timeout=0)
    workers = dist.init()
    trainer = loop.Trainer(config, workers)
    compiled = loop.Trainer(dataclasses.replace(config, jit_compile=True), workers)
    trainer.start_stream(0)
    pipeline = trainer.train_stream
    held = list(itertools.islice(iter(trainer.data.train(0, 1, 0, 1)), trainer.data.steps_in_epoch(0, 1)))
    trainer.train_epoch(0)   # tracing
    compiled.train_stream = itertools.cycle(held)
    compiled.train_epoch(0)
    rates: dict[str, list[float]] = {"pipeline": [], "memory": [], "memory_xla": []}
    waits = []
    for epoch in range(1, rounds + 1):
        trainer.train_stream = pipeline
        *_, rate, wait = trainer.train_epoch(epoch)
        rates["pipeline"].append(rate)
        waits.append(wait)
        trainer.train_stream = itertools.cycle(held)
        rates["memory"].append(trainer.train_epoch(epoch)[3])
        rates["memory_xla"].append(compiled.train_epoch(epoch)[3])
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {"model": model, "batch_size": batch_size,
            **{f"{name}_images_per_second": round(rate, 1) for name, rate in median.items()},
            "pipeline_vs_memory": round(median["pipeline"] / median["memory"], 3),
            "xla_vs_memory": round(median["memory_xla"] / median["memory"], 3),
            "data_wait_share": round(statistics.median(waits), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="model2,resnet18", help="comma-separated models (default model2,resnet18)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is reported (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker (default 64)")
    parser.add_argument("--classes", type=int, default=20, help="synthetic classes (default 20)")
    parser.add_argument("--train-per-class", type=int, default=100, help="synthetic train images per class")
    parser.add_argument("--rounds", type=int, default=3,
                        help="epochs from the pipeline and from memory each, alternating, per model (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        shards = prepare(workdir, args.classes, args.train_per_class)
        for model in args.models.split(","):
            for workers in (1, 2):
                result = train(shards, workdir / f"{model}-{workers}", model, workers, args.epochs, args.batch_size)
                results.append(result)
                print(f"{model:9s} {workers} worker(s): {result['images_per_second_per_worker']} img/s per worker, "
                      f"{result['images_per_second_total']} total, {100 * result['data_wait_share']:.1f}% waiting "
                      f"for data")
        for model in args.models.split(","):
            result = against_memory(shards, model, args.batch_size, args.rounds)
            results.append(result)
            print(f"{model:9s} 1 worker, in this process: {result['pipeline_images_per_second']} img/s from the "
                  f"pipeline, {result['memory_images_per_second']} from batches in memory "
                  f"({result['pipeline_vs_memory']}x), {100 * result['data_wait_share']:.1f}% waiting for data; "
                  f"with --jit-compile {result['memory_xla_images_per_second']} from memory ({result['xla_vs_memory']}x)")
    print(f"machine: {os.cpu_count()} CPUs")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
