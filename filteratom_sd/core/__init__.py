"""The method-agnostic adapter framework: the layer wrapper and its fast paths, target selection,
injection, the adapter file with its fingerprint, the token embedding, and the public load / fuse / unload API."""
