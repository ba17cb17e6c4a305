"""Featurization throughput: sample-events per second for the ``exact`` and ``dense`` projectors.

Runs ``featurize_dataset`` end to end (events, noise, per-sample gradients with torch.func,
projection, Zarr writes) on the demo model (``retrac.demo.build_demo_unet``, random weights, saved as
a checkpoint) and the first ``--samples`` scikit-learn digits, once with ``--projector exact`` and
once with ``--projector dense --dim D``, in the same run. The one-off cost of generating ``P_k``
(trak BasicProjector, on the CPU) is reported apart from the steady-state throughput.

The first line printed is one JSON object::

    {"benchmark": "featurize", "exact_sample_events_per_s": ..., "dense_sample_events_per_s": ...,
     "dense_over_exact": ..., ...}

Then, in the same run, the factored projector against its baseline and its ceiling at ``d = --factored-dim``
(4096) on (a) the demo UNet and (b) a CIFAR-10-scale ``UNet2DModel`` (block_out_channels
(128, 256, 256, 256), layers_per_block 2, 32x32x3, diffusers' default block types, random weights,
about 36M parameters), all on the same batch of rows (sample-events):

* ``factored``: ``FactoredProjector.featurize_rows`` (one forward and one backward pass for all rows);
  the one-off generation of its seeded matrices is reported apart.
* ``trak``: the TRAK-style baseline, vmap per-sample gradients (``flat_per_sample_gradients``) and trak's
  ``BasicProjector`` (Gaussian, regenerated block by block on every call, as trak does). On the demo
  UNet it runs whole (``DenseProjector``). At CIFAR scale ``P x d`` is 36M x 4096 floats (about
  600 GB) and does not fit in memory, and even one trak block of 100 columns is 15 GB: it is run
  blockwise with blocks of ``--trak-block`` columns, timing ``--trak-blocks`` of the ``d / block``
  blocks (generation + product) and scaling by the block count; the per-sample gradients are
  timed on ``--trak-rows`` rows.
* ``trainstep``: a plain batched training step (forward, backward, SGD step) on the same rows: the
  ceiling.

Then (``--t2i``, on by default; ``--only-t2i`` runs it alone) a latent text-to-image row: a
``UNet2DConditionModel`` of Stable Diffusion 1.5's shape at reduced width (block_out_channels
(64, 128, 256, 256) instead of (320, 640, 1280, 1280), cross-attention width 256 over 77 tokens,
16x16 latents, random weights, about 35M parameters), text-conditioned rows (latents and
``encoder_hidden_states`` drawn at random: the VAE and the text encoder are frozen one-off costs),
as a full fine-tune and with a rank-4 LoRA adapter on ``to_q/to_k/to_v/to_out.0`` (as diffusers'
LoRA training script adds it): the factored projector against a training step of the same model
(for LoRA, a step that updates the adapter only), the share of parameters covered, and for LoRA
also the dense projector (vmap per-sample gradients of the adapter, trak JL), which fits there.
One JSON object, ``"benchmark": "featurize_t2i"``.

The last line printed is one JSON object with ``factored_over_trak_cifar``,
``factored_over_trainstep_cifar``, ``factored_over_trainstep_demo`` (ratios of sample-events per
second) and the rates behind them.

Usage::

    python benchmarks/featurize.py                    # ~10 min on 2 shared CPU cores
    python benchmarks/featurize.py --quick            # fewer rows and blocks (~3-4 min)
    python benchmarks/featurize.py --device cuda --samples 512
    python benchmarks/featurize.py --only-t2i          # the latent text-to-image row alone (~2 min)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from retrac.checkpoints import resolve_checkpoint, save_checkpoint
from retrac.demo import build_demo_scheduler, build_demo_unet, digits_dataset
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.projection import DenseProjector, FactoredProjector, flat_per_sample_gradients, projector_seed
from retrac.task import DiffusionTask


def measure(checkpoint, data, out: Path, config: IndexConfig, device: str) -> float:
    """Seconds for one full featurization into a fresh store."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    featurize_dataset([checkpoint], data, out, config, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def cifar_unet():
    """A CIFAR-10-scale ``UNet2DModel`` (about 36M parameters), random weights."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
    )


def rows_for(task: DiffusionTask, rows: int, device: str):
    """``rows`` sample-events ``(x_t, t, target)`` on ``device``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((rows, *task.sample_shape), generator=generator) * 2 - 1
    timesteps = torch.randint(0, task.num_train_timesteps, (rows,), generator=generator)
    noise = torch.randn((rows, *task.sample_shape), generator=generator)
    x_t, target = task.noisy_inputs(images.to(device), timesteps.to(device), noise.to(device))
    return x_t, timesteps.to(device), target


