"""LatentDiffusion: the four components wired together (LDM paper, Sec. 3 and Fig. 3).

  caption ──tokenizer──► ids, mask ──TextEncoder──► c (B, L, d) ────────────────┐ cross-attention
  image x ──Encoder──► q(z|x) ──sample, (z − shift)·scale──► z0 ──q_sample──► z_t ──► UNet ──► ε̂
  sampling: z_T ~ N(0, I) ─► DDPM/DDIM with guidance ─► z0 ─► z0/scale + shift ─► Decoder ─► image
  editing:  img2img starts DDIM from q_sample(E(x), t0, ε) (SDEdit, Meng et al. 2022); inpaint keeps the
            latents outside a mask on q_sample(E(x), t, ε) at every step (RePaint, Lugmayr et al. 2022)

This is the only file that knows all four components, and it knows nothing else: no dataset, no
classifier (classifier guidance comes in as a gradient function, see `generate`). It never picks a
device: everything runs where the model's parameters are (move the model with `.to(device)`).

A run folder holds `model.json` (every config, the latent shift and scale), `tokenizer.json` and
`model.pt` (state dicts only, loaded with `torch.load(weights_only=True)`); other files may sit beside
them (logs, plots, a classifier's own classifier.json and classifier.pt) and are not read here. A file
that is there but broken is a RunFolderError whose one line names the file and what is wrong.
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyldm.autoencoder import Autoencoder, AutoencoderConfig, check_autoencoder_config
from tinyldm.diffusion import (DiffusionConfig, NoiseSchedule, _initial_noise, _progress, ddim_sample, ddim_timesteps, ddpm_sample,
                               diffusion_loss, make_beta_schedule, make_guided_eps, scale_is, sdedit_timesteps,
                               training_timesteps)
from tinyldm.text_encoder import (BOS, PAD, TextEncoder, TextEncoderConfig, check_text_encoder_config, load_tokenizer,
                                  tokenize)
from tinyldm.unet import UNet, UNetConfig, check_unet_config

SAMPLERS = ("ddim", "ddpm")


class LatentDiffusion(nn.Module):
    """Tokenizer + text encoder τ_θ + autoencoder (E, D) + U-Net ε_θ + noise schedule."""

    def __init__(self, tokenizer, text_cfg, autoencoder_cfg, unet_cfg, diffusion_cfg, image_size,
                 scale_factor=1.0, latent_shift=0.0):
        super().__init__()
        # The boundary a user calls: every component's config is checked here, with what to change.
        check_text_encoder_config(text_cfg)
        check_autoencoder_config(autoencoder_cfg, image_size)
        check_unet_config(unet_cfg, image_size // 2 ** (len(autoencoder_cfg.channel_mult) - 1))  # latent side
        if text_cfg.d_model != unet_cfg.context_dim:
            raise ValueError(f"text encoder width {text_cfg.d_model} != U-Net context_dim {unet_cfg.context_dim}")
        if autoencoder_cfg.z_channels != unet_cfg.in_channels:
            raise ValueError(f"latent channels {autoencoder_cfg.z_channels} != U-Net in_channels {unet_cfg.in_channels}")
        self.tokenizer = tokenizer
        self.text_cfg, self.autoencoder_cfg, self.unet_cfg, self.diffusion_cfg = (
            text_cfg, autoencoder_cfg, unet_cfg, diffusion_cfg)
        self.text_encoder = TextEncoder(text_cfg)
        self.autoencoder = Autoencoder(autoencoder_cfg)
        self.unet = UNet(unet_cfg)
        betas = make_beta_schedule(diffusion_cfg.schedule, diffusion_cfg.T,
                                   diffusion_cfg.beta_start, diffusion_cfg.beta_end)
        self.schedule = NoiseSchedule(betas)
        self.image_size = int(image_size)  # H = W of the images the autoencoder works at
        # z0 = (z − shift) · scale, so that the diffusion model sees unit-variance latents (LDM Sec. 4.3.2,
        # App. G). Each is one number (CompVis' scale_by_std, shift 0) or one per latent channel.
        self.scale_factor = latent_constant(scale_factor, autoencoder_cfg.z_channels, "scale_factor", positive=True)
        self.latent_shift = latent_constant(latent_shift, autoencoder_cfg.z_channels, "latent_shift")
        # with UNet.keep_attention_weights(True), the cross-attention weights of a sampler's last U-Net call
        # per CFG pass: {"cond": {layer: (B, heads, HW, L)}, "uncond": {...}} (see _unet_output_by_pass)
        self.attention_weights = {}

    @property
    def device(self):
        return next(self.parameters()).device

    # -- the three encoders/decoders ----------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images, generator=None, sample=True):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents z0 (B, z, H/f, W/f)."""
        posterior = self.autoencoder.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.normalize_latents(z)

    def normalize_latents(self, z):
        """Autoencoder latents z (B, z, h, w) -> diffusion latents z0 = (z − shift) · scale."""
        shift, scale = self._per_channel(self.latent_shift, z), self._per_channel(self.scale_factor, z)
        return (z - shift) * scale                  # LDM Sec. 4.3.2, per channel: z0 = (z − μ_c)/σ_c  (B, z, h, w)

    def denormalize_latents(self, z0):
        """Diffusion latents z0 (B, z, h, w) -> autoencoder latents z = z0 / scale + shift."""
        shift, scale = self._per_channel(self.latent_shift, z0), self._per_channel(self.scale_factor, z0)
        return z0 / scale + shift                   # the inverse: z = σ_c·z0 + μ_c  (B, z, h, w)

    @staticmethod
    def _per_channel(value, z):
        """A number, or a list of one number per channel as a (1, z, 1, 1) tensor like z."""
        if isinstance(value, list):
            return torch.tensor(value, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
        return value

    @torch.no_grad()
    def decode_latents(self, z0):
        """Scaled latents z0 -> images (B, 3, H, W), clamped to [-1, 1]."""
        return self.autoencoder.decode(self.denormalize_latents(z0)).clamp(-1, 1)

    def tokenize(self, prompts):
        """Prompts -> (ids, mask) on the model's device, padded to the encoder's max_length."""
        ids, mask = tokenize(self.tokenizer, prompts, self.text_cfg.max_length)
        return ids.to(self.device), mask.to(self.device)

    def encode_text(self, prompts):
        """Prompts -> (context (B, L, d), mask (B, L)): c = τ_θ(y) (LDM Eq. 3)."""
        ids, mask = self.tokenize(prompts)
        return self.text_encoder(ids, mask), mask

    def unet_output(self, z_t, t, cond):
        """The U-Net's raw output: ε̂, or v̂ when diffusion_cfg.prediction == "v"; `cond` is (context, mask)
        as returned by encode_text. The training loss and the samplers take this, with the prediction."""
        context, mask = cond
        return self.unet(z_t, t, context, mask)

    def eps_model(self, z_t, t, cond):
        """ε_θ(z_t, t, c), whatever the U-Net predicts: a v̂ is turned into ε̂ = √(1−ᾱ_t)·z_t + √ᾱ_t·v̂."""
        out = self.unet_output(z_t, t, cond)
        return self.schedule.eps_from_v(z_t, t, out) if self.diffusion_cfg.prediction == "v" else out  # v-pred

    # -- training ------------------------------------------------------------------------------

    def drop_captions(self, ids, mask, generator=None):
        """Caption dropout for CFG (CFG Sec. 3.2): each row becomes the empty prompt "" w.p. p_uncond."""
        pad = self.tokenizer.token_to_id(PAD)
        empty_ids = torch.full_like(ids[0], pad)                           # (L,) "" is [BOS] + padding, as
        empty_ids[0] = self.tokenizer.token_to_id(BOS)                     # tokenize([""]) gives, made on device
        empty_mask = empty_ids != pad                                      # (L,)
        drop = torch.rand(ids.shape[0], generator=generator, device=ids.device) < self.diffusion_cfg.p_uncond
        ids = torch.where(drop[:, None], empty_ids, ids)                   # (B, L)
        mask = torch.where(drop[:, None], empty_mask, mask)
        return ids, mask

    def forward(self, z0, ids, mask, generator=None):
        """Training loss on latents (what train_small.py calls, through DDP when distributed):
        LDM Eq. 3 / DDPM Eq. 14, E ‖ε − ε_θ(z_t, t, τ_θ(y))‖², with caption dropout."""
        ids, mask = self.drop_captions(ids, mask, generator)
        context = self.text_encoder(ids, mask)                             # (B, L, d)
        cfg = self.diffusion_cfg
        t = training_timesteps(self.schedule.T, z0.shape[0], cfg.p_noisy_t, cfg.noisy_t_from, generator,
                               z0.device)                                  # (B,)
        return diffusion_loss(self.unet_output, self.schedule, z0, (context, mask),
                              prediction=cfg.prediction, generator=generator, t=t)

    def loss(self, images, captions, generator=None):
        """The LDM objective in one call, from images (B, 3, H, W) in [-1, 1] and caption strings: what a
        training loop of your own calls. train_small.py encodes the dataset to latents once and calls
        forward on them instead (the same loss, without running the encoder at every step)."""
        z0 = self.encode_images(images, generator)
        ids, mask = self.tokenize(captions)
        return self(z0, ids, mask, generator)

    # -- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, steps=50, guidance_scale=3.0, sampler="ddim", eta=0.0, generator=None, x_T=None,
                 classifier_grad=None, classifier_scale=0.0, progress=False, callback=None, return_latents=False):
        """Prompts -> images (B, 3, H, W) in [-1, 1].

        sampler "ddim" takes `steps` steps (eta 0 = deterministic); "ddpm" always takes all T.
        guidance_scale s: ε̃ = ε(c_u) + s·(ε(c) − ε(c_u)), c_u the empty prompt's context (s = 1: none).
        classifier_grad(z_t, t) -> ∇_{z_t} log p(y|z_t) with classifier_scale γ: classifier guidance,
        ε̂ = ε̃ − γ·√(1−ᾱ_t)·∇ log p(y|z_t) (e.g. classifier.make_classifier_grad for the Shapes classifier).
        Either scale may be a tensor (B,), one scale per prompt: one call then sweeps the scale.
        generator: a torch.Generator on the model's device, for reproducible samples.
        x_T: the starting noise (B, z, h, w) instead of a draw from `generator` (moved to the model's
        device); with DDIM, eta 0, the images then depend only on x_T and the prompts.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self._check_scales(len(prompts), guidance_scale, classifier_grad, classifier_scale)
        shape = (len(prompts), *self.latent_shape)                         # (B, z, h, w)
        x_T = self._on_device(x_T)
        with self._evaluating():
            # 1–2. the prompts' contexts and the guided noise prediction ε̃(z_t, t)
            eps_fn = self._guided_eps(prompts, guidance_scale, classifier_grad, classifier_scale)
            # 3. the reverse process in latent space, z_T ~ N(0, I) → z0
            run = dict(generator=generator, x_T=x_T, progress=progress, callback=callback)
            if sampler == "ddim":
                z0 = ddim_sample(eps_fn, self.schedule, shape, steps=steps, eta=eta, **run)
            else:
                z0 = ddpm_sample(eps_fn, self.schedule, shape, **run)
        # 4. back to pixels   LDM Sec. 3: x̃ = D(z0 / scale)
        images = self.decode_latents(z0)
        return (images, z0) if return_latents else images

    @property
    def latent_shape(self):
        """(z, h, w): the shape of one latent, h = w = image_size / f."""
        h = self.image_size // self.autoencoder_cfg.downsample_factor
        return (self.unet_cfg.in_channels, h, h)

    @contextmanager
    def _evaluating(self):
        """Sample in eval mode, then give back the mode the model had, also after an error or Ctrl-C."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _check_scales(self, B, guidance_scale, classifier_grad, classifier_scale):
        """A guidance scale is a number or a tensor (B,); classifier guidance needs its gradient function."""
        for name, scale in (("guidance_scale", guidance_scale), ("classifier_scale", classifier_scale)):
            if torch.is_tensor(scale) and scale.ndim > 0 and tuple(scale.shape) != (B,):
                raise ValueError(f"{name} as a tensor must have shape ({B},), one scale per prompt; "
                                 f"got {tuple(scale.shape)}")
        if not scale_is(classifier_scale, 0) and classifier_grad is None:
            raise ValueError("classifier guidance (classifier_scale != 0) needs a classifier_grad(z_t, t), "
                             "e.g. classifier.make_classifier_grad(classifier, targets)")

    def _guided_eps(self, prompts, guidance_scale, classifier_grad, classifier_scale):
        """Steps 1–2 of every sampler here: the contexts, and the guided noise prediction ε̃(z_t, t)."""
        # 1. the prompts' contexts c, and the empty prompt's c_u when CFG needs it   LDM Eq. 3: c = τ_θ(y)
        cond = self.encode_text(prompts)
        uncond = self.encode_text([""] * len(prompts)) if not scale_is(guidance_scale, 1) else None
        # 2. the guided noise prediction ε̃(z_t, t)
        self.attention_weights = {}
        return make_guided_eps(self._unet_output_by_pass(cond), self.schedule, cond, uncond, guidance_scale,
                               classifier_grad, classifier_scale, self.diffusion_cfg.prediction)

    def _unet_output_by_pass(self, cond):
        """unet_output, keeping CFG's two passes apart: when the U-Net keeps its cross-attention weights
        (UNet.keep_attention_weights(True)), each call files them in self.attention_weights["cond"] (the
        prompts' pass, context `cond`) or ["uncond"] (the empty prompt's pass), so a sampler's callback sees
        both passes of its step. (Each layer's own .weights holds only the last call: under CFG the c_u one.)"""
        def unet_output(z_t, t, c):
            out = self.unet_output(z_t, t, c)
            kept = self.unet.kept_attention_weights()
            if kept:
                self.attention_weights["cond" if c is cond else "uncond"] = kept
            return out
        return unet_output

    # -- editing: image-to-image and inpainting with the same trained model ----------------------

    @torch.no_grad()
    def img2img(self, images, prompts, strength=0.6, steps=50, guidance_scale=3.0, eta=0.0, generator=None,
                noise=None, classifier_grad=None, classifier_scale=0.0, progress=False, callback=None,
                return_latents=False):
        """SDEdit (Meng et al. 2022) in latent space: images (B, 3, H, W) in [-1, 1] and prompts -> edited images.

        1. z0 = E(x), the posterior mean, as diffusion latents (encode_images)
        2. the DDIM timesteps τ ≤ t0 = round(s·T) − 1 (sdedit_timesteps: strength s ∈ (0, 1] on the grid of
           ddim_timesteps(T, steps)); they start at τ_0
        3. z_{τ_0} = q_sample(z0, τ_0, ε), ε = `noise` or a draw from `generator` (DDPM Eq. 4). At s = 1 the
           image is forgotten: z_{T−1} = ε, generate's convention that N(0, I) is the noisiest step, so that
           img2img(s = 1, noise = x_T) is generate(x_T = x_T)
        4. DDIM along the τ with guidance, as generate; 5. decode.
        Small s keeps the layout and most of the image, large s keeps little. The other arguments as generate;
        callback(i, t, z_t, x̂0) sees step i of the τ.
        """
        prompts = self._check_edit_inputs(images, prompts, noise, guidance_scale, classifier_grad, classifier_scale)
        timesteps = sdedit_timesteps(self.schedule.T, steps, strength)     # τ_0 > … > τ_n, all ≤ t0
        with self._evaluating():
            z0 = self.encode_images(images.to(self.device), sample=False).float()  # (B, z, h, w)
            eps = _initial_noise(self.schedule, z0.shape, generator, self._on_device(noise))  # ε (B, z, h, w)
            t_start = timesteps[0]
            # DDPM Eq. 4: z_{τ_0} = √ᾱ·z0 + √(1−ᾱ)·ε; at τ_0 = T−1, z_T = ε (the sampler's convention)
            z_t = eps if t_start == self.schedule.T - 1 else self.schedule.q_sample(z0, t_start, eps)
            eps_fn = self._guided_eps(prompts, guidance_scale, classifier_grad, classifier_scale)
            z0_edit = self._ddim_along(eps_fn, z_t, timesteps, eta, generator, progress, callback)
        images = self.decode_latents(z0_edit)
        return (images, z0_edit) if return_latents else images

    @torch.no_grad()
    def inpaint(self, images, masks, prompts, steps=50, guidance_scale=3.0, eta=0.0, generator=None, noise=None,
                resample=1, classifier_grad=None, classifier_scale=0.0, progress=False, callback=None,
                return_latents=False):
        """Inpainting without retraining (RePaint, Lugmayr et al. 2022, its simple form in latent space, DDIM).

        images (B, 3, H, W) in [-1, 1]; masks (B, 1, H, W) or (B, H, W), 1 (True) where the prompt repaints
        and 0 where the image is kept. Returns images (B, 3, H, W).
        1. z0 = E(x), the posterior mean; m = the mask on the latent grid (latent_mask: a latent cell is
           repainted when any pixel of its f×f patch is)
        2. z_T = ε, `noise` or a draw from `generator`, as generate
        3. at each DDIM step t, before the U-Net runs, the known region is replaced by the original noised to
           that step's level along the same ε:  z_t ← m·z_t + (1−m)·q_sample(z0, t, ε)   (RePaint Eq. 8; DDPM
           Eq. 4); after the last step, by z0 itself. One ε for all steps, as DDIM with η = 0 noises a latent
           along one ε (RePaint, on DDPM, draws afresh each step)
        4. resample = U > 1: RePaint's resampling (Sec. 4.2, jump length one DDIM step): each step runs U
           times, going back up between runs with q(z_t | z_{t_prev}) so the two regions can harmonise
        5. decode.
        Limits: an empty mask returns z0 exactly (the autoencoder's reconstruction of the images); a full mask
        is text-to-image, generate with x_T = ε. callback(i, t, z_t, x̂0) sees each U-Net call's z_t.
        """
        prompts = self._check_edit_inputs(images, prompts, noise, guidance_scale, classifier_grad, classifier_scale)
        self._check_masks(masks, images.shape[0])
        if not isinstance(resample, int) or isinstance(resample, bool) or resample < 1:
            raise ValueError(f"resample must be an integer >= 1 (1 = no resampling), got {resample!r}")
        timesteps = ddim_timesteps(self.schedule.T, steps)
        with self._evaluating():
            z0 = self.encode_images(images.to(self.device), sample=False).float()  # (B, z, h, w)
            repaint = self.latent_mask(masks.to(self.device))               # (B, 1, h, w) bool
            eps = _initial_noise(self.schedule, z0.shape, generator, self._on_device(noise))  # ε = z_T (B, z, h, w)

            def keep_known(z_t, t):  # RePaint Eq. 8: z = m ⊙ z_unknown + (1 − m) ⊙ z_known (our m: repaint)
                z_known = z0 if t < 0 else self.schedule.q_sample(z0, t, eps)  # DDPM Eq. 4 at step t
                return torch.where(repaint, z_t, z_known)

            eps_fn = self._guided_eps(prompts, guidance_scale, classifier_grad, classifier_scale)
            z0_edit = self._ddim_along(eps_fn, eps, timesteps, eta, generator, progress, callback, keep_known,
                                       resample)
        images = self.decode_latents(z0_edit)
        return (images, z0_edit) if return_latents else images

    def latent_mask(self, masks):
        """Pixel masks (B, 1, H, W) or (B, H, W), 1 = repaint -> latent masks (B, 1, h, w) bool: a latent cell
        is repainted when any pixel of its f×f patch is (max pooling), so the repainted latents cover the mask."""
        masks = masks.float().view(masks.shape[0], 1, *masks.shape[-2:])    # (B, 1, H, W)
        f = self.autoencoder_cfg.downsample_factor
        return F.max_pool2d(masks, kernel_size=f) > 0                       # (B, 1, H/f, W/f)

    def _ddim_along(self, eps_fn, z_t, timesteps, eta, generator, progress, callback, keep_known=None,
                    resample=1):
        """DDIM from z_t at timesteps[0] down `timesteps` (descending code steps; t_prev = −1 after the last) ->
        z0. keep_known(z_t, t), if given, runs before every U-Net call and once more at t = −1 (inpainting);
        resample U runs each step U times (RePaint Algorithm 1, lines 3–10)."""
        schedule = self.schedule
        for i, t in enumerate(_progress(timesteps, progress)):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1     # −1: the last step lands on the data
            for u in range(resample):
                if keep_known is not None:
                    z_t = keep_known(z_t, t)                                 # RePaint Eq. 8
                # 1. the guided noise prediction, and the caller's look at z_t and its x̂0
                eps = eps_fn(z_t, t)
                if callback is not None:
                    callback(i, t, z_t, schedule.predict_x0(z_t, t, eps))   # DDPM Eq. 15
                # 2. one DDIM step z_t → z_{t_prev}
                z_prev = schedule.ddim_step(z_t, t, t_prev, eps, eta=eta, generator=generator)  # DDIM Eq. 12
                # 3. RePaint's resampling: back up to t, z_t ~ q(z_t | z_{t_prev}), and run the step again
                if u + 1 < resample:
                    z_t = self._noise_up(z_prev, t_prev, t, generator)
            z_t = z_prev
        return z_t if keep_known is None else keep_known(z_t, -1)

    def _noise_up(self, z_prev, t_prev, t, generator):
        """A sample of q(z_t | z_{t_prev}) = N(√(ᾱ_t/ᾱ_{t_prev})·z_{t_prev}, (1 − ᾱ_t/ᾱ_{t_prev})·I): DDPM Eq. 2
        over the steps t_prev+1 … t (RePaint Algorithm 1, line 10); t_prev = −1 is the data, ᾱ_{−1} = 1."""
        ratio = (self.schedule.alpha_bars[t] / self.schedule.alpha_bars_prev[t_prev + 1]).item()  # ᾱ_t/ᾱ_{t_prev}
        fresh = torch.randn(z_prev.shape, generator=generator, device=z_prev.device, dtype=z_prev.dtype)
        return math.sqrt(ratio) * z_prev + math.sqrt(1 - ratio) * fresh    # DDPM Eq. 2, composed

    def _on_device(self, x):
        """A caller's tensor (a fixed x_T or ε) on the model's device; None stays None (then it is drawn)."""
        return None if x is None else x.to(self.device)

    def _check_edit_inputs(self, images, prompts, noise, guidance_scale, classifier_grad, classifier_scale):
        """One-line ValueErrors for the inputs of img2img and inpaint; returns the prompts as a list of B."""
        S = self.image_size
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, {S}, {S}) in [-1, 1]; got {got}")
        B = images.shape[0]
        if tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"images must be (B, 3, {S}, {S}), the size this model works at; got "
                             f"{tuple(images.shape)}")
        if not bool(torch.isfinite(images).all()) or images.abs().max() > 1 + 1e-3:
            raise ValueError("images must be finite and in [-1, 1] (data.to_float turns uint8 images into that)")
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for {B} images; give one per image, or one string")
        if noise is not None and tuple(noise.shape) != (B, *self.latent_shape):
            raise ValueError(f"noise must have the latents' shape {(B, *self.latent_shape)}; got {tuple(noise.shape)}")
        self._check_scales(B, guidance_scale, classifier_grad, classifier_scale)
        return prompts

    def _check_masks(self, masks, B):
        """Masks are (B, 1, H, W) or (B, H, W) at the model's size, and binary: 0 keep, 1 repaint."""
        S = self.image_size
        if not torch.is_tensor(masks) or tuple(masks.shape) not in ((B, 1, S, S), (B, S, S)):
            got = tuple(masks.shape) if torch.is_tensor(masks) else type(masks).__name__
            raise ValueError(f"masks must be ({B}, 1, {S}, {S}) or ({B}, {S}, {S}), one per image at the model's "
                             f"size; got {got}")
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be binary: 1 (True) where the prompt repaints, 0 where the image is kept")

    # -- run folder ----------------------------------------------------------------------------

    def config(self):
        return {"text_encoder": asdict(self.text_cfg), "autoencoder": asdict(self.autoencoder_cfg),
                "unet": asdict(self.unet_cfg), "diffusion": asdict(self.diffusion_cfg),
                "scale_factor": self.scale_factor, "latent_shift": self.latent_shift,
                "image_size": self.image_size}

    def save(self, run_dir):
        """Write model.json, tokenizer.json and model.pt into run_dir, each atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "model.json", lambda p: p.write_text(json.dumps(self.config(), indent=2)))
        write_atomic(run_dir / "tokenizer.json", lambda p: self.tokenizer.save(str(p)))
        state = {"text_encoder": self.text_encoder.state_dict(), "autoencoder": self.autoencoder.state_dict(),
                 "unet": self.unet.state_dict()}
        write_atomic(run_dir / "model.pt", lambda p: torch.save(state, p))

    @classmethod
    def load(cls, run_dir, map_location="cpu"):
        """Rebuild a saved model from its run folder (configs from JSON, weights_only load).

        Only the four components are read: entries of model.json and model.pt that are not theirs
        (run folders saved before the classifier had its own files keep it there) are left alone.
        A missing file is a FileNotFoundError; a broken one (not JSON, a key too many or too few,
        truncated weights, shapes that do not match the config) a RunFolderError naming the file."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        missing = [n for n in ("model.json", "tokenizer.json", "model.pt") if not (run_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"run folder {run_dir} is incomplete: missing {', '.join(missing)} "
                                    "(was training interrupted before the end? `train_small.py --resume`)")
        model_json = run_dir / "model.json"
        cfg = read_json(model_json)
        configs = {key: config_from_json(kind, cfg, key, model_json) for key, kind in (
            ("text_encoder", TextEncoderConfig), ("autoencoder", AutoencoderConfig), ("unet", UNetConfig),
            ("diffusion", DiffusionConfig))}
        unknown = sorted(set(cfg) - set(configs) - {"image_size", "scale_factor", "latent_shift", "classifier"})
        if unknown:  # "classifier": run folders saved before the classifier had its own files
            raise RunFolderError(f"{model_json}: unknown key(s) {', '.join(unknown)}")
        if type(cfg.get("image_size")) not in (int, float):
            raise RunFolderError(f"{model_json}: 'image_size' must be a number, got {cfg.get('image_size', 'nothing')!r}")
        cfg.setdefault("latent_shift", 0.0)  # run folders saved before latents were shifted
        for key in ("scale_factor", "latent_shift"):
            value = cfg.get(key)
            if not (type(value) in (int, float) or (type(value) is list and value
                                                    and all(type(v) in (int, float) for v in value))):
                raise RunFolderError(f"{model_json}: {key!r} must be a number or a list of numbers, "
                                     f"got {cfg.get(key, 'nothing')!r}")
        try:
            tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        except ValueError as e:
            raise RunFolderError(str(e)) from None
        if tokenizer.get_vocab_size() > configs["text_encoder"].vocab_size:
            raise RunFolderError(f"{run_dir / 'tokenizer.json'}: {tokenizer.get_vocab_size()} words, more than the "
                                 f"text encoder's vocab_size {configs['text_encoder'].vocab_size} in model.json: "
                                 "the two files come from different runs")
        try:
            model = cls(tokenizer, *configs.values(), cfg["image_size"], cfg["scale_factor"], cfg["latent_shift"])
        except (ValueError, TypeError) as e:  # the configs' own checks, e.g. a U-Net width it cannot build
            raise RunFolderError(f"{model_json}: {e}") from None
        state = load_weights(run_dir / "model.pt", map_location)
        for name in ("text_encoder", "autoencoder", "unet"):
            load_state_into(getattr(model, name), state, name, run_dir / "model.pt")
        return model.eval()


