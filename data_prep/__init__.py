"""Raw text -> Megatron indexed datasets: default corpus, tokenizer training, fast tokenization."""
