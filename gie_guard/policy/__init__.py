"""Policies: what to keep out of generated images, as validated, deduplicated snapshots.

    load_policy("nsfw")            -> PolicySnapshot   (shipped name, path, dict or Policy)
    PolicyStore("p.yaml", watch=True).current          (hot-reloaded snapshot)
    PolicyStore(..., roots=[...], validate=fn)         (include folders, a check before every swap)

See docs/policies.md for the file format.
"""

from .dedup import Embedder, SentenceTransformerEmbedder, deduplicate, default_embedder, pairwise_distances
from .embedcache import EmbeddingCache, default_cache_dir
from .loader import (
    FlatPolicy,
    PolicySource,
    PolicyValidationError,
    check_policy,
    read_policy,
    shipped_policy_dir,
    shipped_policy_names,
)
from .schema import DEFAULT_DEDUP_THRESHOLD, DEFAULT_INHIBIT_STEPS, AutoScale, Concept, Policy
from .snapshot import EffectiveConcept, Merge, PolicySnapshot, content_hash, expand_concepts
from .store import DEFAULT_SETTLE_S, PolicyStore, ReloadEvent, ReloadState, load_policy
from .yamlio import MAX_NODES, MAX_POLICY_BYTES

__all__ = [
    "DEFAULT_DEDUP_THRESHOLD",
    "DEFAULT_INHIBIT_STEPS",
    "DEFAULT_SETTLE_S",
    "MAX_NODES",
    "MAX_POLICY_BYTES",
    "AutoScale",
    "Concept",
    "EffectiveConcept",
    "Embedder",
    "EmbeddingCache",
    "FlatPolicy",
    "Merge",
    "Policy",
    "PolicySnapshot",
    "PolicySource",
    "PolicyStore",
    "PolicyValidationError",
    "ReloadEvent",
    "ReloadState",
    "SentenceTransformerEmbedder",
    "check_policy",
    "content_hash",
    "deduplicate",
    "default_cache_dir",
    "default_embedder",
    "expand_concepts",
    "load_policy",
    "pairwise_distances",
    "read_policy",
    "shipped_policy_dir",
    "shipped_policy_names",
]
