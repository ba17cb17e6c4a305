"""DiffusionTask: a diffusers model + noise scheduler -> the per-sample objective at events.

docs/design.md section 1: at an event ``e = (t, eps)`` the noisy input is
``x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) eps`` and the objective is

* ``loss``:   ``mean_pixels (eps_theta(x_t, t, c) - target)^2`` (target from ``prediction_type``),
* ``l1``:     ``mean_pixels |eps_theta(x_t, t, c) - target|`` (the paper's official code),
* ``sqnorm``: ``mean_pixels eps_theta(x_t, t, c)^2`` (D-TRAK's measurement).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from retrac.errors import ConfigError, DataError

OBJECTIVES = ("loss", "l1", "sqnorm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_DEVICE = "cpu"  # torch device of the gradients unless one is given
PIXEL_TOLERANCE = 1e-3  # images must lie in [-1 - tol, 1 + tol]


class DiffusionTask:
    """A diffusion model, its noise scheduler, and which parameters and objective count.

    Args:
        model: a diffusers ``UNet2DModel`` (unconditional, or class-conditional through
            ``num_class_embeds`` / ``class_embed_type``). It is put in eval mode.
        scheduler: a diffusers noise scheduler with ``add_noise``, ``alphas_cumprod`` and
            ``config.num_train_timesteps`` / ``config.prediction_type`` (e.g. ``DDPMScheduler``).
        objective: ``"loss"`` (MSE to the prediction target), ``"l1"`` or ``"sqnorm"``.
        include: ``fnmatch`` patterns of parameter names that count (default: all).
        exclude: ``fnmatch`` patterns of parameter names removed after ``include``.

    Raises:
        ConfigError: unknown objective or prediction type, or patterns that select nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        objective: str = "loss",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
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
        return (
            f"{type(self.model).__name__}: {self.num_parameters:,} of {total:,} parameters count "
            f"({len(self.parameter_names)} tensors), objective={self.objective}, "
            f"prediction_type={self.prediction_type}, T={self.num_train_timesteps}"
        )

    def to_dict(self) -> dict:
        """What the store records about the task (and compares on reopening)."""
        return {
            "model_class": type(self.model).__name__,
            "objective": self.objective,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "include": self.include,
            "exclude": self.exclude,
            "num_parameters": self.num_parameters,
        }

    # ------------------------------------------------------------------ model facts
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the model takes."""
        cfg = self.model.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(cfg.in_channels), int(h), int(w)

    @property
    def is_class_conditional(self) -> bool:
        cfg = self.model.config
        return (
            getattr(cfg, "num_class_embeds", None) is not None
            or getattr(cfg, "class_embed_type", None) is not None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ validation
    def check_images(self, images: Tensor, name: str = "images") -> None:
        """Raise ``DataError`` unless ``images`` is a finite ``(B, C, H, W)`` batch in ``[-1, 1]`` that fits."""
        if not isinstance(images, Tensor):
            raise DataError(
                f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}."
            )
        if images.ndim != 4 or tuple(images.shape[1:]) != self.sample_shape:
            raise DataError(
                f"{name} has shape {tuple(images.shape)}, but the model takes (B, {', '.join(map(str, self.sample_shape))}); "
                "resize the images or use a model with matching sample_size / in_channels."
            )
        if images.shape[0] == 0:
            raise DataError(f"{name} is empty; give at least one image.")
        if not torch.isfinite(images).all():
            bad = int((~torch.isfinite(images)).flatten(1).any(1).nonzero()[0])
            raise DataError(f"{name}[{bad}] contains NaN or infinite pixels; clean or drop that image.")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1 - PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
            raise DataError(
                f"{name} has pixels in [{lo:.3g}, {hi:.3g}], outside [-1, 1]; "
                "scale them as diffusers does (x / 127.5 - 1 for uint8)."
            )

    def conditioning(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """The ``class_labels`` to pass the model: ``None`` for an unconditional model."""
        if not self.is_class_conditional:
            return None
        if labels is None:
            raise DataError("the model is class-conditional; give class labels with the images.")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != batch:
            raise DataError(
                f"got {labels.shape[0]} class labels for {batch} images; give one label per image."
            )
        num = getattr(self.model.config, "num_class_embeds", None)
        if num is not None and (labels.min() < 0 or labels.max() >= num):
            raise DataError(
                f"class labels must lie in [0, {num}); got [{int(labels.min())}, {int(labels.max())}]."
            )
        return labels

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
        """Per-sample objective ``(B,)`` from the model output and target, both ``(B, C, H, W)``."""
        dims = tuple(range(1, output.ndim))
        if self.objective == "sqnorm":
            return output.pow(2).mean(dim=dims)  # D-TRAK: mean_pixels eps_theta^2
        if self.objective == "l1":
            return (output - target).abs().mean(dim=dims)
        return (output - target).pow(2).mean(dim=dims)

    def model_output(self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``eps_theta(x_t, t, c)`` as a tensor ``(B, C, H, W)``."""
        return self.model(x_t, timesteps, class_labels=class_labels).sample

    def per_sample_objective(
        self,
        images: Tensor,
        timesteps: Tensor,
        noise: Tensor,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """The per-sample objective ``(B,)`` at events ``(t_i, eps_i)``, one event per row.

        Args:
            images: ``(B, C, H, W)`` in ``[-1, 1]``.
            timesteps: ``(B,)`` integers in ``[0, T)``.
            noise: ``(B, C, H, W)``.
            class_labels: ``(B,)`` labels; required for a class-conditional model, ignored otherwise.
        """
        self.check_images(images)
        timesteps = torch.as_tensor(timesteps, device=images.device).long().reshape(-1)
        self.check_timesteps(timesteps)
        if timesteps.shape[0] != images.shape[0] or noise.shape != images.shape:
            raise DataError(
                f"got {images.shape[0]} images, {timesteps.shape[0]} timesteps and noise {tuple(noise.shape)}; "
                "give one timestep and one noise tensor per image."
            )
        labels = self.conditioning(class_labels, images.shape[0])
        x_t, target = self.noisy_inputs(images, timesteps, noise)
        return self.objective_from_output(self.model_output(x_t, timesteps, labels), target)
