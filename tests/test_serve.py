"""`retrac serve`: every endpoint and every bad input, over FastAPI's test client and a live uvicorn.

Relations checked: an HTTP answer equals ``Attributor.attribute`` (and the JSON of ``retrac query
--json``) for the same images; a sample's "influenced" score for a query equals that query's
attribution score; a train vector read from the store equals the index row; a flood gets 503 with
Retry-After while the queue is full and the service keeps serving; concurrent requests share one
gradient batch; a client that disconnects leaves the service working; no request writes a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import uvicorn_in_thread  # noqa: E402
from retrac.data import load_dataset  # noqa: E402
from retrac.query.attribution import QueryEvents  # noqa: E402
from retrac.serve import AttributionService, ServeConfig, create_app  # noqa: E402
from retrac.serve.uploads import png_bytes  # noqa: E402

K = 5
METHODS = ("tracin", "retrac")


# ---------------------------------------------------------------------------------- fixtures
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(quick_demo):
    return {"dir": quick_demo, "before": _snapshot(quick_demo)}


@pytest.fixture(scope="module")
def service(demo):
    d = demo["dir"]
    return AttributionService.load(
        [d / "index-tracin", d / "index-retrac"],
        audit="memory",
        examples=[d / "heldout.npz", d / "generated.npz"],
        query_events=QueryEvents.preset("fast"),
        config=ServeConfig(max_k=50, max_images=4, max_upload_bytes=2**20, max_image_side=256),
    )


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def heldout(demo):
    return load_dataset(demo["dir"] / "heldout.npz")


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def _png(array_uint8: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_uint8).save(buffer, format="PNG")
    return buffer.getvalue()


def _as_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def _by_method(payload: dict) -> dict:
    assert payload["schema"] == "retrac.query"  # the document `retrac query --json` prints
    return payload["results"]


def _assert_same_result(http: dict, expected, rtol: float = 1e-4) -> None:
    """An HTTP result object equals an AttributionResult (scores up to batch float rounding)."""
    assert http["method"] == expected.method
    assert http["opponents"] == expected.opponents
    assert http["ids"] == expected.ids
    assert http["indices"] == expected.indices.tolist()
    np.testing.assert_allclose(np.array(http["scores"]), expected.scores, rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------------- descriptions
def test_health_indexes_and_openapi(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["methods"] == list(METHODS)
    info = client.get("/indexes").json()
    store = service.attributor.feature_store
    assert [x["method"] for x in info["indexes"]] == list(METHODS)
    for entry in info["indexes"]:
        assert entry["num_vectors"] == store.num_samples
        assert entry["dim"] == store.num_checkpoints * store.dim
        manifest = json.loads((Path(entry["directory"]) / "manifest.json").read_text())
        assert entry["recall"] == manifest.get("recall")  # measured at build (None for an exact Flat index)
    assert info["image_shape"] == [1, 8, 8] and info["class_conditional"] is False
    assert info["limits"]["max_k"] == 50 and info["audit"]["source"] == "memory"
    assert info["query_events"] == {"num_timesteps": 4, "num_noise": 1, "seed": 0}
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/attribute", "/audit", "/samples/{sample_id}", "/health", "/indexes", "/examples"):
        assert path in paths, path
    assert client.get("/docs").status_code == 200


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere


def test_examples_list_and_images(client, heldout):
    examples = client.get("/examples").json()
    ids = [e["id"] for e in examples]
    shown = min(len(heldout), ServeConfig().max_examples)  # the first max_examples of each file
    assert ids[:shown] == [f"heldout/{i}" for i in heldout.ids[:shown]]
    assert any(i.startswith("generated/") for i in ids)
    image = client.get(examples[0]["image_url"])
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert client.get("/examples/99999/image.png").status_code == 404


# ---------------------------------------------------------------------------------- attribution
def test_attribute_equals_attributor(client, service, heldout):
    images = heldout.images[:3]
    response = client.post("/attribute", files={"files": ("three.npy", _npy(images.numpy()))}, data={"k": K})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert set(_by_method(payload)) == set(METHODS)
    for method, result in _by_method(payload).items():
        _assert_same_result(result, service.attributor.attribute(images, K, method))
        assert result["thumbnails"][0][0] == f"/samples/{result['ids'][0][0]}/image.png"
    assert payload["query_ids"] == ["three.npy[0]", "three.npy[1]", "three.npy[2]"]
    assert len(payload["query_image_urls"]) == 3
    assert "gradients;dur=" in response.headers["server-timing"]
    one = client.post(
        "/attribute",
        files={"files": ("three.npy", _npy(images.numpy()))},
        data={"k": 3, "method": "retrac", "opponents": "true"},
    )
    assert one.status_code == 200
    assert list(_by_method(one.json())) == ["retrac"]  # one method: one entry, as `retrac query --json`
    assert 'batch;desc="0 images, 3 cached"' in one.headers["server-timing"]  # no gradients again
    _assert_same_result(
        one.json()["results"]["retrac"], service.attributor.attribute(images, 3, "retrac", opponents=True)
    )


def test_attribute_equals_cli_query_json(client, demo, heldout, tmp_path, capsys):
    from retrac.cli import main

    png = tmp_path / "query-digit.png"
    png.write_bytes(_png(_as_uint8(heldout.images[7])))
    d = demo["dir"]
    argv = ["query", "--index", str(d / "index-tracin"), "--index", str(d / "index-retrac")]
    assert main([*argv, "--images", str(png), "--k", "4", "--query-events", "fast", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    http = client.post(
        "/attribute", files={"files": (png.name, png.read_bytes(), "image/png")}, data={"k": 4}
    )
    assert http.status_code == 200

    def same(expected, got, where="") -> None:
        if isinstance(expected, dict):
            for key, value in expected.items():
                assert key in got, f"{where}.{key} missing over HTTP"
                same(value, got[key], f"{where}.{key}")
        elif isinstance(expected, list):
            assert len(expected) == len(got), where
            for i, (a, b) in enumerate(zip(expected, got, strict=True)):
                same(a, b, f"{where}[{i}]")
        elif isinstance(expected, float):
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), where
        else:
            assert expected == got, where

    same(cli, http.json())


def test_example_by_id_and_labels(client, service, heldout):
    example_id = f"heldout/{heldout.ids[2]}"
    response = client.post("/attribute", data={"examples": example_id, "k": K, "method": "tracin"})
    assert response.status_code == 200, response.text
    assert response.json()["query_ids"] == [example_id]
    _assert_same_result(
        response.json()["results"]["tracin"], service.attributor.attribute(heldout.images[2:3], K, "tracin")
    )
    unconditional = client.post("/attribute", data={"examples": example_id, "labels": "3"})
    assert unconditional.status_code == 422 and "unconditional" in unconditional.json()["detail"]
    assert client.post("/attribute", data={"examples": "heldout/no-such"}).status_code == 404


# ---------------------------------------------------------------------------------- bad input
def test_bad_uploads_get_clear_4xx(client, heldout):
    digit = heldout.images[0].numpy()
    nan = digit.copy()
    nan[0, 3, 3] = np.nan
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = {
        "text file": ({"files": ("notes.txt", b"hello, not an image")}, {}, 415, "not a PNG, JPEG or .npy"),
        "wrong size": ({"files": ("big.png", _png(np.zeros((16, 16), np.uint8)))}, {}, 422, "model takes"),
        "wrong channels": (
            {"files": ("rgb.png", _png(np.zeros((8, 8, 3), np.uint8)))},
            {},
            422,
            "model takes",
        ),
        "NaN array": ({"files": ("nan.npy", _npy(nan[None]))}, {}, 422, "NaN"),
        "out of range": ({"files": ("hot.npy", _npy(digit[None] * 3))}, {}, 422, "outside [-1, 1]"),
        "int64 array": ({"files": ("ints.npy", _npy(np.zeros((1, 8, 8), np.int64)))}, {}, 422, "dtype"),
        "pickled array": ({"files": ("obj.npy", pickled.getvalue())}, {}, 422, "Python objects"),
        "truncated npy": ({"files": ("cut.npy", _npy(digit[None])[:-40])}, {}, 422, "damaged"),
        "truncated png": (
            {"files": ("cut.png", _png(_as_uint8(heldout.images[0]))[:30])},
            {},
            422,
            "decoded",
        ),
        "5-d array": ({"files": ("5d.npy", _npy(np.zeros((1, 1, 1, 8, 8), np.float32)))}, {}, 422, "shape"),
        "too many images": (
            {"files": ("many.npy", _npy(np.zeros((5, 8, 8), np.float32)))},
            {},
            413,
            "at most 4",
        ),
        "huge image side": (
            {"files": ("wide.png", _png(np.zeros((8, 4000), np.uint8)))},
            {},
            413,
            "256 pixels",
        ),
        "no image": (None, {"k": 3}, 422, "no image given"),
        "huge k": ({"files": ("q.npy", _npy(digit[None]))}, {"k": 10**9}, 422, "k=1000000000"),
        "zero k": ({"files": ("q.npy", _npy(digit[None]))}, {"k": 0}, 422, "k=0"),
        "k not a number": ({"files": ("q.npy", _npy(digit[None]))}, {"k": "ten"}, 422, "k:"),
        "unknown method": (
            {"files": ("q.npy", _npy(digit[None]))},
            {"method": "magic"},
            422,
            "no index of method",
        ),
        "bad labels": ({"files": ("q.npy", _npy(digit[None]))}, {"labels": "x,y"}, 422, "labels"),
    }
    for name, (files, data, status, words) in cases.items():
        response = client.post("/attribute", files=files, data=data)
        assert response.status_code == status, (name, response.status_code, response.text)
        detail = response.json()["detail"]
        assert words in detail, (name, detail)
        assert "Traceback" not in response.text
    assert client.get("/health").json()["status"] == "ok"


def test_request_body_limits(client):
    too_big = b"\x93NUMPY" + b"\0" * (2**20 + 10)
    declared = client.post("/attribute", files={"files": ("big.npy", too_big)})
    assert declared.status_code == 413 and "limit of 1048576 bytes" in declared.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    streamed = client.post(
        "/attribute", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert streamed.status_code == 413


def test_unknown_ids_get_404(client):
    assert client.get("/samples/no-such-digit").status_code == 404
    assert client.get("/samples/no-such-digit/image.png").status_code == 404
    assert client.get("/queries/0123456789abcdef/image.png").status_code == 404
    assert "no training sample" in client.get("/samples/no-such-digit").json()["detail"]


# ---------------------------------------------------------------------------------- samples
def test_sample_shows_the_queries_it_influences(client, service, heldout):
    images = heldout.images[10:12]
    answer = client.post("/attribute", files={"files": ("pair.npy", _npy(images.numpy()))}, data={"k": K})
    results = _by_method(answer.json())
    top = results["retrac"]["ids"][0][0]
    info = client.get(f"/samples/{top}").json()
    assert info["id"] == top and info["row"] == service.train.ids.index(top)
    assert info["label"] == int(service.train.labels[info["row"]]) and info["duplicates"] >= 1
    assert client.get(info["image_url"]).content.startswith(b"\x89PNG")
    assert info["queries_considered"] >= 2
    for method in METHODS:
        scores = {row["query_id"]: row["score"] for row in info["influenced"][method]}
        rank = results[method]["ids"][0].index(top) if top in results[method]["ids"][0] else None
        if rank is not None:  # I(z, z') seen from the sample equals the query's attribution score
            assert scores["pair.npy[0]"] == pytest.approx(
                results[method]["scores"][0][rank], rel=1e-4, abs=1e-7
            )
        listed = [row["score"] for row in info["influenced"][method]]
        assert listed == sorted(listed, reverse=True)
    query_image = client.get(answer.json()["query_image_urls"][0])
    assert query_image.status_code == 200 and query_image.content == png_bytes(images[0])


def test_train_vector_from_the_store_equals_the_index_row(service):
    for method in METHODS:
        index = service._loaded[method].index.index  # the demo's indexes are exact Flat indexes
        for row in (0, 777, service.num_samples - 1):
            np.testing.assert_allclose(
                service._train_vector(method, row), index.reconstruct(row), rtol=1e-5, atol=1e-7
            )


# ---------------------------------------------------------------------------------- audit
def test_audit_records_match_the_audit_module(client, service, heldout):
    from retrac.audit import audit_images

    copy_row = 123
    training_image = service.train.images[copy_row].numpy()
    files = {"files": ("two.npy", _npy(np.stack([heldout.images[4].numpy(), training_image])))}
    response = client.post("/audit", files=files, data={"k": K})
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    expected = audit_images(
        torch.from_numpy(np.stack([heldout.images[4].numpy(), training_image])),
        service.pixel_index,
        service.attributor,
        type(service.audit_config)(k=K),
        ["two.npy[0]", "two.npy[1]"],
    ).records
    for got, want in zip(records, expected, strict=True):
        for key in ("verdict", "nearest_id", "nearest_row", "nearest_duplicates"):
            assert got[key] == want[key]
        assert got["relative_distance"] == pytest.approx(want["relative_distance"])
        for method in METHODS:
            assert got["proponents"][method]["ids"] == want["proponents"][method]["ids"]
            assert got["proponents"][method]["nn_rank"] == want["proponents"][method]["nn_rank"]
    copy = records[1]
    assert copy["verdict"] == "copy" and copy["nn_distance"] == 0.0
    assert service.pixel_index.groups[copy["nearest_row"]] == service.pixel_index.groups[copy_row]
    assert copy["nearest"][0]["image_url"].startswith("/samples/")


def test_audit_without_a_pixel_index_is_409(service):
    bare = AttributionService(service.attributor, service.train, service.config)
    with TestClient(create_app(bare)) as test_client:
        response = test_client.post(
            "/audit", files={"files": ("q.npy", _npy(service.train.images[:1].numpy()))}
        )
        assert response.status_code == 409 and "--audit" in response.json()["detail"]
        assert test_client.get("/indexes").json()["audit"] is None


def test_audit_option_reads_an_audit_folder_and_refuses_others(service, tmp_path):
    from retrac.audit import PixelIndex
    from retrac.errors import ConfigError
    from retrac.serve.loading import load_audit

    folder = tmp_path / "pixels"
    PixelIndex.load_or_build(folder, service.train)  # what `retrac audit` caches
    loaded, config, source = load_audit(folder, service.train)
    assert loaded.num_distinct == service.pixel_index.num_distinct and source == str(folder.resolve())
    audit_out = tmp_path / "audit"
    audit_out.mkdir()
    summary = {"pixel_index": str(folder), "thresholds": {"copy": 0.1, "near": 0.3}, "num_neighbours": 20}
    (audit_out / "summary.json").write_text(json.dumps(summary))
    _, config, _ = load_audit(audit_out, service.train)
    assert (config.copy_threshold, config.near_threshold, config.num_neighbours) == (0.1, 0.3, 20)
    with pytest.raises(ConfigError, match="neither"):
        load_audit(tmp_path / "empty", service.train)


# ---------------------------------------------------------------------------------- live server
@contextlib.contextmanager
def _live(service):
    try:
        with uvicorn_in_thread(create_app(service)) as port:
            yield f"http://127.0.0.1:{port}", port
    finally:
        service.close()


class _Gate:
    """Wraps a service's gradient computation so that the test decides when it may finish."""

    def __init__(self, service) -> None:
        self.compute, self.opened, self.batches = service.batcher.compute, threading.Event(), []
        service.batcher.compute = self

    def __call__(self, images, labels):
        self.batches.append(int(images.shape[0]))
        assert self.opened.wait(60), "the test never opened the gate"
        return self.compute(images, labels)


