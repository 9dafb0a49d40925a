"""Stage 1, the speech tokenizer: the audio encoder family (Gemma 4 audio tower, CTC pre-training), the feature
cache, the residual VQ, audio -> tokens, and the token format. Imports only `core` and `data`."""
