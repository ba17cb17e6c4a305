"""`retrac serve` on a latent text-to-image index: a tiny Stable-Diffusion-like pipeline folder.

Relations checked: an HTTP answer with a prompt equals ``Attributor.attribute`` with the same prompt
(uploads are pixels, encoded through the VAE as the Python API encodes them); another prompt gives
other scores; a text model without a prompt, or an image the VAE does not take, is a clear 4xx;
``GET /indexes`` says that the model needs a prompt, and the page offers the prompt box.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from conftest import make_scheduler  # noqa: E402
from retrac.cli import main  # noqa: E402
from retrac.data import load_dataset  # noqa: E402
from retrac.query.attribution import Attributor, QueryEvents  # noqa: E402
from retrac.serve import AttributionService, ServeConfig, create_app  # noqa: E402
from t2i_models import make_cond_unet, make_text_encoder, make_tokenizer, make_vae, save_pipeline  # noqa: E402
from test_t2i_cli import CAPTIONS, image_folder  # noqa: E402

K = 3
EVENTS = QueryEvents(num_timesteps=2, num_noise=1)


@pytest.fixture(scope="module")
def text_index(tmp_path_factory):
    """A latent, text-conditioned pipeline folder indexed and built through the CLI; a query folder."""
    root = tmp_path_factory.mktemp("serve-text")
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
    assert main([*args, "--events", "uniform:2", "--dim", "16", *common]) == 0
    assert main(["build", "--store", str(store), "--out", str(index), "--method", "retrac", *common]) == 0
    queries = load_dataset(image_folder(root / "queries", {"q.png": "a red square"}, seed=9))
    return index, queries


@pytest.fixture(scope="module")
def service(text_index):
    index, _ = text_index
    return AttributionService.load(
        [index], audit="memory", query_events=EVENTS, config=ServeConfig(max_k=4, max_images=4)
    )


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as test_client:
        yield test_client


def _png(image) -> bytes:
    """One ``(C, H, W)`` image in ``[-1, 1]`` as the PNG a browser would upload."""
    array = ((np.asarray(image) + 1) * 127.5).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.moveaxis(array, 0, -1)).save(out, format="PNG")
    return out.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def test_indexes_say_the_model_takes_pixels_and_a_prompt(client, service):
    info = client.get("/indexes").json()
    task = service.attributor.task
    assert task.is_latent and task.is_text_conditional
    assert info["image_shape"] == list(task.image_shape) == [3, 16, 16]  # pixels, the VAE's input
    assert info["latent_shape"] == list(task.sample_shape) == [4, 8, 8]
    assert info["text_conditional"] is True and info["class_conditional"] is False
    page = client.get("/").text
    script = client.get("/static/app.js").text
    assert 'id="prompt"' in page and "prompt-box" in page
    assert "info.text_conditional" in script and 'form.append("prompt"' in script


def test_attribute_with_a_prompt_equals_the_attributor(client, text_index):
    index, queries = text_index
    image = queries.images[0]
    response = client.post(
        "/attribute", files={"files": ("q.png", _png(image))}, data={"k": K, "prompt": "a red square"}
    )
    assert response.status_code == 200, response.text
    got = response.json()["results"]["retrac"]
    # an independent Attributor over the same index, the same decoded pixels and the same prompt
    sent = queries.images[:1]  # what the PNG decodes to (uint8 round trip)
    expected = Attributor(index, query_events=EVENTS, progress=False).attribute(
        sent, k=K, prompts="a red square"
    )
    assert got["indices"] == expected.indices.tolist() and got["ids"] == expected.ids
    np.testing.assert_allclose(got["scores"], expected.scores, rtol=1e-4, atol=1e-7)
    assert response.json()["query_ids"] == ["q.png"]
    # the prompt is used: another prompt, other scores (and no cache hit on the same pixels)
    other = client.post(
        "/attribute", files={"files": ("q.npy", _npy(sent.numpy()))}, data={"k": K, "prompt": "a green cross"}
    )
    assert other.status_code == 200, other.text
    assert 'batch;desc="1 images, 0 cached"' in other.headers["server-timing"]
    expected_other = Attributor(index, query_events=EVENTS, progress=False).attribute(
        sent, k=K, prompts="a green cross"
    )
    np.testing.assert_allclose(
        other.json()["results"]["retrac"]["scores"], expected_other.scores, rtol=1e-4, atol=1e-7
    )
    assert not np.allclose(other.json()["results"]["retrac"]["scores"], got["scores"])


def test_audit_takes_the_prompt(client, text_index):
    _, queries = text_index
    files = {"files": ("q.png", _png(queries.images[0]))}
    response = client.post("/audit", files=files, data={"k": K, "prompt": "a red square"})
    assert response.status_code == 200, response.text
    record = response.json()["records"][0]
    assert record["verdict"] in ("copy", "near", "novel") and len(record["proponents"]["retrac"]["ids"]) == K
    missing = client.post("/audit", files=files, data={"k": K})
    assert missing.status_code == 422 and "text-conditioned" in missing.json()["detail"]


def test_bad_text_requests_get_clear_4xx(client, text_index):
    _, queries = text_index
    png = {"files": ("q.png", _png(queries.images[0]))}
    cases = {
        "no prompt": (png, {"k": K}, "give a prompt"),
        "blank prompt": (png, {"k": K, "prompt": "   "}, "give a prompt"),
        "labels on a text model": (png, {"k": K, "prompt": "a red square", "labels": "1"}, "drop the labels"),
        "latent-sized image": (
            {"files": ("small.png", _png(queries.images[0][:, ::2, ::2]))},
            {"k": K, "prompt": "a red square"},
            "the VAE",
        ),
        "latents instead of pixels": (
            {"files": ("latents.npy", _npy(np.zeros((1, 4, 8, 8), np.float32)))},
            {"k": K, "prompt": "a red square"},
            "the VAE",
        ),
    }
    for name, (files, data, phrase) in cases.items():
        response = client.post("/attribute", files=files, data=data)
        assert response.status_code == 422, (name, response.status_code, response.text)
        assert phrase in response.json()["detail"], (name, response.json()["detail"])