def _wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _fresh(service, **limits) -> AttributionService:
    config = ServeConfig(**{**service.config.to_dict(), "cache_queries": 0, **limits})
    return AttributionService(service.attributor, service.train, config)


def test_concurrent_requests_share_one_gradient_batch(service, heldout):
    live_service = _fresh(service, batch_window_ms=5.0, max_batch_images=8)
    gate = _Gate(live_service)
    answers = {}
    with _live(live_service) as (url, _):

        def ask(i: int) -> None:
            body = {"files": (f"q{i}.npy", _npy(heldout.images[i : i + 1].numpy()))}
            answers[i] = httpx.post(
                f"{url}/attribute", files=body, data={"k": K, "method": "retrac"}, timeout=120
            )

        first = threading.Thread(target=ask, args=(20,))
        first.start()
        _wait_for(lambda: live_service.batcher.computing, "the first batch")
        others = [threading.Thread(target=ask, args=(i,)) for i in (21, 22, 23)]
        for thread in others:
            thread.start()
        _wait_for(lambda: live_service.batcher.pending_images == 3, "three waiting requests")
        gate.opened.set()
        for thread in [first, *others]:
            thread.join(120)
    assert gate.batches == [1, 3]  # the three that waited together ran as one batch
    for i, response in answers.items():
        assert response.status_code == 200
        assert 'batch;desc="3 images' in response.headers["server-timing"] or i == 20
        _assert_same_result(
            response.json()["results"]["retrac"],
            service.attributor.attribute(heldout.images[i : i + 1], K, "retrac"),
        )


