"""`metavae train | embed | sample | adapt | evaluate | cache`: the library's commands for a user's own
family of data sets. Other packages add commands through the ``metavae.commands`` entry point
(`load_commands`); the paper's reproduction (``list``, ``run``, ``report``, ``reproduce``) is one."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .io import DownloadError, RunFolder, RunLocked, cache_clear, cache_info, cache_root
from .settings import parse_overrides, resolve_preset


# Failures a user can cause and fix: one line each, exit status 2, never a traceback.
EXPECTED = (ValueError, OSError, FloatingPointError, MemoryError, RunLocked, DownloadError)


def describe(e: BaseException) -> str:
    """One line for an expected failure: the message, with the OS's reason for file errors."""
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller batch_size or fewer images"
    if isinstance(e, FloatingPointError):
        return f"training diverged: {e}"
    if isinstance(e, OSError) and e.strerror:  # e.g. "No space left on device: runs/x/last.pt"
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where there is none to show (required, None, off)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or action.help == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


FMT = dict(formatter_class=_Defaults)  # the own-data commands show their defaults in --help


def load_commands(sub) -> dict:
    """Each ``metavae.commands`` entry point's ``add_commands(sub)``: {command: handler(args) -> int}."""
    from importlib.metadata import entry_points

    handlers = {}
    for ep in entry_points(group="metavae.commands"):
        handlers.update(ep.load()(sub))
    return handlers


def _parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="metavae", description="Meta-amortized variational inference (MetaVAE).")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_embed, _add_sample, _add_adapt, _add_evaluate, _add_cache):
        add(sub)
    handlers = dict.fromkeys(("train", "embed", "sample", "adapt", "evaluate"), own_data_command)
    handlers["cache"] = cache_command
    handlers.update(load_commands(sub))
    return p, handlers


