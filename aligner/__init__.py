"""aligner: align a CLIP-style text-to-image retriever with human aesthetics.

The library, one folder per stage of the pipeline (imports only run downwards):

    runtime/  data/  world/     configs, manifests, Ray; the data contracts; the built-in world
    aesthetics/  retrieval/     scorers; models, embedding, index, search
    rephrase/  preferences/     LLM rephrasing; preference pairs from a teacher
    training/                   pre-training and preference alignment on Ray Train
    evaluation/                 systems, metrics, sweeps, the report

It never imports the jobs (``jobs/``) or the server (``serving/``); heavy imports (torch,
open_clip, ray) happen inside the modules that need them, not here. ``docs/architecture.md``
draws the whole picture.
"""

__version__ = "0.1.0"
