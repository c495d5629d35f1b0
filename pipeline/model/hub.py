"""Weights from the Hugging Face Hub, where TRM checkpoints are shared: `hf:ORG/NAME[@REVISION][/SUBFOLDER]`.

The spec is resolved with huggingface_hub (installed with Accelerate) into its cache (HF_HUB_CACHE / HF_HOME),
downloading only SUBFOLDER when one is named; with HF_HUB_OFFLINE=1 only the cache is read. What it resolves to
is a local path that pipeline.model.loading loads like any other: a checkpoint file, an exported folder, or the
reference's checkpoint folder (all_config.yaml + step_N).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import CheckpointError

PREFIX = "hf:"
_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w.-]+))?(?:/(?P<subfolder>.+))?$")


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None  # None: the default branch
    subfolder: str  # "" = the repository's root


def is_hub_spec(text: str | None) -> bool:
    return bool(text) and text.startswith(PREFIX)


def parse_hub_spec(text: str, flag: str = "--checkpoint") -> HubSpec:
    match = _SPEC.match(text[len(PREFIX):])
    subfolder = (match["subfolder"] or "").strip("/") if match else ""
    if match is None or ".." in subfolder.split("/"):
        raise CheckpointError(f"{flag} {text}: not a Hub spec; write hf:ORG/NAME, hf:ORG/NAME@REVISION or "
                              "hf:ORG/NAME[@REVISION]/SUBFOLDER")
    return HubSpec(match["repo"], match["revision"], subfolder)


def resolve_hub_spec(text: str, flag: str = "--checkpoint") -> Path:
    """The local path (in the Hub cache) of the weights `text` names; fetched first unless HF_HUB_OFFLINE=1."""
    spec = parse_hub_spec(text, flag)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    except ImportError as e:
        raise CheckpointError(f"{flag} {text}: huggingface_hub is not installed ({e}); pip install huggingface_hub") \
            from None
    patterns = [spec.subfolder, f"{spec.subfolder}/*"] if spec.subfolder else None
    try:
        root = Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        where = f"offline (HF_HUB_OFFLINE=1) only the cache {HF_HUB_CACHE} is read" if HF_HUB_OFFLINE else \
            f"cache {HF_HUB_CACHE}"
        raise CheckpointError(f"{flag} {text}: cannot be fetched from the Hugging Face Hub ({type(e).__name__}: "
                              f"{reason}); {where}") from None
    path = root / spec.subfolder if spec.subfolder else root
    if not path.exists():
        raise CheckpointError(f"{flag} {text}: the repository {spec.repo_id} has no {spec.subfolder!r} "
                              f"(fetched to {root})")
    return path


def weights_path(value: str | None, flag: str) -> Path | None:
    """A weights path as given on the command line, or the local copy (Hub cache) of an `hf:` spec."""
    if not value:
        return None
    return resolve_hub_spec(value, flag) if is_hub_spec(value) else Path(value)
