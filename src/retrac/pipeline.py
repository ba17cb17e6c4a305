"""A text-to-image or latent model's parts besides the denoiser: VAE, text encoder, tokenizer, LoRA base.

Layouts, as diffusers saves them (``save_pretrained``):

* a pipeline folder ``P/`` with ``model_index.json`` and ``unet/`` (or ``transformer/``),
  ``scheduler/``, ``vae/``, ``text_encoder/``, ``tokenizer/``: every part is found there, also for a
  checkpoint ``P/checkpoint-N/`` or ``P/checkpoint-N/unet`` below it (the folder, its parent and
  its grandparent are searched, as for the scheduler);
* separate folders: ``--vae PATH`` (an ``AutoencoderKL`` folder, or a pipeline folder with
  ``vae/``), ``--text-encoder PATH`` (a ``CLIPTextModel`` / ``T5EncoderModel`` folder with its
  tokenizer inside or in ``../tokenizer``, or a pipeline folder with ``text_encoder/`` and
  ``tokenizer/``);
* LoRA: a checkpoint holding only ``pytorch_lora_weights.safetensors`` (diffusers' LoRA training
  scripts; a ``.safetensors`` file may be given directly) is loaded onto ``--base-model PATH`` (a
  pipeline or denoiser folder) with diffusers' ``load_lora_adapter`` (peft). The base model's
  parameters get ``requires_grad=False``, so only the adapter's count and base-model gradients are
  never computed; ``--include`` / ``--exclude`` select among the adapter's parameters. A file that
  does not fit the base model (other shapes, layers the base lacks, text-encoder layers) is refused.

The VAE and the text encoder are frozen and shared by every checkpoint; the store records their
sha256 (and where they were), and the query side checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from retrac._io import read_json
from retrac.checkpoints import (
    LORA_WEIGHT_FILE,
    Checkpoint,
    is_lora_checkpoint,
    load_scheduler,
    load_state_dict,
    load_unet,
    lora_weights_file,
    scheduler_from_spec,
    scheduler_record,
    state_dict_sha256,
)
from retrac.errors import CheckpointError, ConfigError, StoreMismatchError
from retrac.latents import LATENT_MODES, LatentEncoder
from retrac.task import DiffusionTask
from retrac.text import PromptEncoder

__all__ = [
    "LORA_ADAPTER_NAME",
    "TEXT_ENCODER_CLASSES",
    "ModelParts",
    "checkpoint_task",
    "find_part",
    "frozen_parts",
    "load_denoiser",
    "load_lora",
    "load_prompt_encoder",
    "load_vae",
]

LORA_ADAPTER_NAME = "retrac"
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "T5EncoderModel")  # output[0] is the last hidden state
VAE_CLASSES = ("AutoencoderKL",)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class ModelParts:
    """Where a checkpoint's other parts are, when not beside it (``retrac index --vae/--text-encoder/--base-model``).

    Attributes:
        vae: an ``AutoencoderKL`` folder or a pipeline folder with ``vae/`` (default: found beside
            the checkpoint, or none: a pixel-space model).
        text_encoder: a text encoder folder or a pipeline folder (default: found beside the checkpoint).
        base_model: the model LoRA checkpoints were trained on (a pipeline or denoiser folder).
        latent_mode: ``"mean"`` (default) or ``"sample"``; see :mod:`retrac.latents`.
        latent_seed: seeds the draws of ``latent_mode="sample"``.
    """

    vae: str | None = None
    text_encoder: str | None = None
    base_model: str | None = None
    latent_mode: str = "mean"
    latent_seed: int = 0
    scheduler: object | None = None  # --scheduler: a folder, "CLASS:key=value,...", or a scheduler object

    def __post_init__(self) -> None:
        if self.latent_mode not in LATENT_MODES:
            raise ConfigError(
                f"latent_mode={self.latent_mode!r} is unknown; choose one of {', '.join(LATENT_MODES)}."
            )
        for name in ("vae", "text_encoder", "base_model"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                flag = "--" + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} {value!r} does not exist; give a folder saved with save_pretrained."
                )


def _search_roots(start: Path) -> list[Path]:
    start = Path(start)
    if start.is_file():
        start = start.parent
    return [start, start.parent, start.parent.parent]


def find_part(start: str | Path, name: str, marker: str = "config.json") -> Path | None:
    """The folder ``ROOT/name`` holding ``marker`` for the first ``ROOT`` of ``start``, its parent, grandparent."""
    for root in _search_roots(Path(start)):
        if (root / name / marker).is_file():
            return root / name
    return None


def _part_folder(path: Path, name: str, marker: str) -> Path:
    """``path`` if it holds ``marker``, else ``path/name`` (a pipeline folder given for one part)."""
    if (path / marker).is_file():
        return path
    if (path / name / marker).is_file():
        return path / name
    raise CheckpointError(
        f"{str(path)!r} holds no {name} ({marker} not found there nor in {name}/); give the folder "
        f"the {name} was saved to with save_pretrained, or a pipeline folder with {name}/."
    )


def load_vae(path: str | Path, mode: str = "mean", seed: int = 0) -> LatentEncoder:
    """The frozen :class:`~retrac.latents.LatentEncoder` of an ``AutoencoderKL`` folder (or pipeline folder).

    Raises:
        CheckpointError: no VAE there, a class other than ``AutoencoderKL``, unreadable weights.
    """
    import diffusers

    folder = _part_folder(Path(path), "vae", "config.json")
    config = read_json(folder / "config.json", "VAE config", CheckpointError)
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in VAE_CLASSES:
        raise CheckpointError(
            f"the VAE in {str(folder)!r} is a {name}; retrac encodes latents with {', '.join(VAE_CLASSES)}."
        )
    try:
        vae = getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"the VAE in {str(folder)!r} cannot be loaded ({type(exc).__name__}: {exc}); re-save it."
        ) from None
    encoder = LatentEncoder(vae, mode, seed)
    encoder.path = str(folder.resolve())
    return encoder


def _tokenizer_folder(encoder_folder: Path) -> Path:
    if any((encoder_folder / f).is_file() for f in TOKENIZER_FILES):
        return encoder_folder
    for candidate in (encoder_folder.parent / "tokenizer", encoder_folder / "tokenizer"):
        if any((candidate / f).is_file() for f in TOKENIZER_FILES):
            return candidate
    raise CheckpointError(
        f"no tokenizer found for the text encoder in {str(encoder_folder)!r} (looked in it and in "
        f"{str(encoder_folder.parent / 'tokenizer')!r}); save the tokenizer there with save_pretrained."
    )


def load_prompt_encoder(path: str | Path) -> PromptEncoder:
    """The frozen :class:`~retrac.text.PromptEncoder` of a text encoder folder (or pipeline folder).

    Raises:
        CheckpointError: no text encoder or tokenizer there, an unsupported class, unreadable files.
    """
    import transformers

    folder = _part_folder(Path(path), "text_encoder", "config.json")
    config = read_json(folder / "config.json", "text encoder config", CheckpointError)
    names = config.get("architectures") if isinstance(config, dict) else None
    name = names[0] if isinstance(names, list) and names else None
    if name not in TEXT_ENCODER_CLASSES:
        raise CheckpointError(
            f"the text encoder in {str(folder)!r} is a {name}; retrac computes encoder_hidden_states with "
            f"{', '.join(TEXT_ENCODER_CLASSES)}."
        )
    tokenizer_folder = _tokenizer_folder(folder)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on every query
    try:
        model = getattr(transformers, name).from_pretrained(str(folder), local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"the text encoder in {str(folder)!r} or its tokenizer cannot be loaded ({type(exc).__name__}: {exc})."
        ) from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    encoder = PromptEncoder(model, tokenizer)
    encoder.path = str(folder.resolve())
    return encoder


def load_lora(model: nn.Module, lora_file: str | Path) -> nn.Module:
    """Load diffusers-saved LoRA weights onto ``model`` (peft), freezing every base parameter.

    Raises:
        CheckpointError: unreadable file, text-encoder layers, tensors or layers that do not fit.
    """
    lora_file = Path(lora_file)
    state = load_state_dict(lora_file)
    prefixes = {key.split(".", 1)[0] for key in state}
    if "text_encoder" in prefixes or "text_encoder_2" in prefixes:
        raise CheckpointError(
            f"{str(lora_file)!r} also holds text-encoder LoRA layers, which would change the prompts' "
            "encoder_hidden_states; retrac attributes denoiser adapters only: save the denoiser's layers alone."
        )
    prefix = next((p for p in ("unet", "transformer") if p in prefixes), None)
    if prefix is not None:
        state = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    if not state:
        raise CheckpointError(f"{str(lora_file)!r} holds no LoRA tensors; give the adapter's weights file.")
    if not hasattr(model, "load_lora_adapter"):
        raise CheckpointError(f"{type(model).__name__} cannot take LoRA adapters in this diffusers version.")
    try:
        model.load_lora_adapter(state, prefix=prefix, adapter_name=LORA_ADAPTER_NAME)
    except Exception as exc:  # shapes of another base model
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise CheckpointError(
            f"the LoRA weights {str(lora_file)!r} do not fit the base model ({detail[:200]}); give the base "
            "model the adapter was trained on (--base-model)."
        ) from None
    adapter = [n for n, _ in model.named_parameters() if f".{LORA_ADAPTER_NAME}." in n]
    if len(adapter) != len(state):
        raise CheckpointError(
            f"the LoRA weights {str(lora_file)!r} hold {len(state)} tensors but {len(adapter)} fit layers of the "
            "base model; give the base model the adapter was trained on (--base-model)."
        )
    for name, param in model.named_parameters():
        param.requires_grad_(f".{LORA_ADAPTER_NAME}." in name)  # base-model gradients are never computed
    return model.eval()


def load_denoiser(
    checkpoint: str | Path, base_model: str | Path | None = None
) -> tuple[nn.Module, dict | None]:
    """A checkpoint's denoiser on the CPU, and for a LoRA checkpoint the record of its base model.

    Returns:
        ``(model, lora)``: ``lora`` is ``None`` for a whole model, else ``{"base_model": {"path",
        "sha256"}, "file", "num_tensors"}`` (what the store records besides the adapter's sha256).

    Raises:
        CheckpointError: a LoRA checkpoint without ``base_model``, or weights that do not fit.
    """
    if not is_lora_checkpoint(checkpoint):
        return load_unet(checkpoint), None
    if base_model is None:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} holds LoRA adapter weights ({LORA_WEIGHT_FILE}) and no model: give "
            "the base model they were trained on with --base-model PATH."
        )
    model = load_unet(base_model)
    base = {"path": str(Path(base_model).resolve()), "sha256": state_dict_sha256(model.state_dict())}
    lora_file = lora_weights_file(checkpoint)
    load_lora(model, lora_file)
    num = sum(1 for n, _ in model.named_parameters() if f".{LORA_ADAPTER_NAME}." in n)
    return model, {"base_model": base, "num_tensors": num}


def frozen_parts(
    checkpoint: str | Path, parts: ModelParts, text_conditioned: bool
) -> tuple[LatentEncoder | None, PromptEncoder | None]:
    """The VAE and text encoder of a checkpoint: given in ``parts``, else found beside it (or its base).

    A VAE is used when given or found (a latent model); a text encoder only for a text-conditioned
    denoiser.
    """
    start = (
        Path(parts.base_model) if parts.base_model and is_lora_checkpoint(checkpoint) else Path(checkpoint)
    )
    vae_path = parts.vae or find_part(start, "vae")
    vae = None if vae_path is None else load_vae(vae_path, parts.latent_mode, parts.latent_seed)
    prompt = None
    if text_conditioned:
        text_path = parts.text_encoder or find_part(start, "text_encoder")
        prompt = None if text_path is None else load_prompt_encoder(text_path)
    elif parts.text_encoder is not None:
        raise ConfigError(
            f"--text-encoder {parts.text_encoder!r} was given, but the model at {str(checkpoint)!r} is not "
            "text-conditioned; leave it out."
        )
    return vae, prompt


def check_recorded(kind: str, recorded: dict | None, actual: dict | None) -> None:
    """Refuse a VAE / text encoder / LoRA base whose sha256 differs from the one the store recorded."""
    if recorded is None and actual is None:
        return
    if recorded is None or actual is None or recorded.get("sha256") != actual.get("sha256"):
        have = "none" if actual is None else f"sha256 {actual.get('sha256', '')[:12]}..."
        want = "none" if recorded is None else f"sha256 {recorded.get('sha256', '')[:12]}..."
        raise StoreMismatchError(
            f"the {kind} differs from the one recorded at indexing (recorded {want}, now {have}); restore it, "
            "or featurize again with `retrac index`."
        )


def scheduler_source(checkpoint: str | Path, parts: ModelParts | None) -> Path:
    """Where a checkpoint's scheduler is looked for: the base model for a LoRA checkpoint, else the checkpoint.

    Raises:
        CheckpointError: a LoRA checkpoint without a base model.
    """
    if not is_lora_checkpoint(checkpoint):
        return Path(checkpoint)
    if parts is None or not parts.base_model:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} holds LoRA adapter weights ({LORA_WEIGHT_FILE}) and no model: give "
            "the base model they were trained on with --base-model PATH."
        )
    return Path(parts.base_model)


def with_pipeline_scheduler(checkpoint: Checkpoint, parts: ModelParts | None) -> Checkpoint:
    """``checkpoint`` with the record of its scheduler (a LoRA checkpoint's is its base model's)."""
    if checkpoint.scheduler is not None:
        return checkpoint
    return replace(checkpoint, scheduler=scheduler_record(checkpoint_scheduler(checkpoint.path, parts)))


def checkpoint_scheduler(checkpoint: str | Path, parts: ModelParts | None):
    """A checkpoint's noise scheduler: ``parts.scheduler`` (``--scheduler``) when given, else the one saved
    with it (a LoRA checkpoint's is its base model's)."""
    if parts is not None and parts.scheduler is not None:
        return scheduler_from_spec(parts.scheduler)
    return load_scheduler(scheduler_source(checkpoint, parts))


def checkpoint_task(
    checkpoint: str | Path,
    scheduler,
    objective: str,
    include,
    exclude,
    parts: ModelParts | None,
    device,
    frozen: tuple[LatentEncoder | None, PromptEncoder | None] | None = None,
) -> DiffusionTask:
    """The :class:`~retrac.task.DiffusionTask` of a checkpoint with its VAE, text encoder and LoRA base.

    Args:
        checkpoint: the checkpoint folder (a whole model, or LoRA weights over ``parts.base_model``).
        scheduler: the noise scheduler.
        objective, include, exclude: as :class:`~retrac.task.DiffusionTask` takes them.
        parts: where the other parts are (default: beside the checkpoint).
        device: where the denoiser (and, when used, the encoders) run.
        frozen: the VAE and text encoder already loaded for another checkpoint (they are shared).
    """
    parts = parts or ModelParts()
    model, lora = load_denoiser(checkpoint, parts.base_model)
    if frozen is None:
        from retrac.denoisers import describe_denoiser

        frozen = frozen_parts(checkpoint, parts, describe_denoiser(model).conditioning == "text")
    vae, prompt = frozen
    task = DiffusionTask(
        model.to(device), scheduler, objective, include, exclude, vae=vae, text_encoder=prompt
    )
    task.lora = lora
    return task


def recorded_parts(task_record: dict, where=lambda path: Path(path)) -> ModelParts:
    """The :class:`ModelParts` a store recorded (``where`` maps a recorded path to its place now)."""
    vae = task_record.get("vae") or {}
    text = task_record.get("text_encoder") or {}
    base = (task_record.get("lora") or {}).get("base_model") or {}
    return ModelParts(
        vae=str(where(vae["path"])) if vae.get("path") else None,
        text_encoder=str(where(text["path"])) if text.get("path") else None,
        base_model=str(where(base["path"])) if base.get("path") else None,
        latent_mode=vae.get("mode") or "mean",
        latent_seed=vae.get("seed") or 0,
    )


def load_recorded_frozen(
    task_record: dict, parts: ModelParts
) -> tuple[LatentEncoder | None, PromptEncoder | None]:
    """The VAE and text encoder a store recorded, loaded from ``parts`` and checked by sha256.

    Raises:
        CheckpointError: a recorded part that is no longer where it was recorded.
        StoreMismatchError: a part whose weights differ from the recorded ones.
    """
    loaded = []
    for key, path, load in (
        ("vae", parts.vae, lambda p: load_vae(p, parts.latent_mode, parts.latent_seed)),
        ("text_encoder", parts.text_encoder, load_prompt_encoder),
    ):
        record = task_record.get(key)
        if record is None:
            loaded.append(None)
            continue
        if path is None or not Path(path).exists():
            raise CheckpointError(
                f"the {key.replace('_', ' ')} recorded at indexing ({record.get('path')!r}) is not there any more; "
                "restore it (the store checks it by sha256)."
            )
        part = load(path)
        check_recorded(key.replace("_", " "), record, part.to_dict())
        loaded.append(part)
    return loaded[0], loaded[1]


def load_indexed_denoiser(path: str | Path, checkpoint: Checkpoint, parts: ModelParts, task_record: dict):
    """The denoiser of an indexed checkpoint, checked against the sha256 recorded at indexing.

    For a LoRA checkpoint, the adapter file's sha256 and the base model's are both checked.

    Raises:
        StoreMismatchError: weights (or a base model) that differ from the indexed ones.
    """
    model, lora = load_denoiser(path, parts.base_model)
    if lora is None:
        actual = state_dict_sha256(model.state_dict())
    else:
        check_recorded(
            "LoRA base model", (task_record.get("lora") or {}).get("base_model"), lora["base_model"]
        )
        actual = state_dict_sha256(load_state_dict(lora_weights_file(path)))
    if actual != checkpoint.sha256:
        raise StoreMismatchError(
            f"checkpoint {str(path)!r} has sha256 {actual[:12]}..., the store was built from "
            f"{checkpoint.sha256[:12]}...: not the checkpoint that was indexed (or its weights changed since); "
            "give the indexed checkpoint, or re-index."
        )
    return model, lora
