"""Loading checkpoints: diffusers ``save_pretrained`` folders and accelerate-style ``checkpoint-N/``.

Layouts understood for a path ``P``:

* ``P/config.json`` + ``P/diffusion_pytorch_model.safetensors`` (a ``UNet2DModel.save_pretrained``);
* ``P/unet/...`` or ``P/transformer/...`` (a pipeline folder, or a ``checkpoint-N/`` saved by
  diffusers' training scripts, whose accelerate save hook writes ``unet/``);
* ``P/model.safetensors`` (a plain ``accelerator.save_state``), with the model config taken from
  ``P/../unet/config.json`` or ``P/../config.json``.

The denoiser's class comes from its config's ``_class_name`` (:func:`retrac.denoisers.denoiser_class`:
``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ``Transformer2DModel``; any
other is refused by name). A folder holding only ``pytorch_lora_weights.safetensors`` (diffusers'
LoRA training scripts) is a LoRA checkpoint: its sha256 is over the adapter weights, and
:mod:`retrac.pipeline` loads it onto its base model.

Weights are read with safetensors, or ``torch.load(..., weights_only=True)`` for ``.bin`` files:
nothing is unpickled. A checkpoint's weight ``w_k`` (docs/design.md section 1: learning rate times steps
covered) comes from ``PATH=WEIGHT``, else from ``P/retrac_checkpoint.json``, else 1; it must be a
positive finite number.

The checkpoint's noise scheduler is part of what it is: :func:`scheduler_record` (the diffusers
config less private keys) is recorded per checkpoint in the store and the index, and
:func:`check_scheduler` refuses a query whose scheduler differs, naming the keys. It is found the way
diffusers finds a pipeline's: ``scheduler/`` in the checkpoint folder, its parent or grandparent (an
accelerate ``output_dir/checkpoint-N/``), with the class named by ``scheduler_config.json`` or by the
pipeline's ``model_index.json``. When none was saved, :func:`scheduler_from_spec` builds one from a
folder or a class name with arguments (``retrac index --scheduler``).

Where a checkpoint holds both ``unet/`` and ``unet_ema/`` (diffusers' training scripts with
``--use_ema``), ``unet/`` is used and a warning names ``unet_ema/``; give ``CHECKPOINT/unet_ema`` to
attribute the EMA weights instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from retrac._io import read_json
from retrac.errors import CheckpointError, StoreMismatchError

MODEL_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ACCELERATE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' LoRA training scripts save
DENOISER_FOLDERS = ("unet", "transformer")  # a pipeline's denoiser subfolder
CHECKPOINT_INFO = "retrac_checkpoint.json"
DEFAULT_CHECKPOINT_WEIGHT = 1.0  # w_k when neither PATH=WEIGHT nor retrac_checkpoint.json gives one
EMA_FOLDER = "unet_ema"  # where diffusers' training scripts save EMA weights beside unet/
SCHEDULER_SPEC_HELP = (
    "a folder with scheduler_config.json (or a pipeline folder with scheduler/), or a diffusers scheduler class "
    "with its arguments, e.g. DDPMScheduler:num_train_timesteps=1000,beta_schedule=linear"
)


class EMAChoiceWarning(UserWarning):
    """A checkpoint holds ``unet/`` and ``unet_ema/``; ``unet/`` was used."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint ``theta_k`` with its weight ``w_k``, the sha256 of its weights and its scheduler.

    ``scheduler`` is :func:`scheduler_record` of the checkpoint's scheduler (``None`` until
    :func:`with_scheduler` reads it; featurization always records it).
    """

    path: str
    weight: float
    sha256: str
    step: int | None = None
    scheduler: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_checkpoint_spec(spec: str) -> tuple[str, float | None]:
    """Split ``PATH[=WEIGHT]`` into the path and the weight (``None`` when not given)."""
    path, sep, weight = str(spec).rpartition("=")
    if not sep:
        return str(spec), None
    try:
        value = float(weight)
    except ValueError:
        return str(spec), None  # an '=' inside the path, not a weight
    _check_weight(value, spec)
    return path, value


def _check_weight(weight, where: str) -> float:
    """``weight`` as a float, refusing anything but a positive finite number."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(
            f"checkpoint weight {weight!r} in {where!r} must be a positive finite number (w_k = learning "
            "rate x steps covered); give PATH=WEIGHT with 0 < WEIGHT < inf."
        )
    return value


