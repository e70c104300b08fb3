"""Plumbing below the teaching tier: what ddpm.py, dcgan.py, data.py, fid.py and classify.py need
and a student can skip. `configs` turns dataclass fields into command-line options and holds the
one-line error (`CLIError`) that main.py prints; `runtime` picks the device and seeds; `files` writes
files atomically, reads checkpoints without running code and saves PNGs; `weightfiles` finds and
reads pretrained weights (a folder, the Hugging Face cache, a download). Nothing here imports a
teaching module or a package above it (training/, study/, tools/).
"""