def latent_constant(value, channels, name, positive=False):
    """A latent shift or scale as stored: a float, or a list of `channels` floats (each > 0 if `positive`);
    ValueError otherwise."""
    per_channel = isinstance(value, (list, tuple))
    if per_channel and len(value) != channels:
        raise ValueError(f"{name} has {len(value)} entries, the autoencoder has {channels} latent channels")
    values = [float(v) for v in value] if per_channel else [float(value)]
    if not all(map(math.isfinite, values)):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and min(values) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return values if per_channel else values[0]


class RunFolderError(ValueError):
    """A file of a run folder that cannot be read: the message names the file and what is wrong with it."""


def read_json(path):
    """The JSON object in `path`, or a RunFolderError that says how the file is broken."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.strip():
            raise RunFolderError(f"{path}: empty file; the run's settings are lost, retrain or restore it")
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def config_from_json(kind, entries, key, path):
    """The dataclass `kind` from entries[key] of the JSON file `path`. A key the dataclass does not have
    is an error naming the file (ignored, it would hide a mismatched run); a field it lacks takes its
    default, so that run folders saved before that field existed still load."""
    values = entries.get(key)
    if not isinstance(values, dict):
        raise RunFolderError(f"{path}: no {key!r} entry (expected an object of {kind.__name__} fields)")
    known = [f.name for f in fields(kind)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise RunFolderError(f"{path}: {key!r} has unknown key(s) {', '.join(unknown)} "
                             f"(it accepts {', '.join(known)})")
    try:
        return kind(**values)
    except (TypeError, ValueError) as e:
        raise RunFolderError(f"{path}: {key!r}: {e}") from None


def load_weights(path, map_location="cpu"):
    """The dict of state dicts saved in `path` (weights_only), or a RunFolderError when it is truncated,
    empty or not a weights file."""
    if Path(path).stat().st_size == 0:
        raise RunFolderError(f"{path}: empty file (0 bytes); the run's weights are lost, retrain or restore it")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors all mean: not a readable weights file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunFolderError(f"{path}: not a readable weights file, truncated or corrupt ({first[:200]})") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path}: expected a dict of state dicts, got {type(state).__name__}")
    return state


def load_state_into(module, state, name, path):
    """Load state[name] into module; a missing entry or one whose shapes differ from the config is an
    error naming the file (torch's own message lists every tensor over many lines)."""
    if not isinstance(state.get(name), dict):
        raise RunFolderError(f"{path}: no {name!r} weights")
    own = module.state_dict()
    for key, value in state[name].items():
        if key in own and (not torch.is_tensor(value) or value.shape != own[key].shape):
            got = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise RunFolderError(f"{path}: {name}.{key} is {got}, but the config beside it builds "
                                 f"{tuple(own[key].shape)}: the weights and the .json come from different runs")
    result = module.load_state_dict(state[name], strict=False)
    if result.missing_keys or result.unexpected_keys:
        problems = [f"missing {', '.join(result.missing_keys[:3])}" if result.missing_keys else "",
                    f"unexpected {', '.join(result.unexpected_keys[:3])}" if result.unexpected_keys else ""]
        raise RunFolderError(f"{path}: {name} weights do not match the config in the same folder "
                             f"({'; '.join(p for p in problems if p)})")


def write_atomic(path, write):
    """Write through a temporary file in the same folder, then rename: a crash mid-write leaves the
    old file intact (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a read-only folder, Ctrl-C: leave no half-written temporary file
        tmp.unlink(missing_ok=True)
        raise
