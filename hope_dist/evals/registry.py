"""Each evaluation as one entry: its command-line arguments, its runner (inputs checked when it is
built), its one-line headline, its results.md section and its plot. tools/evaluate.py and report.py
only loop over EVALS, so a new eval is a module with its computation plus one entry here."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from hope_dist.evals import long_context as lc
from hope_dist.evals import mqar as mq
from hope_dist.evals import passkey as pk
from hope_dist.evals.loading import Loaded, load_encoder, open_documents
from hope_dist.evals.perplexity import perplexity


@dataclass(frozen=True)
class Eval:
    name: str
    reads_documents: bool  # needs --data and the training seq_len
    arguments: Callable[[argparse._ArgumentGroup], None]
    prepare: Callable[[argparse.Namespace, Loaded], Callable[[], dict]]  # checks inputs, returns the runner
    headline: Callable[[dict], str]
    markdown: Callable[[dict], list[str]]  # its section of results.md
    plot: Callable[[dict, object], None] | None = None  # draws on a matplotlib Axes: NAME.png


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi)


def _log2_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()


# ------------------------------------------------------------------ perplexity
def _perplexity_arguments(g) -> None:
    g.add_argument("--tokens", type=int, default=100_000, help="target tokens to score")


def _perplexity_prepare(args, loaded: Loaded):
    docs = open_documents(args.data, loaded, args.text_key, args.heldout)
    window = loaded.seq_len or args.segment
    return lambda: {"data": args.data, **perplexity(loaded.model, docs, window, args.tokens, args.batch_size,
                                                    not args.no_progress)}


def _perplexity_markdown(p: dict) -> list[str]:
    return ["## Perplexity", "", p["definition"] + ".", "",
            "| data | documents | tokens | loss (nats/token) | perplexity | tokens/s |",
            "|---|---:|---:|---:|---:|---:|",
            f"| `{p['data']}` | {p['documents']} | {p['tokens']} | {fmt(p['loss'], 4)} "
            f"| {fmt(p['perplexity'], 2)} | {fmt(p['tokens_per_s'], 0)} |", ""]


# ------------------------------------------------------------------ long_context
def _long_context_arguments(g) -> None:
    g.add_argument("--segment", type=int, help="segment length S (default: the training seq_len)")
    g.add_argument("--long-len", type=int, help="positions evaluated per document (default: 8 segments)")
    g.add_argument("--long-docs", type=int, default=16, help="documents (longer than --long-len) to read")
    g.add_argument("--buckets", choices=("segment", "pow2"), default="segment")


def _long_context_prepare(args, loaded: Loaded):
    segment = args.segment or loaded.seq_len
    length = args.long_len or 8 * segment
    lc.check_segment(loaded.model, segment, length)
    docs = open_documents(args.data, loaded, args.text_key, args.heldout)
    return lambda: {"data": args.data, **lc.long_context(loaded.model, docs, length, segment, args.long_docs,
                                                         args.batch_size, args.buckets, not args.no_progress)}


def _long_context_markdown(r: dict) -> list[str]:
    modes = r["modes"]
    lines = ["## Long-document loss by position", "", r["definition"] + ".", ""]
    if "note" in r:
        lines += [f"Note: {r['note']}.", ""]
    lines += [f"{r['documents']} documents, {fmt(r['tokens_per_s'], 0)} tokens/s.", "",
              "| positions | " + " | ".join(f"{m} loss" for m in modes) + (" | carry - reset |" if len(modes) == 2
                                                                             else " |"),
              "|---|" + "---:|" * (len(modes) + (len(modes) == 2))]
    for b in r["buckets"]:
        cells = [fmt(b[mode], 4) for mode in modes]
        if len(modes) == 2:
            cells.append(f"{b['carry'] - b['reset']:+.4f}")
        lines.append(f"| {b['start']}-{b['end'] - 1} | " + " | ".join(cells) + " |")
    return lines + [""]


def _long_context_plot(r: dict, ax) -> None:
    mids = [(b["start"] + b["end"]) / 2 for b in r["buckets"]]
    for mode, style in (("carry", "o-"), ("reset", "s--")):
        if mode in r["modes"]:
            ax.plot(mids, [b[mode] for b in r["buckets"]], style, label=f"state {mode}")
    if r["bucket_kind"] == "pow2":
        ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss by position, segments of {r['segment']}")
    ax.legend()


# ------------------------------------------------------------------ passkey
def _passkey_arguments(g) -> None:
    g.add_argument("--passkey-lengths", type=_ints, default=list(pk.LENGTHS))
    g.add_argument("--passkey-depths", type=_floats, default=list(pk.DEPTHS))
    g.add_argument("--passkey-samples", type=int, default=1, help="samples per (length, depth)")
    g.add_argument("--passkey-candidates", type=int, default=10, help="true key + distractors")
    g.add_argument("--passkey-mode", choices=("auto", "text", "tokens"), default="auto",
                   help="text needs a tokenizer; auto: text when one is known")


def _passkey_prepare(args, loaded: Loaded):
    mode = args.passkey_mode if args.passkey_mode != "auto" else ("text" if loaded.tokenizer else "tokens")
    if mode == "text":
        encoder = load_encoder(loaded)
        vocab = pk.Vocab.text(lambda s: encoder.encode_batch([s])[0])
    else:
        vocab = pk.Vocab.tokens(loaded.cfg.vocab_size, loaded.eod_id)
    samples = pk.make_samples(vocab, args.passkey_lengths, args.passkey_depths, args.passkey_samples,
                              args.passkey_candidates, args.seed)

    def run() -> dict:
        out = pk.passkey(samples, pk.model_scorer(loaded.model), not args.no_progress, mode)
        seq_len = loaded.seq_len
        if not loaded.cfg.mixer_spec.recurrent and seq_len and max(args.passkey_lengths) > seq_len:
            out["note"] = (f"attention reads contexts longer than its training seq_len {seq_len} through a KV "
                           "cache, at positions it never saw in training")
        return out
    return run


def _passkey_markdown(r: dict) -> list[str]:
    depths = r["depths"]
    lines = ["## Passkey retrieval", "", r["definition"] + f"; {r['mode']} mode; chance {r['chance']:.2f}.", "",
             f"Accuracy {r['accuracy']:.3f} over {r['samples']} samples, {fmt(r['tokens_per_s'], 0)} tokens/s.", "",
             "| length | accuracy | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---:|---:|" + "---:|" * len(depths)]
    for row in r["by_length"]:
        lines.append(f"| {row['length']} | {row['accuracy']:.3f} | "
                     + " | ".join(f"{row['by_depth'][str(d)]:.2f}" for d in depths) + " |")
    if r.get("note"):
        lines += ["", f"Note: {r['note']}."]
    return lines + [""]


def _passkey_plot(r: dict, ax) -> None:
    xs = [row["length"] for row in r["by_length"]]
    ax.plot(xs, [row["accuracy"] for row in r["by_length"]], "o-", label="accuracy")
    ax.axhline(r["chance"], color="gray", ls=":", label="chance")
    _log2_axes(ax, "context length (tokens)", "passkey accuracy")


# ------------------------------------------------------------------ mqar
def _mqar_arguments(g) -> None:
    g.add_argument("--mqar-pairs", type=_ints, default=list(mq.PAIRS))
    g.add_argument("--mqar-samples", type=int, default=64)
    g.add_argument("--mqar-vocab", type=_range, default=None, help="LO:HI token-id range (default: whole vocab)")


def _mqar_prepare(args, loaded: Loaded):
    mq.check(loaded.model, args.mqar_pairs, args.mqar_vocab, loaded.eod_id)
    return lambda: mq.mqar(loaded.model, args.mqar_pairs, args.mqar_samples, args.mqar_vocab, loaded.eod_id,
                           max(args.batch_size, 1), args.seed, loaded.seq_len, not args.no_progress)


def _mqar_markdown(r: dict) -> list[str]:
    lines = ["## MQAR", "", r["definition"] + ".", "",
             f"{r['samples']} samples per row, keys/values from ids {r['vocab'][0]}..{r['vocab'][1] - 1}, "
             f"chance over values {r['chance_values']:.4f}, {fmt(r['tokens_per_s'], 0)} tokens/s.", "",
             "| pairs | sequence | accuracy | accuracy (values only) |", "|---:|---:|---:|---:|"]
    for row in r["by_pairs"]:
        star = " *" if row["beyond_train_context"] else ""
        lines.append(f"| {row['pairs']} | {row['seq_len']}{star} | {row['accuracy']:.3f} | "
                     f"{row['accuracy_values']:.3f} |")
    if any(row["beyond_train_context"] for row in r["by_pairs"]):
        lines += ["", "\\* longer than the training context."]
    return lines + [""]


def _mqar_plot(r: dict, ax) -> None:
    xs = [row["pairs"] for row in r["by_pairs"]]
    ax.plot(xs, [row["accuracy"] for row in r["by_pairs"]], "o-", label="accuracy (full vocab)")
    ax.plot(xs, [row["accuracy_values"] for row in r["by_pairs"]], "s--", label="accuracy (values only)")
    _log2_axes(ax, "key-value pairs", "MQAR accuracy")


EVALS: dict[str, Eval] = {e.name: e for e in (
    Eval("perplexity", True, _perplexity_arguments, _perplexity_prepare,
         lambda r: f"perplexity {r['perplexity']:.3f} (loss {r['loss']:.4f})", _perplexity_markdown),
    Eval("long_context", True, _long_context_arguments, _long_context_prepare,
         lambda r: "loss " + ", ".join(f"{m} {v:.4f}" for m, v in r["loss"].items()), _long_context_markdown,
         _long_context_plot),
    Eval("passkey", False, _passkey_arguments, _passkey_prepare,
         lambda r: f"accuracy {r['accuracy']:.3f} (chance {r['chance']:.2f})", _passkey_markdown, _passkey_plot),
    Eval("mqar", False, _mqar_arguments, _mqar_prepare,
         lambda r: "accuracy " + ", ".join(f"{x['pairs']}:{x['accuracy']:.2f}" for x in r["by_pairs"]),
         _mqar_markdown, _mqar_plot),
)}
