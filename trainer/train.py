"""`python -m trainer.train`: train a Keras model on Horovod workers from WebDataset shards.

    horovodrun -np 2 -H localhost:2 --gloo python -m trainer.train --data DATA --output OUT --preset seed-model2

Every rank runs the same command; rank 0 alone writes config.json, the final model and results.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from ingest import cli
from ingest.errors import InputError, StorageError
from ingest.storage import parse_storage_options

from . import katib
from .config import LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS, PRESETS, TrainConfig, from_preset, preset_for
from .models import MODELS, ModelConfig

log = logging.getLogger("trainer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", required=True, help="dataset URL: the --output of ingest.shard (path, s3://, gs://, ...)")
    add("--output", required=True, help="where config.json, model.keras and results.json go (path or URL)")
    add("--preset", choices=sorted(PRESETS), help="start from a named configuration; flags override it")
    add("--model", metavar="NAME",
        help=f"{', '.join(MODELS)}, keras.applications.NAME (e.g. keras.applications.EfficientNetB0, randomly "
             f"initialised) or package.module:function, your own (num_classes, image_size, **options) -> keras.Model "
             f"(default: the preset's, else model2)")
    add("--dropout", help="comma-separated dropout rates in layer order (model1: 1, model2: 3)")
    add("--epochs", type=int, help="epochs to train (default 30, or the preset's)")
    add("--batch-size", type=int, help="images per step per worker (default 128)")
    add("--lr", type=float,
        help="learning rate for one worker; scaled with the worker count by --lr-scaling (default 1e-3)")
    add("--optimizer", choices=OPTIMIZERS,
        help="adam, adamw (Adam with decoupled weight decay) or sgd (Nesterov momentum 0.9) (default adam)")
    add("--lr-scaling", choices=LR_SCALINGS,
        help="the peak rate on N workers: --lr x N (linear), x sqrt(N) (sqrt) or x 1 (none) "
             "(default: linear for sgd, sqrt for adam and adamw)")
    add("--warmup-epochs", type=int, help="epochs of linear ramp from --lr to the scaled rate (default 2)")
    add("--lr-schedule", choices=LR_SCHEDULES,
        help="after the warm-up: constant, cosine (down to 0 at the end of the last epoch) or step (x0.1 from "
             "each of --lr-decay-epochs on) (default constant)")
    add("--lr-decay-epochs", type=_epoch_list, metavar="E,E,...",
        help="with --lr-schedule step: the epochs from which the rate is multiplied by 0.1 (e.g. 30,60,80)")
    add("--weight-decay", type=float,
        help="decoupled weight decay per step (x the rate), on kernels only: biases and BatchNorm are not decayed; "
             "sgd and adamw (default 0; adamw 0.01)")
    add("--label-smoothing", type=float,
        help="label smoothing E: the loss's targets are (1 - E) x one-hot + E / classes (default 0)")
    add("--augment", action=argparse.BooleanOptionalAction, default=None,
        help="on-the-fly augmentation (default: on, or the preset's)")
    add("--early-stopping-patience", type=int, help="stop after this many epochs without a better val top-5")
    add("--image-size", type=int, help="model input side in pixels (default 64)")
    add("--metrics-port", type=int,
        help="serve Prometheus metrics on this port plus the local rank (one port per process)")
    add("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
        help="compute in float16 on GPUs (with loss scaling) or bfloat16 on CPUs; weights stay float32")
    add("--shuffle-mb", type=int, metavar="MB",
        help="shuffle buffer per rank in MB of samples (the split's mean sample size converts it; at most "
             "10,000 samples; default 128)")
    add("--read-ahead-mb", type=int, metavar="MB",
        help="shards read ahead per rank, in MB (at most 8; default 128); bigger shards are read when needed")
    add("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile each step's forward and backward pass with XLA (default off)")
    add("--seed", type=int, help="seed of weights, data order, augmentation and dropout (default 0)")
    add("--deterministic", action="store_true", default=None,
        help="same --seed, same weights and metrics, on any number of ranks (deterministic kernels and "
             "input order; slower)")
    add("--restart", action="store_true",
        help="discard the checkpoints and results in --output and start over (a rerun otherwise resumes)")
    add("--stall-timeout", type=float, metavar="SECONDS",
        help="a rank that makes no progress (no batch, step or evaluation batch) for this long exits with code 7, "
             "naming what it waited for, so that a peer gone without a trace does not hang the job (default 300; "
             "0: never)")
    add("--checkpoint-every", type=float, metavar="MINUTES",
        help="also checkpoint mid-epoch every this many minutes (rank 0's clock; between two steps all ranks "
             "agree on); a rerun resumes at that step with the same data (default 0: at the end of each epoch)")
    add("--log-every-steps", type=int, metavar="N",
        help="rank 0 logs the training loss and learning rate to <output>/tensorboard every N steps (default 50; "
             "0: epochs only)")
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE",
        help="fsspec storage option for --data and --output, repeatable (e.g. endpoint_url=http://127.0.0.1:9000); "
             "credentials come from the environment, never from flags")
    add("--log-level", default="INFO", choices=cli.LOG_LEVELS, help="logging level (default INFO)")
    add("--katib-metrics", action="store_true",
        help="rank 0 prints each epoch's and, last, the run's accuracies to stdout as name=value lines for Kubeflow "
             "Katib's StdOut metrics collector (the chart's sweeps; docs/kubernetes.md)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {key: value for key, value in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
        "early_stopping_patience": args.early_stopping_patience, "image_size": args.image_size,
        "mixed_precision": args.mixed_precision, "metrics_port": args.metrics_port, "seed": args.seed,
        "deterministic": args.deterministic, "stall_timeout": args.stall_timeout,
        "checkpoint_every": args.checkpoint_every, "lr_scaling": args.lr_scaling, "warmup_epochs": args.warmup_epochs,
        "log_every_steps": args.log_every_steps, "shuffle_mb": args.shuffle_mb,
        "read_ahead_mb": args.read_ahead_mb, "jit_compile": args.jit_compile,
        "lr_schedule": args.lr_schedule, "lr_decay_epochs": args.lr_decay_epochs,
        "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
        "storage_options": parse_storage_options(args.storage_option) or None}.items() if value is not None}
    if args.lr_schedule not in (None, "step") and args.lr_decay_epochs is None:
        overrides["lr_decay_epochs"] = ()   # a preset's step decay does not carry over to another schedule
    config = (from_preset(args.preset, args.data, args.output, **overrides) if args.preset
              else TrainConfig(data=args.data, output=args.output, **overrides))
    if args.model or args.dropout:
        dropout = tuple(float(v) for v in args.dropout.split(",")) if args.dropout else None
        config.model = ModelConfig(args.model or config.model.name, dropout)
    if args.augment is not None:
        config.augment = (preset_for(config.image_size) if args.augment
                          else dataclasses.replace(config.augment, enabled=False))
    return config


def _epoch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(epoch) for epoch in text.split(","))
    except ValueError:
        message = f"{text!r} is not a comma-separated list of whole epochs (e.g. 30,60,80)"
        raise argparse.ArgumentTypeError(message) from None


def train(config: TrainConfig, workers, restart: bool = False, katib_metrics: bool = False) -> dict:
    """Every rank: the whole run, resumed from the last checkpoint unless `restart`. Returns results."""
    from importlib.metadata import version

    from tqdm import tqdm

    from ingest.storage import Location, dump_json, write_atomic

    from ingest.errors import Terminated

    from . import checkpoint, curves, dist, randomness, records, saved, tensorboard
    from .errors import PeerStopped
    from .loop import Trainer
    from .metrics import TrainerMetrics
    from .watchdog import Watchdog

    metrics = None
    if config.metrics_port is not None:   # one port per process on a node: base + local rank
        info = {"model": config.model.name, "workers": str(workers.size), "version": version("imagenet-k8s-trainer")}
        offset = int(os.environ.get("TRAINER_PORT_OFFSET", "0"))   # local pods sharing one address (trainer.launch)
        metrics = TrainerMetrics(workers.rank, info, config.metrics_port + workers.local_rank + offset)
    trainer = Trainer(config, workers, metrics)
    fs, root = Location(config.output, config.storage_options).open()
    progress = checkpoint.restore(fs, root, trainer, restart)   # refuses other settings before anything is written
    patience = config.early_stopping_patience
    # Decided again on a rerun, which may change the patience (or extend the epochs).
    progress.stopped_early = bool(patience) and bool(progress.history) and progress.stale >= patience
    start_epoch = progress.next_epoch
    epochs = range(start_epoch, start_epoch if progress.stopped_early else config.epochs)
    if workers.is_chief and not epochs and fs.isfile(f"{root}/results.json"):
        log.info("%s is finished (%d epochs%s): nothing to do", config.output, len(progress.history),
                 ", stopped early" if progress.stopped_early else "")
        return json.loads(fs.cat_file(f"{root}/results.json"))
    events = None
    if workers.is_chief:
        write_atomic(fs, f"{root}/config.json", dump_json(config.to_json()))
        events = tensorboard.EventLog(fs, root, trainer, progress)
        trainer.on_step, trainer.log_every_steps = events.step, config.log_every_steps
    if metrics:
        metrics.record_plan(workers.size, config.epochs, progress.next_epoch, progress.saved_at)
    if epochs:
        trainer.start_stream(start_epoch, progress.partial.step if progress.partial else 0)
    trainer.watchdog = Watchdog(config.stall_timeout, workers.rank).start()

    def save() -> None:
        """Every rank: the checkpoint of `progress` (rank 0 writes it); then stop if the ranks agreed to."""
        trainer.progress("the checkpoint's random states from every rank")
        seed_states = dist.gather(randomness.get_states(trainer.model))
        if workers.is_chief:   # history first: a kill before the checkpoint names the epoch redoes it
            write_atomic(fs, f"{root}/history.csv", records.history_csv(progress))
            events.sync(progress)
            if progress.partial is None:
                curves.write(fs, root, progress)
            checkpoint.save(fs, root, trainer, progress, seed_states)
        trainer.last_checkpoint = time.monotonic()
        if metrics:
            metrics.record_checkpoint()
        if trainer.stop_requested:
            where = f"epoch {progress.next_epoch}, step {progress.partial.step}" if progress.partial else \
                f"the end of epoch {progress.next_epoch - 1}"
            if not cli.terminating():
                raise PeerStopped(f"rank {workers.rank}: another worker got SIGTERM; checkpoint written at {where}; "
                                  f"stopping with it (rerun the same command to resume)")
            log.warning("SIGTERM: checkpoint written at %s; stopping", where)
            raise Terminated()

    def mid_epoch(epoch: int, partial) -> None:
        progress.partial = partial
        save()

    trainer.on_boundary = mid_epoch
    for epoch in tqdm(epochs, desc="epochs", disable=not workers.is_chief):
        if progress.record(trainer.run_epoch(epoch, progress.partial)) and workers.is_chief:
            progress.best_weights = trainer.model.get_weights()
        progress.stopped_early = bool(patience) and progress.stale >= patience
        if katib_metrics and workers.is_chief:
            katib.print_epoch(progress.history[-1])
        save()
        if progress.stopped_early:
            log.info("early stopping: val top-5 has not improved for %d epochs", progress.stale)
            break
    trainer.watchdog.stop()   # no collective is left: only rank 0's own writes
    results = records.results(config, progress, trainer.model, workers.size, start_epoch)
    if workers.is_chief:
        write_atomic(fs, f"{root}/history.csv", records.history_csv(progress))
        trainer.model.set_weights(progress.best_weights)
        saved.save(trainer.model, trainer.data.manifest["classes"], config.output, config.storage_options)
        write_atomic(fs, f"{root}/results.json", dump_json(results))
        events.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args, config = cli.parse(build_parser(), argv, config_from_args)
    # SIGTERM (a pod preempted, evicted or deleted) is a request: the ranks finish their step, agree,
    # checkpoint there and exit 143.
    return cli.run_main(lambda: _run(args, config), args.log_level, kept="the last checkpoint is kept",
                        graceful=True)


def _run(args: argparse.Namespace, config: TrainConfig) -> int:
    from .quiet import import_tensorflow

    import_tensorflow()
    from . import dist
    from .errors import WorkerLost
    from .shards import StorageGone

    workers = dist.init()
    logging.getLogger("trainer").setLevel(args.log_level if workers.is_chief else "WARNING")
    try:
        results = train(config, workers, args.restart, args.katib_metrics)
    except ValueError as exc:    # a setting that does not fit the dataset (e.g. fewer samples than a batch)
        raise InputError(str(exc)) from None
    except StorageGone as exc:   # the shards stopped being readable mid-run: perhaps for a while only
        raise StorageError(f"reading the training data: {exc}; rerun to resume from the last checkpoint") from None
    except Exception as exc:
        cause = dist.collective_failure(exc)
        if cause is None:
            raise
        raise WorkerLost(f"rank {workers.rank}: lost another worker (it failed, was killed, or its node or network "
                           f"went away: {cause}); rerun the same command to resume from the last checkpoint") from None
    if workers.is_chief:
        if args.katib_metrics:
            katib.print_result(results)
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
