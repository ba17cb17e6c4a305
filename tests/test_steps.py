"""Step-specific queries (Journey-TRAK): per-step results equal a query built by hand from the trajectory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_scheduler
from retrac.cli import main
from retrac.data import ImageDataset
from retrac.errors import ConfigError
from retrac.indexer import IndexConfig, featurize_dataset
from retrac.projection import projected_gradients
from retrac.query.attribution import Attributor, QueryEvents, build_attribution_index, train_vector_blocks
from retrac.query.steps import attribute_steps, parse_steps, sample_trajectory
from retrac.query.vectors import Method
from t2i_models import make_cond_unet, make_text_encoder, make_tokenizer, make_vae, save_pipeline

PROMPTS = ["a red square", "a green cross"]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    folder = save_pipeline(
        root / "sd-tiny",
        make_cond_unet(),
        make_scheduler(),
        vae=make_vae(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(root / "vocab"),
    )
    generator = torch.Generator().manual_seed(2)
    data = ImageDataset(
        torch.rand((6, 3, 16, 16), generator=generator) * 2 - 1,
        [f"img-{i}" for i in range(6)],
        source="steps-test",
        captions=["a red square", "a blue circle", "a green cross"] * 2,
    )
    store = featurize_dataset(
        [folder], data, root / "store", IndexConfig(events="uniform:2", dim=32), progress=False
    )
    build_attribution_index(store, root / "index", "tracin", progress=False)
    return root, store


def test_step_queries_equal_a_query_built_by_hand_from_the_trajectory(indexed):
    root, store = indexed
    events = QueryEvents(3, 2, seed=4)
    attributor = Attributor(root / "index", query_events=events, progress=False)
    task = attributor.task
    states = task.encode_prompts(PROMPTS)
    trajectory = sample_trajectory(task, [90, 52, 10], 2, states, seed=7, num_inference_steps=10)
    assert trajectory.timesteps == [90, 50, 10] and trajectory.requested == [90, 52, 10]
    # the trajectory starts from the seeded noise
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(trajectory.latents[0], start)
    results = attribute_steps(attributor, trajectory, k=4, prompts=PROMPTS)
    assert list(results) == [90, 50, 10]
    unet, scheduler = task.model, task.scheduler
    u = np.concatenate(list(train_vector_blocks(store, Method.named("tracin"))))
    for s, t in enumerate(trajectory.timesteps):
        x_t = trajectory.latents[s]
        with torch.no_grad():
            eps = unet(x_t, torch.full((2,), t), encoder_hidden_states=states).sample
        alpha_bar = scheduler.alphas_cumprod[t]
        x0 = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()  # the model's estimate at step t
        torch.testing.assert_close(trajectory.predicted[s], x0, rtol=1e-5, atol=1e-5)
        noise = events.noise(0, (4, 8, 8))[0]  # (M, C, H, W): the noise draws of one timestep
        feats, _ = projected_gradients(
            task, attributor._projectors[0], x0, torch.full((2, 2), t), noise.expand(2, 2, 4, 8, 8), states
        )
        q = feats.numpy().mean(axis=1)  # TracIn: q = mean over the draws (one timestep)
        scores = q @ u.T  # (2, N), w_0 is already in U
        top = np.argsort(-scores, axis=1, kind="stable")[:, :4]
        np.testing.assert_array_equal(results[t].indices, top)
        np.testing.assert_allclose(
            results[t].scores, np.take_along_axis(scores, top, 1), rtol=1e-4, atol=1e-6
        )
    assert attributor.query_events == events  # restored


def test_the_cli_prints_one_list_per_step(indexed, capsys):
    root, _ = indexed
    args = ["query", "--index", str(root / "index"), "--k", "3", "--no-progress", "--sampling-steps", "10"]
    assert main([*args, "--query-steps", "90,50", "--prompt", PROMPTS[0]]) == 0
    out = capsys.readouterr().out
    assert "step t=90:" in out and "step t=50:" in out and "prompt 'a red square'" in out
    assert (
        main([*args, "--query-steps", "90,50", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--json"]) == 0
    )
    import json

    document = json.loads(capsys.readouterr().out)
    assert document["query_ids"] == ["sample-0@t=90", "sample-1@t=90", "sample-0@t=50", "sample-1@t=50"]
    assert len(document["results"]["tracin"]["indices"]) == 4
    assert main([*args, "--query-steps", "90"]) == 2  # a text model needs --prompt
    assert "give --prompt" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="give timesteps in"):
        parse_steps("900", 100)
