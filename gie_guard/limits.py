"""Every documented bound of gie_guard in one place (no torch import: the CLI reads it).

A safety layer refuses work it cannot do within these bounds instead of degrading:
bigger policies are refused when they are loaded, bigger scales when they are validated.
README.md ("Fails closed") and docs/policies.md quote these numbers.
"""

from __future__ import annotations

__all__ = ["MAX_ADAPTER_BYTES", "MAX_CONCEPT_TEXTS", "MAX_CONCEPTS", "MAX_SCALE", "MIN_SCALE"]

# Largest suppression scale w a policy or a ConceptSpec may set. The useful range measured
# on the shapes models is 0.25-40 (an SD-like toy needed 20-40); beyond 100 the inhibitor
# dominates the layer output and fp16 activations overflow (1e30 gave NaN images).
MAX_SCALE = 100.0

# Smallest positive scale w (0 turns a concept off). Every dtype a pipeline runs in holds it
# as a normal number (float16's smallest normal is 6.1e-5), so a scale that passes is never
# flushed to zero on its way into the inhibitor; 1e-46 or 1e-300 once passed and inhibited
# nothing while the report listed every step. The useful range starts near 0.25.
MIN_SCALE = 1e-3

# Concept texts (concepts plus their aliases, after includes, before deduplication) one
# policy may hold. Deduplication embeds every text once; 2,000 keeps a reload in seconds.
MAX_CONCEPT_TEXTS = 2_000

# Concepts left after deduplication. Each one costs, per attention layer, keys and values
# over its whole encoding for the length of a call (memory grows linearly with this).
MAX_CONCEPTS = 1_000

# Largest adapter file read. An adapter is an MLP of a few thousand weights (about 20 KB for
# SD 1.x); 64 MiB leaves room for any layer count while a wrong file (a model checkpoint
# named .safetensors) is refused before it is read.
MAX_ADAPTER_BYTES = 64 * 1024 * 1024
