"""What each supported diffusers denoiser takes and returns: one forward call for every model class.

docs/design.md section 1 writes the model as ``eps_theta(x_t, t, c)``. The diffusers classes spell
that call differently; :class:`DenoiserSpec` hides the difference:

================================  ================================================  ===============
class                             call                                              ``c``
================================  ================================================  ===============
``UNet2DModel``                   ``model(x_t, t, class_labels=c)``                 none or class
``UNet2DConditionModel``          ``model(x_t, t, encoder_hidden_states=c)``        text
``DiTTransformer2DModel``         ``model(x_t, timestep=t, class_labels=c)``        class
``Transformer2DModel`` (patched)  ``model(x_t, timestep=t, class_labels=c)`` or     class or text
                                  ``encoder_hidden_states=c`` (PixArt-style
                                  ``ada_norm_single``: ``added_cond_kwargs`` empty)
================================  ================================================  ===============

``c`` is ``(B,)`` int64 class labels or ``(B, L, D)`` float ``encoder_hidden_states`` (the text
encoder's last hidden state). A transformer that learns its variance (``out_channels = 2 *
in_channels``, DiT's ``learn_sigma``) predicts ``[eps, v]``; the objective takes the first
``in_channels`` channels, as diffusers' ``DiTPipeline`` does when it samples (the variance term of
the hybrid training loss is not part of the attributed objective).

Anything else is refused with :class:`~retrac.errors.ConfigError` naming what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from retrac.errors import CheckpointError, ConfigError

__all__ = ["CONDITIONING_KINDS", "SUPPORTED_DENOISERS", "DenoiserSpec", "denoiser_class", "describe_denoiser"]

CONDITIONING_KINDS = ("none", "class", "text")
SUPPORTED_DENOISERS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")
SUPPORTED_HELP = (
    "retrac supports UNet2DModel (unconditional or class-conditional), UNet2DConditionModel "
    "(text-conditioned through encoder_hidden_states), DiTTransformer2DModel (class-conditional) and "
    "patched Transformer2DModel (class- or text-conditioned)"
)


@dataclass(frozen=True)
class DenoiserSpec:
    """How to call one denoiser and read its prediction.

    Attributes:
        model_class: the diffusers class name.
        conditioning: ``"none"``, ``"class"`` (``(B,)`` labels) or ``"text"`` (``(B, L, D)`` states).
        num_classes: labels lie in ``[0, num_classes)`` (``None``: not checked).
        context_dim: ``D`` of ``encoder_hidden_states`` for a text-conditioned model.
        sample_shape: ``(C, H, W)`` of ``x_t``.
        keyword_timestep: the timestep is passed as ``timestep=`` (transformers), not positionally.
        added_cond_kwargs: pass ``added_cond_kwargs={"resolution": None, "aspect_ratio": None}``
            (``ada_norm_single`` transformers without additional conditions).
    """

    model_class: str
    conditioning: str
    num_classes: int | None
    context_dim: int | None
    sample_shape: tuple[int, int, int]
    keyword_timestep: bool = False
    added_cond_kwargs: bool = False

    def inputs(self, x_t: Tensor, timesteps: Tensor, conditioning: Tensor | None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the forward call ``eps_theta(x_t, t, c)``.

        Args:
            x_t: ``(B, C, H, W)`` noisy samples.
            timesteps: ``(B,)`` int64 timesteps.
            conditioning: ``(B,)`` labels, ``(B, L, D)`` states, or ``None`` (unconditional).
        """
        kwargs: dict = {}
        if self.conditioning == "text":
            kwargs["encoder_hidden_states"] = conditioning
        elif self.conditioning == "class" or conditioning is not None:
            kwargs["class_labels"] = conditioning
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        if self.keyword_timestep:
            return (x_t,), {"timestep": timesteps, **kwargs}
        return (x_t, timesteps), kwargs

    def prediction(self, output) -> Tensor:
        """The model's prediction ``(B, C, H, W)`` from its output (learned-variance channels dropped)."""
        sample = output.sample if hasattr(output, "sample") else output[0]
        channels = self.sample_shape[0]
        return sample[:, :channels] if sample.shape[1] > channels else sample