def _add_train(sub) -> None:
    """`metavae train`: a model on a family read from files."""
    t = sub.add_parser("train", help="train a model on your own family of data sets", **FMT)
    t.add_argument("--data", type=Path, required=True,
                   help=".npz (one array per distribution), a folder of .npy files, or a .csv/.parquet table")
    t.add_argument("--out", type=Path, required=True, help="output folder (model.pt, metrics.json, loss.png)")
    from .models import registry  # --model's choices and help: the registered kinds
    registry.load_extensions()
    t.add_argument("--model", default="metavae", choices=registry.model_names(), metavar="KIND",
                   help="; ".join(f"{k.name} ({k.description})" for k in registry.model_kinds()))
    t.add_argument("--pooling", default="mean", choices=("mean", "attention"),
                   help="how the MetaVAE, NS or VHE pools a context set: mean (the paper's) or attention (a Set Transformer)")
    t.add_argument("--summary", dest="pooling", choices=("mean", "attention"), help=argparse.SUPPRESS)  # old name
    t.add_argument("--arch", default="auto", choices=("auto", "mlp", "conv"),
                   help="auto: the convolutional model for images (H, W) or (C, H, W) of at least 16x16, else MLPs")
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--storage", default="auto", choices=("auto", "padded", "mapped"),
                   help="padded: the family in memory; mapped: read from a folder of .npy files as needed (bounded "
                        "memory, same batches); auto: mapped when such a folder exceeds a quarter of free memory")
    _table_args(t)
    t.add_argument("--tensorboard", type=Path, default=None, help="write TensorBoard event files into this folder")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting (repeatable); settings and defaults: " + _settings_help())
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_embed(sub) -> None:
    """`metavae embed`: posterior means of points given context sets."""
    e = sub.add_parser("embed", help="posterior means of points, each given a context set of its distribution", **FMT)
    e.add_argument("--model", type=Path, required=True, help="a model.pt (or a checkpoint)")
    e.add_argument("--data", type=Path, default=None,
                   help="embed every point of every distribution in this file (what train reads), each with a "
                        "context drawn from its own distribution (or --context)")
    e.add_argument("--query", type=Path, default=None, help="or: one file of query points (n, ...), with --context")
    e.add_argument("--context", type=Path, default=None, help="points of the queries' distribution (one set for all)")
    e.add_argument("--context-size", type=int, default=None, help="with --data: points per context (default: training's)")
    e.add_argument("--out", type=Path, required=True,
                   help=".npz (one array per distribution), .csv/.parquet (distribution, label, z_0..) or .npy")
    _table_args(e)
    e.add_argument("--seed", type=int, default=0, help="draws the contexts")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    e.add_argument("--refine-steps", type=int, default=0,
                   help="MetaVAE, with --query: refine each query's q by this many ELBO gradient steps under decoder --dist")
    e.add_argument("--dist", default=None, help="with --refine-steps: the decoder (distribution name or index)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sample(sub) -> None:
    """`metavae sample`: points from a distribution the model knows or a context set."""
    sm = sub.add_parser("sample", help="draw points for a context set's distribution (NS, VHE) "
                                       "or a training distribution (MetaVAE)", **FMT)
    sm.add_argument("--model", type=Path, required=True, help="a model.pt (or a checkpoint)")
    sm.add_argument("--context", type=Path, default=None, help="points of the distribution to generate (NS, VHE)")
    sm.add_argument("--dist", default=None, help="MetaVAE: the training (or adapted) distribution, name or index")
    sm.add_argument("-n", type=int, default=64, help="how many points")
    sm.add_argument("--mean", action="store_true",
                    help="write the decoder's means E[x | z] instead of draws from p(x | z) (smoother, less spread)")
    sm.add_argument("--seed", type=int, default=0, help="random seed of the draws")
    sm.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    _table_args(sm)
    sm.add_argument("--out", type=Path, required=True, help=".npy, .csv or .parquet to write the (n, ...) points to")


def _add_adapt(sub) -> None:
    """`metavae adapt`: decoders for unseen distributions, the encoder frozen."""
    a = sub.add_parser("adapt", help="MetaVAE: fit a decoder for each unseen distribution (encoder frozen), "
                                     "so that `sample --dist NAME` generates it", **FMT)
    a.add_argument("--model", type=Path, required=True, help="a MetaVAE model.pt (or a checkpoint)")
    a.add_argument("--data", type=Path, required=True, help="the new distributions' points: .npy (one) or what train reads")
    a.add_argument("--name", default=None, help="the new distribution's name (default: its name; a .npy's stem)")
    a.add_argument("--steps", type=int, default=500, help="Adam steps on the ELBO")
    a.add_argument("--seed", type=int, default=0, help="random seed")
    a.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    _table_args(a)
    a.add_argument("--out", type=Path, required=True, help="where to save the model with its new decoders")
    a.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_evaluate(sub) -> None:
    """`metavae evaluate`: the embedding beside the controls."""
    ev = sub.add_parser("evaluate", help="is the embedding any good? the model beside raw, PCA, random-projection "
                                         "and untrained controls", **FMT)
    ev.add_argument("--model", type=Path, required=True, help="a model.pt (or a checkpoint)")
    ev.add_argument("--data", type=Path, required=True, help="distributions to evaluate on (what train reads)")
    _table_args(ev)
    ev.add_argument("--out", type=Path, required=True, help="folder for metrics.json, report.md and PNGs")
    ev.add_argument("--seed", type=int, default=0, help="splits, contexts, projections")
    ev.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_cache(sub) -> None:
    """`metavae cache`: what the data cache holds."""
    c = sub.add_parser("cache", help="show or clear what metavae keeps under $METAVAE_DATA")
    c.add_argument("action", choices=("info", "clear"))
    c.add_argument("--downloads", action="store_true", help="with clear: delete the downloaded data sets too")


def _table_args(p) -> None:
    p.add_argument("--dist-column", default="distribution", help="CSV/Parquet: the column naming the distribution")
    p.add_argument("--label-column", default=None, help="CSV/Parquet: a column of labels, kept out of the features")


def _settings_help() -> str:
    from .settings import describe
    from .workflows import FileTrainConfig

    return "; ".join(f"{key}={json.dumps(list(v) if isinstance(v, tuple) else v)}" + (f": {text}" if text else "")
                     for key, v, text in describe(FileTrainConfig()))


def _train_overrides(pairs: list[str]) -> dict:
    """``--set`` pairs for `metavae train`: old keys renamed, and ``256,256`` read as a list."""
    import dataclasses
    import re

    from .workflows import FileTrainConfig

    lists = {f.name for f in dataclasses.fields(FileTrainConfig) if f.type in ("tuple", tuple)}
    out = {}
    for key, value in parse_overrides(pairs).items():
        key = FileTrainConfig.ALIASES.get(key, key)
        if key in lists and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value):
            value = f"[{value}]"
        out[key] = value
    return out


