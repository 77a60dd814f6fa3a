"""What every job shares: typed configs (:mod:`~aligner.runtime.config`), manifests
(:mod:`~aligner.runtime.manifest`), logging and rate lines (:mod:`~aligner.runtime.logs`),
connecting to Ray and sizing actor pools (:mod:`~aligner.runtime.raycluster`), image grids
(:mod:`~aligner.runtime.grids`) and the stage runner (:mod:`~aligner.runtime.pipeline`)."""