def _find_model_dir(path: Path) -> tuple[Path, Path]:
    """Return ``(config_dir, weights_file)`` for a checkpoint path."""
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist; give a save_pretrained or checkpoint-N folder."
        )
    for model_dir in (path, *(path / name for name in DENOISER_FOLDERS)):
        if (model_dir / "config.json").is_file():
            for name in MODEL_WEIGHT_FILES:
                if (model_dir / name).is_file():
                    if model_dir.name == "unet" and (path / EMA_FOLDER / "config.json").is_file():
                        warnings.warn(
                            f"checkpoint {str(path)!r} holds unet/ and {EMA_FOLDER}/ (EMA weights); using unet/. "
                            f"Give {str(path / EMA_FOLDER)!r} as the checkpoint to attribute the EMA model.",
                            EMAChoiceWarning,
                            stacklevel=3,
                        )
                    return model_dir, model_dir / name
            raise CheckpointError(
                f"checkpoint {str(model_dir)!r} has config.json but no {' or '.join(MODEL_WEIGHT_FILES)}; "
                "re-save it with save_pretrained."
            )
    for name in ACCELERATE_WEIGHT_FILES:
        if (path / name).is_file():
            for config_dir in (path.parent / "unet", path.parent):
                if (config_dir / "config.json").is_file():
                    return config_dir, path / name
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds {name} but no model config was found in "
                f"{str(path.parent / 'unet')!r} or {str(path.parent)!r}; save the model config there."
            )
    if lora_weights_file(path) is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds LoRA adapter weights ({LORA_WEIGHT_FILE}) and no model: give the base "
            "model they were trained on with --base-model PATH (Python: ModelParts(base_model=PATH))."
        )
    raise CheckpointError(
        f"{str(path)!r} is not a checkpoint: expected config.json with diffusion_pytorch_model.safetensors, "
        f"a unet/ or transformer/ subfolder, an accelerate model.safetensors, or {LORA_WEIGHT_FILE}."
    )


def lora_weights_file(path: str | Path) -> Path | None:
    """The LoRA weights of a checkpoint: ``path`` itself (a ``.safetensors`` file) or ``path/pytorch_lora_weights.safetensors``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path
    return path / LORA_WEIGHT_FILE if (path / LORA_WEIGHT_FILE).is_file() else None


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds LoRA adapter weights and no whole model."""
    path = Path(path)
    if lora_weights_file(path) is None:
        return False
    try:
        _find_model_dir(path)
    except CheckpointError:
        return True
    return False


def load_state_dict(weights_file: Path) -> dict[str, Tensor]:
    """Read a weights file without unpickling anything."""
    try:
        if weights_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(weights_file))
        return torch.load(str(weights_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file
        raise CheckpointError(
            f"checkpoint weights {str(weights_file)!r} cannot be read ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated: re-save the checkpoint."
        ) from exc


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_unet(path: str | Path):
    """Load the denoiser of a checkpoint on the CPU (its class from the config, see :mod:`retrac.denoisers`)."""
    from retrac.denoisers import denoiser_class

    config_dir, weights_file = _find_model_dir(Path(path))
    config = read_json(config_dir / "config.json", "model config", CheckpointError)
    model_class = denoiser_class(config, str(config_dir))  # an unsupported class is named, not misparsed
    try:
        model = model_class.from_config(model_class.load_config(str(config_dir)))
    except Exception as exc:
        raise CheckpointError(f"model config in {str(config_dir)!r} cannot be read: {exc}") from exc
    state = load_state_dict(weights_file)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes than the config's
        first = str(exc).strip().splitlines()[1:2] or [str(exc)[:200]]
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit its model config ({first[0].strip()}); check that "
            "config.json and the weights belong together."
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit its model config: missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}; check that config and weights belong together."
        )
    return model.eval()


