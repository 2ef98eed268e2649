"""Models in and out of zenlm: Hugging Face folders (and the hub when online), GGUF files.

``load`` reads any of them (plus zenlm's own run folders); ``export_hf`` writes a folder that
transformers loads, ``gguf_export.export_gguf`` a file that llama.cpp loads. ``registry`` says
which architectures are converted and takes new ones.
"""

from zenlm.interop.hf import export_hf
from zenlm.interop.load import load

__all__ = ["load", "export_hf"]
