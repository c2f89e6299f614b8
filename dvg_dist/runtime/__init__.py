"""Running a diffusers checkpoint with DVG: the staged engine and what surrounds it — the command lines, the
distributed context, memory options, LoRA, VAE decode, atomic outputs and version checks."""
