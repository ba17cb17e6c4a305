"""Options that say where a latent or text-to-image model's other parts are (``index``; ``query --prompt``).

``--vae``, ``--text-encoder`` and ``--base-model`` (LoRA checkpoints) default to the parts found
beside the checkpoint (a diffusers pipeline folder); ``--latent-mode`` chooses the VAE latent the
training images are encoded to; ``--caption-column`` the key of ``metadata.jsonl`` that holds the
captions. See :mod:`retrac.pipeline`.
"""

from __future__ import annotations

import argparse

from retrac.checkpoints import SCHEDULER_SPEC_HELP
from retrac.data import CAPTION_COLUMN
from retrac.latents import LATENT_MODES


def add_model_part_options(p: argparse.ArgumentParser) -> None:
    """``--scheduler``, ``--vae``, ``--text-encoder``, ``--base-model``, ``--latent-mode``, ``--caption-column``."""
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="SPEC",
        help=f"the noise scheduler, when none was saved with the checkpoints: {SCHEDULER_SPEC_HELP} "
        "(recorded in the store: queries need not give it again)",
    )
    group = p.add_argument_group("latent, text-to-image and LoRA models")
    group.add_argument(
        "--vae",
        default=None,
        metavar="PATH",
        help="the AutoencoderKL of a latent model (default: vae/ of the checkpoint's pipeline folder, if any)",
    )
    group.add_argument(
        "--text-encoder",
        default=None,
        metavar="PATH",
        help="the text encoder (with its tokenizer) of a text-conditioned model, or a pipeline folder "
        "(default: text_encoder/ and tokenizer/ of the checkpoint's pipeline folder)",
    )
    group.add_argument(
        "--base-model",
        default=None,
        metavar="PATH",
        help="the model LoRA checkpoints (pytorch_lora_weights.safetensors) were trained on; only the "
        "adapters' parameters count",
    )
    group.add_argument(
        "--latent-mode",
        default=LATENT_MODES[0],
        choices=LATENT_MODES,
        help="training latents: the VAE distribution's mean (deterministic) or one seeded draw per sample "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--caption-column",
        default=CAPTION_COLUMN,
        metavar="KEY",
        help="the key of the image folder's metadata.jsonl that holds the captions (default: %(default)s)",
    )


def model_parts(args: argparse.Namespace):
    """The :class:`~retrac.pipeline.ModelParts` of the options (``None`` when none is given)."""
    from retrac.pipeline import ModelParts

    parts = ModelParts(
        vae=args.vae,
        text_encoder=args.text_encoder,
        base_model=args.base_model,
        latent_mode=args.latent_mode,
        latent_seed=getattr(args, "seed", 0) or 0,
        scheduler=getattr(args, "scheduler", None),
    )
    return None if parts == ModelParts() else parts


def describe_task_record(record: dict) -> list[str]:
    """Lines for ``retrac index`` about a latent, text or LoRA store (nothing for a pixel UNet2DModel)."""
    lines = []
    if record.get("vae"):
        vae = record["vae"]
        lines.append(
            f"latent model: {vae['class']} ({vae.get('path', '?')}), latents = {vae['mode']} x "
            f"{vae['scaling_factor']:g}, cached in the store's latents.npz"
        )
    if record.get("text_encoder"):
        text = record["text_encoder"]
        lines.append(
            f"text conditioning: {text['class']} + {text['tokenizer']} ({text.get('path', '?')}), "
            f"{text['max_length']} tokens per caption"
        )
    if record.get("lora"):
        base = record["lora"]["base_model"]
        lines.append(
            f"LoRA: {record['num_parameters']:,} adapter parameters count ({record['lora']['num_tensors']} "
            f"tensors) over the frozen base model {base['path']}"
        )
    return lines
