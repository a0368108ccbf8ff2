"""The GIE engine: compile concepts for a pipeline and guard one call at a time.

    plan = compile_plan(pipe, [ConceptSpec("nudity", "nude", 3.0)], StepWindow(0.0, 0.8))
    with guarded_call(pipe, plan) as record:
        images = pipe(prompt).images

Layout: ``families/`` (what each pipeline family is: sites, their handlers, encodings),
``plan`` (what a call needs that does not change between calls), ``call`` (the entry
points: locks, ``guarded_call``, ``observing``), ``coordinator`` (one call: install the
family's site handlers, step contexts, record, invariants, restore) with ``clock`` (the
step clock), ``rows`` (prompt rows), ``install`` (patches and hooks), ``context`` (what
sites may read), ``sites`` (the handler protocol), ``inhibition`` (measure, observe,
anchors and inhibit, once for every kind of site), ``cross`` and ``joint`` (the built-in
handlers), ``attention`` (the maths), ``record`` (the call record and its protocols).
"""

from ..window import StepWindow
from .call import CallRecord, MapObserver, ScaleSource, denoiser_lock, guarded_call, observing
from .families import Family, Site, family_for, supported_pipelines
from .gating import PresenceGate, presence
from .plan import ConceptSpec, Plan, compile_plan

__all__ = [
    "CallRecord",
    "ConceptSpec",
    "Family",
    "MapObserver",
    "Plan",
    "PresenceGate",
    "ScaleSource",
    "Site",
    "StepWindow",
    "compile_plan",
    "denoiser_lock",
    "family_for",
    "guarded_call",
    "observing",
    "presence",
    "supported_pipelines",
]
