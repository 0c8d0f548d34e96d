"""The bundled procedural domain: the shape generator, the prompt-following checker, the tokenizer
of the tiny model, and where the bundled model lives."""
