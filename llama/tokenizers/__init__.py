"""Text and ids: the Tokenizer interface (base), its three implementations (sentencepiece,
tiktoken, Hugging Face's tokenizer.json), load_tokenizer which picks one from a file (load), the
chat formats and the incremental detokenizer with stop strings.

May import nothing of llama's other packages.
"""
