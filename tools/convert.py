"""Checkpoint conversion, one process, no GPU needed.

    python -m tools.convert consolidate CKPT OUT.safetensors [--dtype float32|bfloat16]
    python -m tools.convert reshard     CKPT OUT_STEP_DIR [--dp-replicate N] [--dp-shard N] [--tp N] [--pp N]
    python -m tools.convert export-hf   CKPT OUT_DIR [--dtype float32|bfloat16] [--tokenizer tokenizer.json]
                                        [--max-shard-size 5GB]
    python -m tools.convert import-hf   HF_DIR OUT_STEP_DIR [--base CKPT]

CKPT is a committed step-N folder (it is verified first: marker, every shard, checksums); consolidate and
export-hf also read one written by parallel.engine=deepspeed (DeepSpeed's own files).
reshard writes the same training state for another (dp, tp, pp) layout: model and optimizer are
stored layout-free by DCP; the CMS clocks' pending window sums are re-split over the new
data-parallel ranks (their total is kept, see hope_dist.clock.CMSClock.resplit) and the
RNG streams of ranks that no longer exist are dropped. import-hf writes a training checkpoint
from an exported folder: with --base, the base checkpoint's full training state with the
imported weights; without, the weights alone (training from it starts at step 0).
Resume from the output with --checkpoint.resume=OUT_STEP_DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from hope_dist.checkpoint import (CheckpointError, model_config_diff, read_flat, read_meta, read_model, verify,
                                  write_offline)
from hope_dist.checkpoint_manager import RNGState
from hope_dist.clock import CMSClock
from hope_dist.config import JobConfig, ModelConfig, from_dict
from hope_dist.parallel.deepspeed_checkpoint import read_model as read_deepspeed_model
from hope_dist.dtypes import DTYPES
from hope_dist.errors import UserError, report
from hope_dist.pretrained_io import (CONFIG, INDEX, WEIGHTS, PretrainedError, build_from_weights, check_tokenizer,
                                     read_config, read_weights, save_pretrained)

EXPORT_DTYPES = ("float32", "bfloat16")  # of hope_dist.dtypes.DTYPES


def checked(path: str) -> tuple[Path, dict]:
    """A committed, intact checkpoint and its meta; otherwise an error listing every problem."""
    path = Path(path)
    problems = verify(path)
    if problems:
        raise CheckpointError(f"{path} cannot be converted:\n  " + "\n  ".join(problems))
    return path, read_meta(path)


def model_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The model's full tensors of a checkpoint of either engine (parallel.engine)."""
    if meta.get("engine") == "deepspeed":
        return read_deepspeed_model(path)
    return read_model(path)


def fitting(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`weights` if they hold every tensor of the model, each of its shape (checked by loading them
    into a meta-device model, which copies nothing); else an error naming `source`, not a training
    run that fails later inside DCP."""
    with warnings.catch_warnings():  # "copying into a meta parameter is a no-op": that is the point
        warnings.simplefilter("ignore", UserWarning)
        build_from_weights(model_cfg, weights, source, device="meta")
    return weights


def new_output(out: str) -> Path:
    """A fresh sibling folder to write into; `publish` moves it to `out` once complete, so a failed
    command leaves no `out` that looks finished."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise PretrainedError(f"{out} already exists; choose a new output folder (or delete it first)")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, out: str) -> Path:
    os.replace(tmp, out)
    return Path(out)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500MB or 5GB")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])


# ------------------------------------------------------------------ commands
def consolidate(ckpt: str, out: str, dtype: str = "float32") -> Path:
    """Model weights of a sharded checkpoint -> one safetensors file."""
    from safetensors.torch import save_file

    path, meta = checked(ckpt)
    weights = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model_weights(path, meta).items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(f".{Path(out).name}.partial")
    save_file(weights, str(tmp), metadata={"format": "pt", "step": str(meta["step"]), "source": str(path)})
    return publish(tmp, out)


def reshard(ckpt: str, out: str, dp_replicate: int | None = None, dp_shard: int | None = None,
            tp: int | None = None, pp: int | None = None) -> Path:
    """The training state of `ckpt` laid out for new parallel sizes (None keeps the saved one)."""
    path, meta = checked(ckpt)
    if meta.get("engine") == "deepspeed":
        raise CheckpointError(f"{path} is a DeepSpeed checkpoint (parallel.engine=deepspeed): reshard reads the "
                              f"native engine's DCP checkpoints; resume it under its own dp size, or export-hf it "
                              f"and import-hf the folder to start a native run from its weights")
    cfg = from_dict(JobConfig, meta["config"])
    p = cfg.parallel
    for key, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard), ("tp", tp), ("pp", pp)):
        if value is not None:
            setattr(p, key, value)
    cfg.validate()
    new_dp, new_world = p.dp_replicate * p.dp_shard, p.dp_replicate * p.dp_shard * p.tp * p.pp
    flat = read_flat(path)
    saved = CMSClock.pop_flat(flat)
    for key in [k for k in flat if (rank := RNGState.parse_key(k)) is not None and rank >= new_world]:
        del flat[key]
    for r in range(new_dp):
        flat.update(CMSClock.flat_state(r, CMSClock.resplit(saved, r, new_dp)))
    meta = {**meta, "layout": {"dp": new_dp, "tp": p.tp, "pp": p.pp}, "world_size": new_world,
            "config": cfg.to_dict(), "resharded_from": {"path": str(path), "layout": meta["layout"]}}
    return write_offline(Path(out), flat, meta)


