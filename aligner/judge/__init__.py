"""Judges and annotators: the order-consistent pairwise row judge (LMM back ends and a proxy,
named as such) and VisionPrefer-style per-aspect annotation."""
