"""Data pipeline: tokenizer, indexed datasets, GPT samples, blending, the default corpus.

    tokenizer.py           Tokenizer interface, sentencepiece and Hugging Face implementations, load_tokenizer
    tokenizer_training.py  train a sentencepiece model (tools/train_tokenizer.py)
    documents.py           read documents from text / JSONL files
    preprocess.py          documents -> .bin/.idx with worker processes (tools/preprocess_data.py)
    indexed_dataset.py     the .bin/.idx format: writer and validating memory-mapped reader
    gpt_dataset.py         GPT samples of seq_length + 1 tokens; mock samples
    blending.py            weighted blending with exact proportions
    index_cache.py         on-disk cache of index arrays, safe for concurrent processes
    build.py               DataConfig -> train/valid/test datasets; per-DP-rank micro-batches
    default_corpus.py      the built-in corpus made from the Python standard library

Stands alone: it takes DP rank and size as numbers and never touches process groups.
"""