def _scheduler_class(name, where: str):
    """The diffusers scheduler class called ``name``, or a ``CheckpointError`` naming it."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise CheckpointError(f"scheduler class {name!r} ({where}) is not a diffusers scheduler.")
    return cls


def _pipeline_scheduler_class(folder: Path) -> str | None:
    """The scheduler class a pipeline's ``model_index.json`` names for ``folder`` (its ``scheduler/``)."""
    index = folder.parent / "model_index.json"
    if folder.name != "scheduler" or not index.is_file():
        return None
    entry = read_json(index, "pipeline model_index.json", CheckpointError)
    entry = entry.get("scheduler") if isinstance(entry, dict) else None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else None


def _scheduler_in(folder: Path):
    """The scheduler saved in ``folder`` (``scheduler_config.json``), its class from the config or the
    pipeline's ``model_index.json``, as diffusers' ``from_pretrained`` reads it."""
    config = read_json(folder / "scheduler_config.json", "scheduler config", CheckpointError)
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = _scheduler_class(name or _pipeline_scheduler_class(folder) or "DDPMScheduler", str(folder))
    try:
        return cls.from_pretrained(str(folder))
    except Exception as exc:  # values the scheduler refuses (a bad beta schedule, ...)
        raise CheckpointError(
            f"scheduler config in {str(folder)!r} cannot be loaded ({type(exc).__name__}: {exc}); "
            "restore scheduler_config.json."
        ) from None


def scheduler_from_spec(spec):
    """A noise scheduler from ``--scheduler SPEC``: a scheduler object (returned as is), a folder holding
    ``scheduler_config.json`` (or a pipeline folder with ``scheduler/``), or ``CLASS[:key=value,...]``
    with values read as JSON when they parse (``1000``, ``0.02``, ``true``, ``"linear"``), else as text.

    Raises:
        CheckpointError: no scheduler there, an unknown class, arguments the class refuses.
    """
    import diffusers

    if isinstance(spec, diffusers.SchedulerMixin):
        return spec
    text = str(spec)
    path = Path(text)
    if path.exists():
        for folder in (path, path / "scheduler"):
            if (folder / "scheduler_config.json").is_file():
                return _scheduler_in(folder)
        raise CheckpointError(
            f"--scheduler {text!r} holds no scheduler_config.json (nor scheduler/scheduler_config.json); give "
            f"{SCHEDULER_SPEC_HELP}."
        )
    name, _, arguments = text.partition(":")
    cls = _scheduler_class(name.strip(), f"--scheduler {text!r}; give {SCHEDULER_SPEC_HELP}")
    kwargs = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise CheckpointError(
                f"--scheduler {text!r}: {item!r} is not key=value; give {SCHEDULER_SPEC_HELP}."
            )
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value.strip()
    try:
        return cls(**kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"--scheduler {text!r}: {cls.__name__} refuses these arguments ({exc})."
        ) from None


def load_scheduler(path: str | Path, spec=None):
    """The noise scheduler of a checkpoint: ``spec`` when given (:func:`scheduler_from_spec`), else the one
    saved with it (``scheduler/`` in it, its parent or grandparent, as a pipeline or an accelerate
    ``output_dir/checkpoint-N/`` has it)."""
    if spec is not None:
        return scheduler_from_spec(spec)
    path = Path(path)
    candidates = [path / "scheduler", path, path.parent / "scheduler", path.parent.parent / "scheduler"]
    for folder in candidates:
        if (folder / "scheduler_config.json").is_file():
            return _scheduler_in(folder)
    raise CheckpointError(
        f"no scheduler_config.json found with checkpoint {str(path)!r} (looked in "
        f"{', '.join(str(c) for c in candidates)}); save the scheduler there with scheduler.save_pretrained, or "
        f"give one with --scheduler ({SCHEDULER_SPEC_HELP}; Python: ModelParts(scheduler=...))."
    )


