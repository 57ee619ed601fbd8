"""Chat data: tokenizer (``tokenizer.py``), JSONL reading and checks (``jsonl.py``), chat -> token ids
and loss mask (``chat.py``), split/truncate/pack into samples (``dataset.py``), batching
(``collate.py``). Import the submodules; this package imports nothing heavy."""