def export_hf(ckpt: str, out: str, dtype: str = "float32", tokenizer: str | None = None,
              max_shard_bytes: int | None = None) -> Path:
    """A checkpoint's model as an exported folder (config.json, safetensors, tokenizer files)."""
    path, meta = checked(ckpt)
    tokenizer = tokenizer or meta["config"].get("data", {}).get("tokenizer")
    if tokenizer is not None and not str(tokenizer).endswith(".json"):
        print(f"note: {tokenizer} is not a tokenizer.json; the folder gets no tokenizer", file=sys.stderr)
        tokenizer = None
    model_cfg = from_dict(JobConfig, meta["config"]).model
    if tokenizer is not None:
        check_tokenizer(read_tokenizer(tokenizer), model_cfg.vocab_size, Path(tokenizer))
    tmp = new_output(out)
    save_pretrained(tmp, model_weights(path, meta), model_cfg, dtype=DTYPES[dtype], tokenizer=tokenizer,
                    max_shard_bytes=max_shard_bytes,
                    source={"checkpoint": str(path), "step": meta["step"], "git_commit": meta.get("git_commit"),
                            "seq_len": meta["config"].get("training", {}).get("seq_len")})
    return publish(tmp, out)


def read_tokenizer(file: str):
    """A tokenizers.Tokenizer, or an error naming the file (tokenizers' own errors name neither)."""
    from tokenizers import Tokenizer

    if not Path(file).is_file():
        raise PretrainedError(f"tokenizer {file} does not exist; pass --tokenizer PATH/tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for any unreadable file
        raise PretrainedError(f"{file}: not a readable tokenizer.json ({e}); pass --tokenizer with the "
                              f"tokenizer.json the model was trained with") from None


def import_hf(folder: str, out: str, base: str | None = None) -> Path:
    """An exported folder -> a training checkpoint (weights only, or into `base`'s full state)."""
    model_cfg = read_config(Path(folder))
    files = Path(folder) / (INDEX if (Path(folder) / INDEX).is_file() else WEIGHTS)
    weights = fitting(model_cfg, {k: v.float() for k, v in read_weights(Path(folder)).items()},
                      f"{files} vs {Path(folder) / CONFIG}")
    model_dict = dataclasses.asdict(model_cfg)
    if base is None:
        meta = {"step": 0, "tokens_seen": 0, "layout": {"dp": 1, "tp": 1, "pp": 1}, "world_size": 1,
                "config": {"model": model_dict}, "imported_from": str(folder)}
        return write_offline(Path(out), {f"model.{k}": v for k, v in weights.items()}, meta)
    path, meta = checked(base)
    diff = model_config_diff(meta["config"]["model"], model_dict)
    if diff:
        raise CheckpointError(f"{Path(folder) / 'config.json'} does not match the model of {path}:\n  "
                              + "\n  ".join(diff))
    flat = read_flat(path)
    stored = {k[len("model."):] for k in flat if k.startswith("model.")}
    if stored != set(weights):
        raise PretrainedError(f"{folder}: tensors differ from {path}'s model: "
                              f"{sorted(stored ^ set(weights))[:5]}")
    flat.update({f"model.{k}": v.to(flat[f"model.{k}"].dtype) for k, v in weights.items()})
    return write_offline(Path(out), flat, {**meta, "imported_from": str(folder)})


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="sharded checkpoint -> one safetensors file (model only)")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32")
    r = sub.add_parser("reshard", help="training checkpoint -> another (dp, tp, pp) layout")
    r.add_argument("ckpt")
    r.add_argument("out")
    for name in ("dp-replicate", "dp-shard", "tp", "pp"):
        r.add_argument(f"--{name}", type=int, default=None)
    e = sub.add_parser("export-hf", help="checkpoint -> Hugging Face-style folder")
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32")
    e.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's data.tokenizer)")
    e.add_argument("--max-shard-size", type=parse_size, default=None, help="e.g. 5GB; default: one file")
    i = sub.add_parser("import-hf", help="Hugging Face-style folder -> training checkpoint")
    i.add_argument("folder")
    i.add_argument("out")
    i.add_argument("--base", default=None, help="a checkpoint whose training state to keep")
    args = parser.parse_args(argv)
    try:
        if args.command == "consolidate":
            out = consolidate(args.ckpt, args.out, args.dtype)
        elif args.command == "reshard":
            out = reshard(args.ckpt, args.out, args.dp_replicate, args.dp_shard, args.tp, args.pp)
        elif args.command == "export-hf":
            out = export_hf(args.ckpt, args.out, args.dtype, args.tokenizer, args.max_shard_size)
        else:
            out = import_hf(args.folder, args.out, args.base)
    except UserError as err:
        return report(err)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