def scheduler_from_record(class_name: str, record: dict):
    """The scheduler a store recorded: ``class_name`` built from the recorded config (``--scheduler`` at indexing)."""
    return _scheduler_class(class_name, "recorded in the store").from_config(record)


def resolve_checkpoint(spec: str | Path, weight: float | None = None) -> Checkpoint:
    """Describe a checkpoint: its path, weight ``w_k`` and the sha256 of its weights.

    Args:
        spec: ``PATH`` or ``PATH=WEIGHT``.
        weight: overrides the weight in ``spec`` and in ``retrac_checkpoint.json``.
    """
    path_str, spec_weight = parse_checkpoint_spec(str(spec))
    path = Path(path_str)
    weights_file = lora_weights_file(path) if is_lora_checkpoint(path) else _find_model_dir(path)[1]
    info = {}
    if (path / CHECKPOINT_INFO).is_file():
        info = read_json(path / CHECKPOINT_INFO, "checkpoint info", CheckpointError)
        if not isinstance(info, dict):
            raise CheckpointError(
                f"{str(path / CHECKPOINT_INFO)!r} holds {type(info).__name__}, not an object with weight / step."
            )
    chosen = weight if weight is not None else spec_weight
    if chosen is None:
        chosen = info.get("weight", DEFAULT_CHECKPOINT_WEIGHT)
    step = info.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise CheckpointError(f"step {step!r} in {str(path / CHECKPOINT_INFO)!r} must be an integer or null.")
    state = load_state_dict(weights_file)
    return Checkpoint(
        path=str(path.resolve()),
        weight=_check_weight(chosen, path_str),
        sha256=state_dict_sha256(state),
        step=step,
    )


def scheduler_record(scheduler) -> dict:
    """The scheduler's diffusers config less its private (``_``) keys, as JSON values."""
    config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    return json.loads(
        json.dumps(config, default=lambda value: getattr(value, "tolist", lambda: str(value))())
    )


def with_scheduler(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with :func:`scheduler_record` of the scheduler saved with it."""
    return replace(checkpoint, scheduler=scheduler_record(load_scheduler(checkpoint.path)))


def check_scheduler(checkpoint: Checkpoint, scheduler) -> None:
    """Refuse ``scheduler`` unless its config is the one recorded for ``checkpoint`` at indexing.

    Raises:
        StoreMismatchError: the configs differ; every differing key is named.
    """
    if checkpoint.scheduler is None:
        return
    now = scheduler_record(scheduler)
    keys = sorted(set(checkpoint.scheduler) | set(now))
    diffs = [
        f"{key}: recorded {checkpoint.scheduler.get(key)!r}, now {now.get(key)!r}"
        for key in keys
        if checkpoint.scheduler.get(key) != now.get(key)
    ]
    if diffs:
        raise StoreMismatchError(
            f"the scheduler of checkpoint {checkpoint.path!r} differs from the one recorded at indexing ("
            + "; ".join(diffs)
            + "): restore its scheduler_config.json, or featurize again with `retrac index`."
        )


def save_checkpoint(model, scheduler, path: str | Path, weight: float = 1.0, step: int | None = None) -> Path:
    """Write a checkpoint folder: ``unet/`` and ``scheduler/`` (save_pretrained) and its weight."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path / "unet"))
    scheduler.save_pretrained(str(path / "scheduler"))
    (path / CHECKPOINT_INFO).write_text(json.dumps({"weight": weight, "step": step}, indent=2))
    return path
