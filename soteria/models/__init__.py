"""Getting a model and its tokenizer: Hub ids and folders, GGUF files, real models fetched through
pip, tiny random ones built from configs; and running a model while leaving it as found.

Imports only :mod:`soteria.io` of soteria.
"""
