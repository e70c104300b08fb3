"""The training harness: everything a long run needs around the teaching code, which a student can
skip. `harness` opens a run (checks of --out and --data, the folder's lock, torchrun, the checkpoint
to resume, seeds) and runs the loop (deterministic data order, progress bar, CSV log, atomic
checkpoints, `--resume` bit for bit, Ctrl-C that saves, non-finite values that stop before saving);
`ddpm_run` and `gan_run` wrap ddpm.train_step and dcgan.make_step in it for `main.py ddpm` and
`main.py gan`; `monitor` measures samples against held-out images while a generator trains;
`diffaugment` is the modern GAN preset's augmentation.
"""
