"""What every trainer of this project shares (the tokenizer's, the AR and diffusion generators', the VQA model's):
stop requests (SIGTERM / Ctrl-C honoured at a step boundary, exit 143 / 130), the shut-down of data-loader
workers before a process ends, validation of numeric options (one line, exit 2) and the one-time conversion
of old checkpoints into the safe format. Checkpoint files are read with :func:`meditok.safe_load`.

This package depends on ``meditok`` only; trainers depend on it, never the reverse.
"""