def _sample_shape(config) -> tuple[int, int, int]:
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.in_channels), int(h), int(w)


def describe_denoiser(model: nn.Module) -> DenoiserSpec:
    """The :class:`DenoiserSpec` of a diffusers denoiser, or a ``ConfigError`` naming what is supported.

    Raises:
        ConfigError: a class or configuration retrac cannot call as ``eps_theta(x_t, t, c)``.
    """
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if name not in SUPPORTED_DENOISERS or cfg is None:
        raise ConfigError(f"{name} is not a supported denoiser; {SUPPORTED_HELP}.")
    if name == "UNet2DModel":
        classes = getattr(cfg, "num_class_embeds", None)
        conditional = classes is not None or getattr(cfg, "class_embed_type", None) is not None
        return DenoiserSpec(name, "class" if conditional else "none", classes, None, _sample_shape(cfg))
    if name == "UNet2DConditionModel":
        for key in ("addition_embed_type", "class_embed_type", "num_class_embeds"):
            if getattr(cfg, key, None) is not None:
                raise ConfigError(
                    f"UNet2DConditionModel with {key}={getattr(cfg, key)!r} needs conditioning beyond "
                    "encoder_hidden_states (SDXL's added text/time embeddings, class embeddings), which retrac "
                    f"does not compute; {SUPPORTED_HELP}."
                )
        context = cfg.cross_attention_dim
        context = context[0] if isinstance(context, (list, tuple)) else context
        return DenoiserSpec(name, "text", None, int(context), _sample_shape(cfg))
    if name == "DiTTransformer2DModel":
        return DenoiserSpec(
            name, "class", int(cfg.num_embeds_ada_norm), None, _sample_shape(cfg), keyword_timestep=True
        )
    # Transformer2DModel: only the patched, continuous-input form denoises images
    if getattr(cfg, "patch_size", None) is None or getattr(cfg, "in_channels", None) is None:
        raise ConfigError(
            "Transformer2DModel without patch_size (continuous or vector-quantised inputs) is not a "
            f"supported denoiser; {SUPPORTED_HELP}."
        )
    norm = cfg.norm_type
    if norm == "ada_norm_zero" and cfg.cross_attention_dim is None:
        return DenoiserSpec(
            name, "class", int(cfg.num_embeds_ada_norm), None, _sample_shape(cfg), keyword_timestep=True
        )
    if norm == "ada_norm_single" and cfg.cross_attention_dim is not None:
        if getattr(model, "use_additional_conditions", False):
            raise ConfigError(
                "Transformer2DModel with sample_size 128 takes resolution and aspect-ratio conditions "
                f"(PixArt-alpha 1024px), which retrac does not compute; {SUPPORTED_HELP}."
            )
        return DenoiserSpec(
            name,
            "text",
            None,
            int(cfg.cross_attention_dim),
            _sample_shape(cfg),
            keyword_timestep=True,
            added_cond_kwargs=True,
        )
    raise ConfigError(
        f"Transformer2DModel with norm_type={norm!r} and cross_attention_dim={cfg.cross_attention_dim!r} is "
        "not supported (class-conditional DiT: ada_norm_zero without cross-attention; text-conditioned "
        f"PixArt-style: ada_norm_single with cross-attention); {SUPPORTED_HELP}."
    )


def denoiser_class(config: dict, where: str):
    """The diffusers class of a saved denoiser config (``_class_name``; ``UNet2DModel`` when absent).

    Raises:
        CheckpointError: a class retrac does not support, named with what is supported.
    """
    name = config.get("_class_name", "UNet2DModel") if isinstance(config, dict) else None
    if name not in SUPPORTED_DENOISERS:
        raise CheckpointError(
            f"the model in {where!r} is a {name}, which is not a supported denoiser; {SUPPORTED_HELP}."
        )
    import diffusers

    return getattr(diffusers, name)