def test_flood_gets_503_with_retry_after_and_service_recovers(service, heldout):
    live_service = _fresh(service, max_images=2, max_pending_images=2, max_batch_images=1, retry_after_s=2)
    gate = _Gate(live_service)
    statuses = {}
    with _live(live_service) as (url, _):

        def ask(i: int) -> None:
            body = {"files": (f"q{i}.npy", _npy(heldout.images[i : i + 1].numpy()))}
            statuses[i] = httpx.post(f"{url}/attribute", files=body, data={"k": K}, timeout=120)

        threads = [threading.Thread(target=ask, args=(30,))]
        threads[0].start()
        _wait_for(lambda: live_service.batcher.computing, "the first batch")
        threads += [threading.Thread(target=ask, args=(i,)) for i in (31, 32)]
        for thread in threads[1:]:
            thread.start()
        _wait_for(lambda: live_service.batcher.pending_images == 2, "a full queue")
        refused = httpx.post(
            f"{url}/attribute", files={"files": ("q.npy", _npy(heldout.images[33:34].numpy()))}
        )
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2" and "queue is full" in refused.json()["detail"]
        assert httpx.get(f"{url}/health").json()["queue"]["pending_images"] == 2  # bounded, still answering
        gate.opened.set()
        for thread in threads:
            thread.join(120)
        assert all(statuses[i].status_code == 200 for i in (30, 31, 32))
        again = httpx.post(
            f"{url}/attribute", files={"files": ("q.npy", _npy(heldout.images[33:34].numpy()))}
        )
        assert again.status_code == 200
        assert httpx.get(f"{url}/health").json()["batcher"]["refused_busy"] == 1