def own_data_command(args) -> int:
    from . import workflows as W

    if args.command == "train":
        cfg = resolve_preset({"default": W.FileTrainConfig()}, None, _train_overrides(args.set))
        with RunFolder(args.out):
            m = W.train_on_files(args.data, args.out, args.model, cfg, args.dist_column, args.label_column,
                                 args.tensorboard, progress=not args.quiet, pooling=args.pooling,
                                 storage=args.storage, arch=args.arch, device=args.device)
        stop = " (stopped early)" if m["stopped_early"] else ""
        print(f"trained {m['model']} ({m['arch']}, likelihood={m['likelihood']}, scale={m['scale']}) on "
              f"{len(m['data']['names'])} distributions for {m['epochs_trained']} epochs{stop}; "
              f"best validation loss {m['best_val_loss']:.4g} at epoch {m['best_epoch']}; wrote {args.out / 'model.pt'}")
    elif args.command == "adapt":
        ks = W.adapt_files(args.model, args.data, args.out, args.name, args.steps, args.seed, progress=not args.quiet,
                           device=args.device, dist_column=args.dist_column, label_column=args.label_column)
        from .workflows import read_points

        names = [args.name] if args.name else read_points(args.data, args.dist_column, args.label_column).names
        for k, name in zip(ks, names):
            print(f"fitted decoder {k} for {name}; wrote {args.out} (metavae sample --model {args.out} --dist {name})")
    elif args.command == "embed":
        if args.refine_steps < 0:
            raise ValueError(f"--refine-steps must be >= 0, got {args.refine_steps}")
        z = W.embed_files(args.model, args.query, args.context, args.out, device=args.device,
                          refine_steps=args.refine_steps, dist=args.dist, data_path=args.data,
                          dist_column=args.dist_column, label_column=args.label_column,
                          context_size=args.context_size, seed=args.seed, progress=not args.quiet)
        if isinstance(z, list):
            print(f"wrote embeddings of {sum(len(a) for a in z)} points in {len(z)} distributions "
                  f"(dimension {z[0].shape[1]}) to {args.out}")
        else:
            print(f"wrote {z.shape[0]} embeddings of dimension {z.shape[1]} to {args.out}")
    elif args.command == "evaluate":
        from .evaluate import evaluate_files

        with RunFolder(args.out):
            result = evaluate_files(args.model, args.data, args.out, args.dist_column, args.label_column,
                                    seed=args.seed, device=args.device, progress=not args.quiet)
        print((args.out / "report.md").read_text().rstrip())  # its last line: the verdict, in words
        assert result["verdict"]
    else:
        x = W.sample_files(args.model, args.out, args.n, args.context, args.dist, args.seed, device=args.device,
                           mean=args.mean, dist_column=args.dist_column, label_column=args.label_column)
        what = "decoder means (--mean)" if args.mean else "draws from p(x | z)"
        print(f"wrote {x.shape[0]} points of shape {tuple(x.shape[1:])} ({what}) to {args.out}")
    return 0


def cache_command(args) -> int:
    if args.action == "clear":
        freed = cache_clear(downloads=args.downloads)
        print(f"freed {freed / 1e6:.1f} MB under {cache_root()}" + ("" if args.downloads else " (downloads kept)"))
        return 0
    print(f"cache root: {cache_root()} (set $METAVAE_DATA to move it)")
    for row in cache_info():
        kind = "derived, safe to clear" if row["derived"] else "downloads"
        print(f"  {row['name']:18s} {row['bytes'] / 1e6:9.1f} MB  {row['files']:6d} files  ({kind})")
    return 0


def main(argv=None) -> int:
    parser, handlers = _parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("metavae: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except EXPECTED as e:
        print(f"metavae: error: {describe(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports allocation failures as RuntimeError
        if "alloc" not in str(e).lower() and "out of memory" not in str(e).lower():
            raise
        print(f"metavae: error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller batch_size or "
              "fewer images", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
