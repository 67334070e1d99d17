"""Vocabulary size and end-of-document id read straight from a tokenizer file."""

import json

from hope_dist.errors import DataError

EOD_TOKEN = "<|endoftext|>"


def tokenizer_info(path: str) -> tuple[int, int | None]:
    """(vocab_size, id of ``<|endoftext|>`` or None) of a tokenizer.json or SentencePiece .model."""
    if path.endswith(".model"):
        import sentencepiece

        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise DataError(f"cannot read SentencePiece model {path} ({e}); pass the tokenizer the data "
                            "was tokenized with (data.tokenizer)") from e
        pid = sp.piece_to_id(EOD_TOKEN)
        eod = pid if sp.id_to_piece(pid) == EOD_TOKEN else (sp.eos_id() if sp.eos_id() >= 0 else None)
        return sp.get_piece_size(), eod
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        ids = dict(spec["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
        vocab_size = max(int(i) for i in ids.values()) + 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read tokenizer {path} ({type(e).__name__}: {e}); pass the tokenizer.json "
                        "or .model the data was tokenized with (data.tokenizer)") from e
    return vocab_size, ids.get(EOD_TOKEN)
