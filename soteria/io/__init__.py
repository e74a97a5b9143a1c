"""Files and the Hub: atomic output, the safetensors layer, checkpoint folders, Hub ids and errors.

Imports nothing else of soteria; every step above reads and writes through it.
"""
