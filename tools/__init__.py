"""Tools around the project: `extract` writes the NIH data set in the class-folder layout (`layout`
is how a layout is written, shared with `phantoms`, the synthetic stand-in X-rays); `export` writes a
DDPM checkpoint in the Hugging Face diffusers layout; `bench` times our code against its references
(`python -m tools.bench`). They import the teaching tier; nothing in it imports them.
"""
