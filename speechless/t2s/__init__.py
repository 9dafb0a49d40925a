"""Stage 2, the Speechless model: text -> the tokens its speech would give (model, decoders, alignment, generation),
judged by the round trip through the CTC probe. Imports only `core`, `data` and `speech`."""
