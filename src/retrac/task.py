"""DiffusionTask: a diffusers model + noise scheduler -> the per-sample objective at events.

docs/design.md section 1: at an event ``e = (t, eps)`` the noisy input is
``x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps`` and the objective is

* ``loss``:   ``mean_pixels (eps_theta(x_t, t, c) - target)^2`` (target from ``prediction_type``),
* ``l1``:     ``mean_pixels |eps_theta(x_t, t, c) - target|`` (the paper's official code),
* ``sqnorm``: ``mean_pixels eps_theta(x_t, t, c)^2`` (D-TRAK's measurement).

The denoiser may be any class :mod:`retrac.denoisers` supports (``UNet2DModel``,
``UNet2DConditionModel``, DiT-style transformers); ``c`` is nothing, class labels or the text
encoder's ``encoder_hidden_states``. A latent model brings its VAE (:class:`~retrac.latents.LatentEncoder`):
``x`` is then the scaled latent of the image and "pixels" above are latent entries. A text model
brings its text encoder and tokenizer (:class:`~retrac.text.PromptEncoder`). Both are frozen: only
denoiser parameters count.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from retrac.denoisers import describe_denoiser
from retrac.errors import ConfigError, DataError
from retrac.latents import LatentEncoder
from retrac.text import PromptEncoder

OBJECTIVES = ("loss", "l1", "sqnorm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_DEVICE = "cpu"  # torch device of the gradients unless one is given
PIXEL_TOLERANCE = 1e-3  # images must lie in [-1 - tol, 1 + tol]


class DiffusionTask:
    """A diffusion model, its noise scheduler, and which parameters and objective count.

    Args:
        model: the denoiser: a diffusers ``UNet2DModel`` (unconditional, or class-conditional
            through ``num_class_embeds`` / ``class_embed_type``), ``UNet2DConditionModel``
            (text), ``DiTTransformer2DModel`` (class) or patched ``Transformer2DModel`` (class or
            text); see :mod:`retrac.denoisers`. It is put in eval mode. Parameters with
            ``requires_grad=False`` never count (a base model under LoRA adapters).
        scheduler: a diffusers noise scheduler with ``add_noise``, ``alphas_cumprod`` and
            ``config.num_train_timesteps`` / ``config.prediction_type`` (e.g. ``DDPMScheduler``).
        objective: ``"loss"`` (MSE to the prediction target), ``"l1"`` or ``"sqnorm"``.
        include: ``fnmatch`` patterns of parameter names that count (default: all).
        exclude: ``fnmatch`` patterns of parameter names removed after ``include``.
        vae: for a latent model, an ``AutoencoderKL`` or a :class:`~retrac.latents.LatentEncoder`.
        text_encoder: for a text model, a ``CLIPTextModel`` (with ``tokenizer``) or a
            :class:`~retrac.text.PromptEncoder`.
        tokenizer: the text encoder's tokenizer (when ``text_encoder`` is a model).

    Raises:
        ConfigError: unknown objective or prediction type, patterns that select nothing, an
            unsupported denoiser, a VAE whose latents do not fit the denoiser, a text encoder on a
            model that takes no text or of another width than its cross-attention.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        objective: str = "loss",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        vae: nn.Module | LatentEncoder | None = None,
        text_encoder: nn.Module | PromptEncoder | None = None,
        tokenizer=None,
    ) -> None:
        self.spec = describe_denoiser(model)  # a ConfigError naming what is supported, not a TypeError
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective={objective!r} is unknown; choose one of {', '.join(OBJECTIVES)}.")
        prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"scheduler prediction_type={prediction_type!r} is not supported; "
                f"use a scheduler configured with one of {', '.join(PREDICTION_TYPES)}."
            )
        self.model = model.eval()
        self.scheduler = scheduler
        self.objective = objective
        self.prediction_type = prediction_type
        self.include = list(include) if include else ["*"]
        self.exclude = list(exclude) if exclude else []
        self.parameter_names = self._select_parameter_names()
        self.latent_encoder = self._latent_encoder(vae)
        self.prompt_encoder = self._prompt_encoder(text_encoder, tokenizer)
        self.lora: dict | None = None  # the base model of LoRA adapters (set by retrac.pipeline)

    def _latent_encoder(self, vae) -> LatentEncoder | None:
        if vae is None:
            return None
        encoder = vae if isinstance(vae, LatentEncoder) else LatentEncoder(vae)
        if encoder.latent_channels != self.sample_shape[0]:
            raise ConfigError(
                f"the VAE gives {encoder.latent_channels}-channel latents but the denoiser takes "
                f"{self.sample_shape[0]} channels; give the VAE the model was trained with (--vae)."
            )
        return encoder

    def _prompt_encoder(self, text_encoder, tokenizer) -> PromptEncoder | None:
        if text_encoder is None:
            return None
        if self.conditioning_kind != "text":
            raise ConfigError(
                f"a text encoder was given, but the {self.spec.model_class} takes "
                f"{'class labels' if self.conditioning_kind == 'class' else 'no conditioning'}, not text; "
                "leave out --text-encoder."
            )
        if isinstance(text_encoder, PromptEncoder):
            encoder = text_encoder
        else:
            if tokenizer is None:
                raise ConfigError("a text encoder needs its tokenizer; pass tokenizer= as well.")
            encoder = PromptEncoder(text_encoder, tokenizer)
        if encoder.hidden_size != self.spec.context_dim:
            raise ConfigError(
                f"the text encoder gives states of width {encoder.hidden_size} but the denoiser's cross-attention "
                f"takes {self.spec.context_dim}; give the text encoder the model was trained with (--text-encoder)."
            )
        return encoder

    # ------------------------------------------------------------------ parameters
    def _select_parameter_names(self) -> list[str]:
        names = []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
                continue
            names.append(name)
        if not names:
            raise ConfigError(
                f"include={self.include} / exclude={self.exclude} select no trainable parameter; "
                "widen include or narrow exclude (patterns are fnmatch on names such as 'down_blocks.0.*')."
            )
        return names

    def selected_parameters(self) -> dict[str, Tensor]:
        """The parameters that count, by name, in the model's parameter order."""
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self.parameter_names}

    @property
    def num_parameters(self) -> int:
        """Number of scalar parameters that count (the gradient dimension ``P``)."""
        return sum(p.numel() for p in self.selected_parameters().values())

    def describe(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        extras = "".join(
            [
                f", conditioning={self.conditioning_kind}" if self.conditioning_kind != "none" else "",
                ", latent (VAE)" if self.is_latent else "",
            ]
        )
        return (
            f"{type(self.model).__name__}: {self.num_parameters:,} of {total:,} parameters count "
            f"({len(self.parameter_names)} tensors), objective={self.objective}, "
            f"prediction_type={self.prediction_type}, T={self.num_train_timesteps}{extras}"
        )

    def to_dict(self) -> dict:
        """What the store records about the task (and compares on reopening).

        ``conditioning``, ``vae``, ``text_encoder`` and ``lora`` (the base model under LoRA adapters)
        appear only for models that have them, so a pixel-space ``UNet2DModel`` task records what it
        always did.
        """
        record = {
            "model_class": type(self.model).__name__,
            "objective": self.objective,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "include": self.include,
            "exclude": self.exclude,
            "num_parameters": self.num_parameters,
        }
        if self.conditioning_kind == "text":
            record["conditioning"] = "text"
        if self.latent_encoder is not None:
            record["vae"] = self.latent_encoder.to_dict()
        if self.prompt_encoder is not None:
            record["text_encoder"] = self.prompt_encoder.to_dict()
        if self.lora is not None:
            record["lora"] = self.lora
        return record

    # ------------------------------------------------------------------ model facts
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the denoiser's input ``x_t`` (latents for a latent model)."""
        return self.spec.sample_shape

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the task takes (the VAE's input for a latent model)."""
        if self.latent_encoder is None:
            return self.sample_shape
        return self.latent_encoder.image_shape(self.sample_shape)

    @property
    def conditioning_kind(self) -> str:
        """``"none"``, ``"class"`` or ``"text"`` (see :mod:`retrac.denoisers`)."""
        return self.spec.conditioning

    @property
    def is_class_conditional(self) -> bool:
        return self.spec.conditioning == "class"

    @property
    def is_text_conditional(self) -> bool:
        return self.spec.conditioning == "text"

    @property
    def is_latent(self) -> bool:
        """Whether the denoiser works on VAE latents (the task has a VAE)."""
        return self.latent_encoder is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ validation
    def check_images(self, images: Tensor, name: str = "images") -> None:
        """Raise ``DataError`` unless ``images`` is a finite ``(B, C, H, W)`` batch in ``[-1, 1]`` that fits.

        The shape is :attr:`image_shape`: the denoiser's input, or the VAE's for a latent model.
        """
        self._check_batch(images, name, self.image_shape, "the VAE" if self.is_latent else "the model")
        self._check_range(images, name)

    def check_samples(self, samples: Tensor, name: str = "samples") -> None:
        """Raise ``DataError`` unless ``samples`` is a finite batch of the denoiser's inputs ``x``.

        Pixels in ``[-1, 1]`` for a pixel model; scaled latents (any finite value) for a latent model.
        """
        if not self.is_latent:
            self.check_images(samples, name)
            return
        self._check_batch(samples, name, self.sample_shape, "the denoiser (latents)")

    def _check_batch(self, images: Tensor, name: str, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(images, Tensor):
            raise DataError(
                f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}."
            )
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise DataError(
                f"{name} has shape {tuple(images.shape)}, but {what} takes (B, {', '.join(map(str, shape))}); "
                "resize the images or use a model with matching sample_size / in_channels."
            )
        if images.shape[0] == 0:
            raise DataError(f"{name} is empty; give at least one image.")
        if not torch.isfinite(images).all():
            bad = int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0])
            what = "latent values" if what.endswith("(latents)") else "pixels"
            raise DataError(f"{name}[{bad}] contains NaN or infinite {what}; clean or drop that image.")

    def _check_range(self, images: Tensor, name: str) -> None:
        lo, hi = float(images.min()), float(images.max())
        if lo < -1 - PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
            raise DataError(
                f"{name} has pixels in [{lo:.3g}, {hi:.3g}], outside [-1, 1]; "
                "scale them as diffusers does (x / 127.5 - 1 for uint8)."
            )

    def conditioning(self, conditioning: Tensor | None, batch: int) -> Tensor | None:
        """The checked conditioning ``c`` to pass the model, one row per sample.

        Args:
            conditioning: ``(B,)`` class labels for a class-conditional model, ``(B, L, D)``
                ``encoder_hidden_states`` for a text model (see :meth:`encode_prompts`); ignored by
                an unconditional model.
            batch: ``B``.

        Returns:
            ``None`` for an unconditional model, else ``conditioning`` as int64 labels or float states.
        """
        if self.conditioning_kind == "none":
            return None
        if self.conditioning_kind == "text":
            return self._check_states(conditioning, batch)
        labels = conditioning
        if labels is None:
            raise DataError("the model is class-conditional; give class labels with the images.")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != batch:
            raise DataError(
                f"got {labels.shape[0]} class labels for {batch} images; give one label per image."
            )
        num = self.spec.num_classes
        if num is not None and (labels.min() < 0 or labels.max() >= num):
            raise DataError(
                f"class labels must lie in [0, {num}); got [{int(labels.min())}, {int(labels.max())}]."
            )
        return labels

    def _check_states(self, states: Tensor | None, batch: int) -> Tensor:
        if states is None:
            raise DataError(
                f"the {self.spec.model_class} is text-conditioned; give captions (metadata.jsonl 'text', an .npz "
                "'captions' array) or prompts, or encoder_hidden_states."
            )
        if not isinstance(states, Tensor) or not states.dtype.is_floating_point:
            raise DataError(
                "encoder_hidden_states must be a float tensor (B, L, D); encode prompts with task.encode_prompts."
            )
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != self.spec.context_dim:
            raise DataError(
                f"encoder_hidden_states have shape {tuple(states.shape)}, the model takes ({batch}, L, "
                f"{self.spec.context_dim}): one row of states per image, width cross_attention_dim."
            )
        if not torch.isfinite(states).all():
            raise DataError("encoder_hidden_states hold NaN or infinite values; check the text encoder.")
        return states

    # ------------------------------------------------------------------ encoders (frozen)
    def encode_images(self, images: Tensor, name: str = "images") -> Tensor:
        """Checked pixels ``(B, C, H, W)`` -> the denoiser's clean samples ``x`` (the distribution mean of
        the VAE's latents, scaled, for a latent model; the pixels themselves otherwise), on the CPU."""
        self.check_images(images, name)
        if self.latent_encoder is None:
            return images
        return self.latent_encoder.to(self.device).encode(images, mode="mean")

    def encode_prompts(self, prompts: Sequence[str], name: str = "prompts") -> Tensor:
        """Prompts -> ``encoder_hidden_states`` ``(B, L, D)`` on the task's device.

        Raises:
            ConfigError: the model takes no text, or the task has no text encoder.
            DataError: a prompt that is not a string (a missing caption).
        """
        if not self.is_text_conditional:
            raise ConfigError(
                f"{name} were given, but the {self.spec.model_class} is not text-conditioned "
                f"({'it takes class labels' if self.is_class_conditional else 'it is unconditional'}); "
                "leave out --prompt / captions."
            )
        if self.prompt_encoder is None:
            raise ConfigError(
                f"the {self.spec.model_class} is text-conditioned but the task has no text encoder; give a "
                "pipeline folder with text_encoder/ and tokenizer/, or --text-encoder PATH."
            )
        return self.prompt_encoder.to(self.device).encode(prompts, name)

    def check_timesteps(self, timesteps: Tensor) -> None:
        if (
            timesteps.dtype.is_floating_point
            or timesteps.min() < 0
            or timesteps.max() >= self.num_train_timesteps
        ):
            raise DataError(
                f"timesteps must be integers in [0, {self.num_train_timesteps}); "
                f"got dtype {timesteps.dtype}, range [{timesteps.min()}, {timesteps.max()}]."
            )

    # ------------------------------------------------------------------ the objective
    def noisy_inputs(self, images: Tensor, timesteps: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``x_t`` and the prediction target for a batch of events (no parameters involved).

        Args:
            images: ``(B, C, H, W)`` clean samples ``x`` in ``[-1, 1]``.
            timesteps: ``(B,)`` integer timesteps ``t``.
            noise: ``(B, C, H, W)`` noise ``eps``.

        Returns:
            ``(x_t, target)``, both ``(B, C, H, W)``.
        """
        timesteps = timesteps.to(images.device)
        # x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps   (docs/design.md section 1)
        x_t = self.scheduler.add_noise(images, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(images, noise, timesteps)
        else:  # "sample"
            target = images
        return x_t, target

    def objective_from_output(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample objective ``(B,)`` from the model's prediction and target, both ``(B, C, H, W)``."""
        dims = tuple(range(1, output.ndim))
        if self.objective == "sqnorm":
            return output.pow(2).mean(dim=dims)  # D-TRAK: mean_pixels eps_theta^2
        if self.objective == "l1":
            return (output - target).abs().mean(dim=dims)
        return (output - target).pow(2).mean(dim=dims)

    def model_output(self, x_t: Tensor, timesteps: Tensor, conditioning: Tensor | None = None) -> Tensor:
        """``eps_theta(x_t, t, c)`` as a tensor ``(B, C, H, W)`` (the forward call of :mod:`retrac.denoisers`)."""
        args, kwargs = self.spec.inputs(x_t, timesteps, conditioning)
        return self.spec.prediction(self.model(*args, **kwargs))

    def per_sample_objective(
        self,
        images: Tensor,
        timesteps: Tensor,
        noise: Tensor,
        conditioning: Tensor | None = None,
    ) -> Tensor:
        """The per-sample objective ``(B,)`` at events ``(t_i, eps_i)``, one event per row.

        Args:
            images: ``(B, C, H, W)`` clean samples ``x``: pixels in ``[-1, 1]``, or scaled latents
                (:meth:`encode_images`) for a latent model.
            timesteps: ``(B,)`` integers in ``[0, T)``.
            noise: ``(B, C, H, W)``.
            conditioning: ``(B,)`` class labels or ``(B, L, D)`` encoder_hidden_states; required
                for a conditional model, ignored by an unconditional one.
        """
        self.check_samples(images, "images")
        timesteps = torch.as_tensor(timesteps, device=images.device).long().reshape(-1)
        self.check_timesteps(timesteps)
        if timesteps.shape[0] != images.shape[0] or noise.shape != images.shape:
            raise DataError(
                f"got {images.shape[0]} images, {timesteps.shape[0]} timesteps and noise {tuple(noise.shape)}; "
                "give one timestep and one noise tensor per image."
            )
        cond = self.conditioning(conditioning, images.shape[0])
        x_t, target = self.noisy_inputs(images, timesteps, noise)
        return self.objective_from_output(self.model_output(x_t, timesteps, cond), target)
