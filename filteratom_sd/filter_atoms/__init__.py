"""The paper's method: presets, pure decomposition and update math, per-layer decomposition and
its cache, the `AtomDelta` module and `FilterAtomMethod`."""
