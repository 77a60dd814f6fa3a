"""aligner: align a CLIP-style text-to-image retriever with human aesthetics.

The library: the built-in aesthetic world, retriever models, corpus readers, aesthetic
scorers, faiss indexes, metrics and the training loops that Ray Train runs. It never imports
the jobs (``jobs/``) or the server (``serving/``); heavy imports (torch, open_clip, ray) happen
inside the modules that need them, not here.
"""

__version__ = "0.1.0"
