"""tinyldm: latent diffusion (Rombach et al., CVPR 2022) from scratch, small enough to read.

Components, one file each (see DESIGN.md and the README for the tour):
  data.py          captioned Shapes dataset and a loader for your own captioned images
  text_encoder.py  tokenizer (trained with `tokenizers`) and a small transformer text encoder
  autoencoder.py   KL-regularised autoencoder: image x <-> latent z
  unet.py          U-Net with timestep embedding and cross-attention to the text
  diffusion.py     noise schedules, forward process, DDPM/DDIM samplers, guidance, loss
  ldm.py           LatentDiffusion: the components wired together
"""

__version__ = "0.1.0"