def test_client_disconnects_leave_the_service_working(service, heldout):
    live_service = _fresh(service)
    gate = _Gate(live_service)
    body = _npy(heldout.images[40:41].numpy())
    boundary = "retrac-test-boundary"
    multipart = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="q.npy"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /attribute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(multipart)}\r\n\r\n"
    ).encode()
    with _live(live_service) as (url, port):
        with socket.create_connection(("127.0.0.1", port)) as half:  # gone in the middle of the body
            half.sendall(head + multipart[: len(multipart) // 2])
        with socket.create_connection(("127.0.0.1", port)) as early:  # gone while its gradients are computed
            early.sendall(head + multipart)
            _wait_for(lambda: live_service.batcher.computing, "the abandoned request's batch")
        gate.opened.set()
        _wait_for(lambda: not live_service.batcher.computing, "the abandoned batch to end")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        fine = httpx.post(
            f"{url}/attribute", files={"files": ("q.npy", body)}, data={"k": K, "method": "tracin"}
        )
        assert fine.status_code == 200
        _assert_same_result(
            fine.json()["results"]["tracin"], service.attributor.attribute(heldout.images[40:41], K, "tracin")
        )


# ---------------------------------------------------------------------------------- command line
def test_demo_prints_a_serve_command_that_parses(demo):
    from retrac.cli import build_parser

    summary = json.loads((demo["dir"] / "demo.json").read_text())
    command = shlex.split(summary["serve"])
    assert command[:2] == ["retrac", "serve"]
    args = build_parser().parse_args(command[1:])
    assert args.index == [summary["indexes"]["retrac"], summary["indexes"]["tracin"]]  # one store per service
    assert args.examples == [summary["heldout"], summary["generated"]] and args.audit == "memory"
    assert all(Path(p).exists() for p in args.examples)


def test_serve_command_refuses_bad_options(demo, capsys):
    from retrac.cli import main

    d = demo["dir"]
    assert main(["serve", "--index", str(d / "index-retrac"), "--max-k", "0"]) == 2
    assert "max_k=0" in capsys.readouterr().err
    assert main(["serve", "--index", str(d / "no-such-index")]) == 2
    assert "no-such-index" in capsys.readouterr().err
    assert main(["serve", "--index", str(d / "index-retrac"), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err


def test_no_request_wrote_to_the_demo_folder(demo, client):
    client.get("/health")
    assert _snapshot(demo["dir"]) == demo["before"]
    assert not list(Path(demo["dir"]).glob("pixel-index-*"))  # --audit memory caches nothing