def trainstep_rate(task: DiffusionTask, x_t, t, target, device: str, repeats: int) -> float:
    """Sample-events per second of a plain batched training step (the ceiling)."""
    model = task.model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        loss = task.objective_from_output(task.model_output(x_t, t), target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    step()  # warm-up
    seconds = timed(step, device, repeats)
    model.eval()
    model.zero_grad(set_to_none=True)
    return x_t.shape[0] / seconds


def factored_rate(
    task: DiffusionTask, x_t, t, target, dim: int, device: str, repeats: int
) -> tuple[float, float]:
    """(sample-events per second, one-off seconds to generate the seeded matrices)."""
    projector = FactoredProjector(task, dim, projector_seed(0, 0))
    setup = timed(lambda: projector._device_matrices(torch.device(device)), device)
    projector.featurize_rows(task, x_t[:2], t[:2], target[:2])  # warm-up
    seconds = timed(lambda: projector.featurize_rows(task, x_t, t, target), device, repeats)
    return x_t.shape[0] / seconds, setup


def trak_rate_whole(task: DiffusionTask, x_t, t, target, dim: int, device: str) -> float:
    """TRAK-style baseline run whole: vmap per-sample gradients + trak BasicProjector (``DenseProjector``)."""
    projector = DenseProjector(task.num_parameters, dim, projector_seed(0, 0))
    projector.featurize_rows(task, x_t[:2], t[:2], target[:2])  # warm-up (trak import, vmap tracing)
    seconds = timed(lambda: projector.featurize_rows(task, x_t, t, target), device)
    return x_t.shape[0] / seconds


def trak_rate_blockwise(
    task: DiffusionTask, x_t, t, target, dim: int, device: str, block: int, blocks: int, batch: int
) -> dict:
    """TRAK-style baseline where ``P x d`` does not fit: gradients timed whole, projection by blocks.

    trak's ``BasicProjector.project`` regenerates each block of ``block`` columns of ``P`` from its
    seed on every call and multiplies it with the call's gradients. We time, on ``blocks`` of the
    ``ceil(d / block)`` blocks, the generation (paid once per call, so shared by the ``batch`` rows
    of a call: the same batch the factored projector gets) and the product with the gradients of
    the ``len(x_t)`` rows, and scale both to all blocks. ``rate_no_generation`` is the rate if ``P``
    cost nothing to produce (a lower bound on the baseline's cost).
    """
    from trak.projectors import BasicProjector, ProjectionType

    rows = x_t.shape[0]
    flat_per_sample_gradients(task, x_t[:1], t[:1], target[:1])  # warm-up (vmap tracing)
    holder = {}

    def gradients():
        holder["grads"] = flat_per_sample_gradients(task, x_t, t, target)

    grad_seconds = timed(gradients, device)
    grads = holder.pop("grads")
    projector = BasicProjector(
        grad_dim=task.num_parameters,
        proj_dim=dim,
        seed=projector_seed(0, 0),
        proj_type=ProjectionType.normal,
        device=torch.device(device),
        block_size=block,
        dtype=torch.float32,
    )
    projector.generate_sketch_matrix(projector.generator_states[0])  # warm-up
    generate = product = 0.0
    for index in range(1, blocks + 1):
        generate += timed(
            lambda i=index: projector.generate_sketch_matrix(projector.generator_states[i]), device
        )
        product += timed(lambda: grads @ projector.proj_matrix, device)
    num_blocks = projector.num_blocks
    generate_per_row = generate / blocks * num_blocks / batch  # once per call of `batch` rows
    product_per_row = product / blocks * num_blocks / rows
    gradient_per_row = grad_seconds / rows
    return {
        "rate": 1.0 / (gradient_per_row + product_per_row + generate_per_row),
        "rate_no_generation": 1.0 / (gradient_per_row + product_per_row),
        "rows": rows,
        "batch_rows_per_call": batch,
        "gradient_seconds_per_row": round(gradient_per_row, 3),
        "product_seconds_per_row": round(product_per_row, 3),
        "generation_seconds_per_call": round(generate / blocks * num_blocks, 1),
        "generation_seconds_per_row": round(generate_per_row, 3),
        "block_columns": block,
        "blocks_timed": blocks,
        "num_blocks": num_blocks,
    }


def projector_comparison(args) -> dict:
    """factored vs trak baseline vs training step on the demo and the CIFAR-scale UNet."""
    from diffusers import DDPMScheduler

    dim, device = args.factored_dim, args.device
    out: dict = {"benchmark": "featurize_factored", "dim": dim, "device": device}
    for name, model, rows in (
        ("demo", build_demo_unet(), args.demo_rows),
        ("cifar", cifar_unet(), args.cifar_rows),
    ):
        torch.manual_seed(0)
        task = DiffusionTask(model.to(device), DDPMScheduler(num_train_timesteps=1000))
        x_t, t, target = rows_for(task, rows, device)
        repeats = 3 if name == "demo" else 1
        factored, setup = factored_rate(task, x_t, t, target, dim, device, repeats)
        trainstep = trainstep_rate(task, x_t, t, target, device, repeats)
        if name == "demo":
            trak = {"rate": trak_rate_whole(task, x_t, t, target, dim, device), "rows": rows, "how": "whole"}
        else:
            n = min(args.trak_rows, rows)
            trak = trak_rate_blockwise(
                task, x_t[:n], t[:n], target[:n], dim, device, args.trak_block, args.trak_blocks, rows
            )
            trak["how"] = (
                f"blockwise: P x d = {task.num_parameters} x {dim} float32 "
                f"({task.num_parameters * dim * 4 / 1e9:.0f} GB) does not fit; per-sample gradients of {n} rows timed, "
                f"{trak['blocks_timed']} of {trak['num_blocks']} trak blocks of {args.trak_block} columns timed "
                f"(generation, once per call of {rows} rows, and product) and scaled"
            )
            no_generation = trak.pop("rate_no_generation")
        record = FactoredProjector(task, dim, 0).to_dict()
        out[name] = {
            "num_parameters": task.num_parameters,
            "rows": rows,
            "factored_sample_events_per_s": round(factored, 3),
            "factored_setup_s": round(setup, 2),
            "factored_stage1_dim": record["stage1_dim"],
            "factored_uncovered_share": record["uncovered_share"],
            "factored_norm_kind": record["norm_kind"],
            "trak_sample_events_per_s": round(trak.pop("rate"), 5),
            "trak": trak,
            "trainstep_sample_events_per_s": round(trainstep, 3),
        }
        out[f"factored_over_trak_{name}"] = round(factored / out[name]["trak_sample_events_per_s"], 2)
        out[f"factored_over_trainstep_{name}"] = round(factored / trainstep, 3)
        if name == "cifar":
            out["factored_over_trak_cifar_no_generation"] = round(factored / no_generation, 2)
        del task, model, x_t, target
    return out


def sd_like_unet():
    """``UNet2DConditionModel`` of Stable Diffusion 1.5's shape at reduced width (about 35M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
    )


def t2i_trainstep_rate(task: DiffusionTask, x_t, t, target, states, device: str, repeats: int) -> float:
    """Sample-events per second of a batched training step updating the parameters that count."""
    params = list(task.selected_parameters().values())
    optimizer = torch.optim.SGD(params, lr=1e-6)

    def step():
        loss = task.objective_from_output(task.model_output(x_t, t, states), target).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    task.model.train()
    step()  # warm-up
    seconds = timed(step, device, repeats)
    task.model.eval()
    task.model.zero_grad(set_to_none=True)
    return x_t.shape[0] / seconds


def t2i_model_row(name: str, args, states) -> dict:
    """One row of the text-to-image comparison: ``name`` is ``full`` or ``lora_r4``."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    device, rows = args.device, args.t2i_rows
    torch.manual_seed(0)
    model = sd_like_unet()
    if name == "lora_r4":
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    task = DiffusionTask(model.to(device), DDPMScheduler(num_train_timesteps=1000))
    x_t, t, target = rows_for(task, rows, device)
    stage1 = FactoredProjector(task, 1, 0).stage1_dim
    projector = FactoredProjector(task, min(args.factored_dim, stage1), projector_seed(0, 0))
    projector._device_matrices(torch.device(device))
    projector.featurize_rows(task, x_t[:2], t[:2], target[:2], states[:2])  # warm-up
    seconds = timed(lambda: projector.featurize_rows(task, x_t, t, target, states), device, args.t2i_repeats)
    record = projector.to_dict()
    row = {
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "parameters_counted": task.num_parameters,
        "factored_dim": projector.dim,
        "factored_covered_share": round(1 - record["uncovered_share"], 6),
        "factored_uncovered": record["uncovered"][:5],
        "factored_sample_events_per_s": round(rows / seconds, 3),
        "trainstep_sample_events_per_s": round(
            t2i_trainstep_rate(task, x_t, t, target, states, device, args.t2i_repeats), 3
        ),
    }
    if name == "lora_r4":  # the adapter's P is small enough for vmap gradients + trak JL
        dense = DenseProjector(task.num_parameters, projector.dim, projector_seed(0, 0))
        dense.featurize_rows(task, x_t[:2], t[:2], target[:2], states[:2])  # warm-up
        dense_seconds = timed(lambda: dense.featurize_rows(task, x_t, t, target, states), device)
        row["dense_sample_events_per_s"] = round(rows / dense_seconds, 3)
    return row


def t2i_comparison(args) -> dict:
    """factored vs a training step on an SD-like UNet2DConditionModel: full fine-tune and LoRA rank 4."""
    rows = args.t2i_rows
    out: dict = {"benchmark": "featurize_t2i", "dim": args.factored_dim, "device": args.device, "rows": rows}
    states = torch.randn((rows, 77, 256), generator=torch.Generator().manual_seed(0)).to(args.device)
    out["threads"] = torch.get_num_threads()
    for name in ("full", "lora_r4"):
        row = t2i_model_row(name, args, states)
        out[name] = row
        factored = row["factored_sample_events_per_s"]
        out[f"factored_over_trainstep_{name}"] = round(factored / row["trainstep_sample_events_per_s"], 3)
        if "dense_sample_events_per_s" in row:
            out[f"factored_over_dense_{name}"] = round(factored / row["dense_sample_events_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="digits featurized (default: %(default)s)")
    parser.add_argument("--events", default="stratified:4", help="event schedule (default: %(default)s)")
    parser.add_argument(
        "--dim", type=int, default=1024, help="dense projection dimension (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--factored-dim", type=int, default=4096, help="d of factored vs trak (default: %(default)s)"
    )
    parser.add_argument(
        "--demo-rows", type=int, default=64, help="sample-events per batch, demo (default: %(default)s)"
    )
    parser.add_argument(
        "--cifar-rows",
        type=int,
        default=16,
        help="sample-events per batch, CIFAR scale (default: %(default)s)",
    )
    parser.add_argument(
        "--trak-rows",
        type=int,
        default=4,
        help="rows of the CIFAR-scale trak baseline (default: %(default)s)",
    )
    parser.add_argument(
        "--trak-block", type=int, default=8, help="columns per trak block (default: %(default)s)"
    )
    parser.add_argument("--trak-blocks", type=int, default=3, help="trak blocks timed (default: %(default)s)")
    parser.add_argument(
        "--quick", action="store_true", help="16 digits, 8 CIFAR rows, 2 trak rows and blocks"
    )
    parser.add_argument(
        "--t2i-rows",
        type=int,
        default=8,
        help="sample-events per batch, text-to-image row (default: %(default)s)",
    )
    parser.add_argument("--t2i-repeats", type=int, default=2, help="timed repeats, text-to-image row")
    parser.add_argument("--no-t2i", action="store_true", help="leave out the latent text-to-image row")
    parser.add_argument("--only-t2i", action="store_true", help="run the latent text-to-image row alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.samples, args.cifar_rows, args.trak_rows, args.trak_blocks = 16, 8, 2, 2
    if args.only_t2i:
        print(json.dumps(t2i_comparison(args)))
        return

    torch.manual_seed(0)
    data = digits_dataset().subset(range(args.samples))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = resolve_checkpoint(
            save_checkpoint(build_demo_unet(), build_demo_scheduler(), tmp / "ckpt")
        )
        common = {"events": args.events, "batch_size": args.batch_size, "shard_rows": args.samples}
        exact = IndexConfig(projector="exact", **common)
        dense = IndexConfig(projector="dense", dim=args.dim, **common)
        num_parameters = sum(p.numel() for p in build_demo_unet().parameters())

        started = time.perf_counter()  # one-off: generate P_k (cached for the process)
        DenseProjector(num_parameters, args.dim, projector_seed(0, 0))._project_basic(
            torch.zeros(1, num_parameters)
        )
        setup = time.perf_counter() - started

        # warm-up (imports, allocator, torch.func tracing) on a few samples, then the timed runs
        featurize_dataset(
            [checkpoint], data.subset(range(2)), tmp / "warm", exact, device=args.device, progress=False
        )
        exact_s = measure(checkpoint, data, tmp / "exact", exact, args.device)
        dense_s = measure(checkpoint, data, tmp / "dense", dense, args.device)

    sample_events = args.samples * exact.schedule.num_events
    exact_rate, dense_rate = sample_events / exact_s, sample_events / dense_s
    result = {
        "benchmark": "featurize",
        "model": "demo UNet2DModel (random weights)",
        "num_parameters": num_parameters,
        "samples": args.samples,
        "events": args.events,
        "sample_events": sample_events,
        "dense_dim": args.dim,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "exact_sample_events_per_s": round(exact_rate, 2),
        "dense_sample_events_per_s": round(dense_rate, 2),
        "dense_over_exact": round(dense_rate / exact_rate, 3),
        "dense_projection_setup_s": round(setup, 2),
        "exact_seconds": round(exact_s, 2),
        "dense_seconds": round(dense_s, 2),
    }
    print(json.dumps(result), flush=True)
    if not args.no_t2i:
        print(json.dumps(t2i_comparison(args)), flush=True)
    print(json.dumps(projector_comparison(args)))


if __name__ == "__main__":
    main()
