"""C4 validation perplexity: `datas.C4.c4_eval` (kept out of this package's import so that
`python -m datas.C4.c4_eval` runs the module once)."""
