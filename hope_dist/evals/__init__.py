"""Evaluations of a trained model, one module per eval (driven by `python -m tools.evaluate`).

loading      the model (committed checkpoint or exported folder), tokenizer and documents
perplexity   per-document perplexity in windows of the training context (state reset per window)
long_context loss by position over long documents read in segments, state carried vs reset
passkey      needle-in-a-haystack retrieval at 512..16K tokens, scored by log-likelihood
mqar         multi-query associative recall (Zoology) at several numbers of key-value pairs
registry     EVALS: each eval's arguments, runner, headline, markdown section and plot
report       results.json, results.md and the PNG plots, each written whole or not at all
"""
from hope_dist.evals.loading import EvalError, Loaded, load_model  # noqa: F401
