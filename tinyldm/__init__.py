"""tinyldm: latent diffusion (Rombach et al., CVPR 2022) from scratch, small enough to read.

The package is the model, its data and its evaluation, one file each (the README has the tour):
  data.py          captioned Shapes dataset, and a loader for your own captioned images
  text_encoder.py  tokenizer (trained with `tokenizers`) and a small transformer text encoder
  autoencoder.py   KL-regularised autoencoder: image x <-> latent z, its losses, a patch discriminator
  unet.py          U-Net with timestep embedding and cross-attention to the text
  diffusion.py     noise schedules, forward process, DDPM/DDIM samplers, guidance, loss
  ldm.py           LatentDiffusion: the four components wired together; sampling, img2img and
                   inpainting; save/load a run folder
  classifier.py    noise-aware latent classifier p(y | z_t), for classifier guidance on Shapes
  evaluate.py      attribute detector, caption fidelity and its sweeps, edits, reconstruction PSNR
  __main__.py      `python -m tinyldm data|sample|img2img|inpaint|evaluate`

Beside the package, in the repository: train_small.py (training, all stages), bench.py
(benchmarks), course/ (assignments: starter kit and grading), notebooks/ and tests/. Nothing in
tinyldm/ imports them.
"""

__version__ = "0.1.0"
