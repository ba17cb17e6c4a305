"""End to end: a tiny Stable-Diffusion-like pipeline folder -> retrac index -> build -> query --prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_scheduler, make_tiny_unet
from retrac.checkpoints import save_checkpoint
from retrac.cli import main
from retrac.query.attribution import Attributor, QueryEvents
from t2i_models import make_cond_unet, make_text_encoder, make_tokenizer, make_vae, save_pipeline

CAPTIONS = {
    "a.png": "a red square",
    "b.png": "a blue circle",
    "c.png": "a green cross",
    "d.png": "a red circle",
}


def image_folder(folder, captions: dict[str, str], seed: int = 0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for name in captions:
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    lines = [json.dumps({"file_name": name, "text": text}) for name, text in captions.items()]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """The pipeline folder, saved with save_pretrained part by part, indexed and built through the CLI."""
    root = tmp_path_factory.mktemp("t2i-cli")
    folder = save_pipeline(
        root / "sd-tiny",
        make_cond_unet(),
        make_scheduler(),
        vae=make_vae(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(root / "vocab"),
    )
    train = image_folder(root / "train", CAPTIONS)
    common = ["--no-progress", "--threads", "1"]
    store, index = root / "store", root / "index"
    args = ["index", "--checkpoint", str(folder), "--data", str(train), "--out", str(store)]
    assert main([*args, "--events", "uniform:2", "--dim", "32", *common]) == 0
    assert main(["build", "--store", str(store), "--out", str(index), "--method", "retrac", *common]) == 0
    return root, folder, train, index


def test_index_reports_the_latent_and_text_parts(pipeline_run, tmp_path, capsys):
    root, folder, train, _ = pipeline_run
    args = ["index", "--checkpoint", str(folder), "--data", str(train), "--out", str(tmp_path / "s")]
    assert main([*args, "--events", "uniform:1", "--dim", "8", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "latent model: AutoencoderKL" in out and "mean x 0.18215" in out
    assert "text conditioning: CLIPTextModel + CLIPTokenizer" in out


def test_query_by_prompt_matches_the_python_api(pipeline_run, capsys):
    root, _, train, index = pipeline_run
    queries = image_folder(root / "queries", {"q.png": "a red square"}, seed=9)
    capsys.readouterr()
    command = [
        "query",
        "--index",
        str(index),
        "--images",
        str(queries),
        "--k",
        "3",
        "--json",
        "--threads",
        "1",
    ]
    assert main([*command, "--prompt", "a red square"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query_ids"] == ["q.png"]
    got = document["results"]["retrac"]
    from retrac.data import load_dataset

    expected = Attributor(index, query_events=QueryEvents(), progress=False).attribute(
        load_dataset(queries).images, k=3, prompts="a red square"
    )
    assert got["indices"] == expected.indices.tolist()
    np.testing.assert_allclose(got["scores"], expected.scores, rtol=1e-5)
    assert set(got["ids"][0]) <= set(CAPTIONS)
    # without --prompt the query folder's own captions are the prompts
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["results"]["retrac"]["indices"] == got["indices"]
    # another prompt, another query
    assert main([*command, "--prompt", "a green cross"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["retrac"]["scores"] != got["scores"]


def test_bad_text_inputs_are_one_line_errors(pipeline_run, tmp_path, capsys):
    root, folder, train, index = pipeline_run
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(bare / "x.png")
    command = [
        "query",
        "--index",
        str(index),
        "--images",
        str(bare),
        "--k",
        "2",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert main(command) == 2
    assert "text-conditioned; give the queries' prompts (--prompt)" in capsys.readouterr().err
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(small / "x.png")
    assert main(["query", "--index", str(index), "--images", str(small), "--prompt", "a", "--k", "2"]) == 2
    assert "the VAE takes (B, 3, 16, 16)" in capsys.readouterr().err
    missing = image_folder(tmp_path / "missing", {"a.png": "one"})
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(missing / "b.png")
    args = ["index", "--checkpoint", str(folder), "--data", str(missing), "--out", str(tmp_path / "s")]
    assert main([*args, "--no-progress", "--dim", "8"]) == 2
    assert "no 'text' caption for 1 image(s), first 'b.png'" in capsys.readouterr().err
    # a prompt on an unconditional model
    pixel = save_checkpoint(make_tiny_unet(channels=3, size=16), make_scheduler(), tmp_path / "pixel")
    args = ["index", "--checkpoint", str(pixel), "--data", str(train), "--out", str(tmp_path / "p")]
    assert main([*args, "--no-progress", "--dim", "8", "--events", "uniform:1", "--threads", "1"]) == 0
    assert (
        main(["build", "--store", str(tmp_path / "p"), "--out", str(tmp_path / "pi"), "--no-progress"]) == 0
    )
    capsys.readouterr()
    query = ["query", "--index", str(tmp_path / "pi"), "--images", str(bare), "--k", "2", "--no-progress"]
    assert main([*query, "--prompt", "a red square"]) == 2
    assert "not text-conditioned" in capsys.readouterr().err


def test_a_lora_run_through_the_cli(pipeline_run, tmp_path, capsys):
    from test_lora import save_lora, with_adapter

    root, folder, train, _ = pipeline_run
    adapted = with_adapter(make_cond_unet(), seed=3)
    count = sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)
    lora = save_lora(adapted, tmp_path / "lora" / "checkpoint-5")
    args = ["index", "--checkpoint", str(lora), "--data", str(train), "--out", str(tmp_path / "s")]
    assert main([*args, "--no-progress", "--dim", "8", "--events", "uniform:1"]) == 2
    assert "give the base model they were trained on with --base-model" in capsys.readouterr().err
    assert (
        main([*args, "--base-model", str(folder), "--no-progress", "--dim", "8", "--events", "uniform:1"])
        == 0
    )
    assert f"LoRA: {count:,} adapter parameters count" in capsys.readouterr().out
    assert main(["build", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "i"), "--no-progress"]) == 0
    query = ["query", "--index", str(tmp_path / "i"), "--images", str(train), "--k", "2", "--json"]
    assert main([*query, "--no-progress"]) == 0
    (result,) = json.loads(capsys.readouterr().out.splitlines()[-1])["results"].values()
    assert len(result["indices"]) == 4  # the training folder's captions are the prompts


def test_audit_generates_from_prompts_and_attributes_under_them(pipeline_run, tmp_path, capsys):
    root, _, train, index = pipeline_run
    common = ["--index", str(index), "--k", "2", "--neighbours", "2", "--no-progress", "--threads", "1"]
    args = ["audit", *common, "--generate", "3", "--prompt", "a red square", "--prompt", "a blue circle"]
    assert main([*args, "--sampling-steps", "5", "--out", str(tmp_path / "gen"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 3
    generated = np.load(tmp_path / "gen" / "generated.npz")["images"]
    assert generated.shape == (3, 3, 16, 16) and np.abs(generated).max() <= 1  # decoded by the VAE
    # given images are attributed under their own captions (metadata.jsonl), or one prompt for all
    assert main(["audit", *common, "--images", str(train), "--out", str(tmp_path / "given"), "--json"]) == 0
    by_captions = json.loads(capsys.readouterr().out)
    assert by_captions["num_images"] == 4
    args = [
        "audit",
        *common,
        "--images",
        str(train),
        "--prompt",
        "x",
        "--prompt",
        "y",
        "--out",
        str(tmp_path / "b"),
    ]
    assert main(args) == 2
    assert "2 prompts for 4 images" in capsys.readouterr().err


def test_report_measures_a_text_model_under_the_captions(pipeline_run, tmp_path, capsys):
    from retrac.bias import measure_bias
    from retrac.data import load_dataset

    root, _, train, index = pipeline_run
    args = [
        "report",
        "--index",
        str(index),
        "--images",
        str(train),
        "--k",
        "2",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "by-captions"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == "retrac.report"
    assert main([*args, "--out", str(tmp_path / "one"), "--prompt", "a green cross"]) == 0
    assert (tmp_path / "one" / "bias.json").is_file()
    # the measurement takes the prompts: the captions and one prompt for all give other scores
    images = load_dataset(train)
    attributor = Attributor(index, progress=False)
    by_captions = measure_bias(attributor, images.images, 2, prompts=images.captions).results["retrac"]
    one_prompt = measure_bias(attributor, images.images, 2, prompts="a green cross").results["retrac"]
    assert not np.allclose(by_captions.scores, one_prompt.scores)


def test_a_class_conditional_dit_pipeline_with_a_vae(tmp_path, capsys):
    from diffusers import DDIMScheduler

    from retrac.data import ImageDataset
    from t2i_models import make_dit

    folder = tmp_path / "dit"
    folder.mkdir()
    make_dit().save_pretrained(str(folder / "transformer"))
    make_vae().save_pretrained(str(folder / "vae"))
    DDIMScheduler(num_train_timesteps=100).save_pretrained(str(folder / "scheduler"))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    data = ImageDataset(
        torch.from_numpy(images / 127.5 - 1).float().permute(0, 3, 1, 2),
        [f"x{i}" for i in range(6)],
        torch.tensor([0, 1, 2, 0, 1, 2]),
        source="dit",
    )
    data.save_npz(tmp_path / "train.npz")
    args = [
        "index",
        "--checkpoint",
        str(folder),
        "--data",
        str(tmp_path / "train.npz"),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*args, "--events", "uniform:1", "--dim", "16", "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "latent model: AutoencoderKL" in out and "not covered" in out  # the class-embedding tables
    assert main(["build", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "i"), "--no-progress"]) == 0
    capsys.readouterr()
    query = ["query", "--index", str(tmp_path / "i"), "--images", str(tmp_path / "train.npz"), "--k", "2"]
    assert main([*query, "--json", "--no-progress"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"].values()
    assert len(result["indices"]) == 6
    assert main([*query, "--prompt", "a cat", "--no-progress"]) == 2
    assert "not text-conditioned" in capsys.readouterr().err
