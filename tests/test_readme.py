"""Every command in the README's ```bash blocks, checked against the CLI on the quick demo.

Each block runs in a fresh folder laid out as the README assumes: ``DIR`` (a copy of the quick demo),
``ckpts/checkpoint-250`` and ``ckpts/checkpoint-500`` (its first two checkpoints), ``train.npz`` (64 of
its training digits), ``queries/``, ``queries.npz``, ``outputs/`` and ``digit.png`` (held-out digits).
``retrac`` commands over local files run as written (``--generate N`` shrunk to 4) and must exit 0;
the others (``retrac serve``, object-storage URLs, ``torchrun`` / ``srun`` workers, folders of models
this suite does not have) are parsed by the real parser, which refuses any unknown flag. ``make``
targets and variables must exist in the Makefile, ``pip`` extras in pyproject.toml. No README command
may use a deprecated spelling.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrac.cli import build_parser, main
from retrac.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN_VERBS = ("index", "build", "query", "report", "audit", "verify")
INPUT_OPTIONS = (
    "--checkpoint",
    "--data",
    "--images",
    "--store",
    "--index",
    "--examples",
    "--outliers",
    "--labels",
)
SHRINK = {"--generate": "4"}
_ENV = re.compile(r"^\$\{?[A-Z_]+\}?$")


def readme_commands() -> list[tuple[int, list[str]]]:
    """``(block number, tokens)`` of every command in the README's bash blocks (continuations joined)."""
    commands = []
    for number, block in enumerate(re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL)):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append((number, tokens))
    return commands


def retrac_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``retrac`` (``retrac ...``, ``srun retrac ...``, ``torchrun ... -m retrac ...``)."""
    for i, token in enumerate(tokens):
        if token == "retrac" or token.endswith("/retrac"):
            return tokens[i + 1 :]
    return None


def _png(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def layout(quick_demo, tmp_path_factory):
    """What every block's folder holds (DIR is one shared copy: README commands only read it)."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(quick_demo, root / "demo")
    heldout = load_dataset(quick_demo / "heldout.npz")
    checkpoints = sorted((quick_demo / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))
    files = root / "files"
    for name, source in (("checkpoint-250", checkpoints[0]), ("checkpoint-500", checkpoints[1])):
        shutil.copytree(source, files / "ckpts" / name)
    load_dataset(quick_demo / "train.npz").subset(range(64)).save_npz(files / "train.npz")
    heldout.subset(range(2)).save_npz(files / "queries.npz")
    for i in range(2):
        _png(files / "queries" / f"q{i}.png", heldout.images[i])
        _png(files / "outputs" / f"o{i}.png", heldout.images[2 + i])
    _png(files / "digit.png", heldout.images[4])
    return root


def _block_folder(layout: Path, number: int) -> Path:
    folder = layout / f"block-{number}"
    if not folder.exists():
        shutil.copytree(layout / "files", folder)
        (folder / "DIR").symlink_to(layout / "demo", target_is_directory=True)
    return folder


def _runnable(argv: list[str], folder: Path) -> bool:
    if not argv or argv[0] not in RUN_VERBS or any("://" in a for a in argv) or "--shard" in argv:
        return False
    inputs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in INPUT_OPTIONS]
    if argv[0] == "verify":
        inputs.append(argv[1])
    return all((folder / path.split("=")[0]).exists() for path in inputs)


def test_readme_commands(layout, capsys, monkeypatch):
    commands = readme_commands()
    assert commands, "no ```bash block in README.md"
    makefile = (ROOT / "Makefile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ran, parsed = [], []
    for number, tokens in commands:
        argv = retrac_argv(tokens)
        if tokens[0] == "make":
            for word in tokens[1:]:
                if "=" in word:
                    assert re.search(rf"^{word.split('=')[0]} \?=", makefile, re.M), word
                else:
                    assert re.search(rf"^{re.escape(word)}:", makefile, re.M), f"make {word}: no such target"
            continue
        if "pip" in tokens[0] and "install" in tokens:
            for extra in re.findall(r"\.\[(\w+)\]", " ".join(tokens)):
                assert re.search(rf"^{extra} = \[", pyproject, re.M), (
                    f"pip extra [{extra}] not in pyproject.toml"
                )
            continue
        if argv is None:
            continue  # export, curl, #SBATCH lines: not retrac commands
        command = shlex.join(["retrac", *argv])
        if argv == ["--version"]:
            with pytest.raises(SystemExit) as exited:
                main(argv)
            assert exited.value.code == 0
            continue
        folder = _block_folder(layout, number)
        monkeypatch.chdir(folder)
        capsys.readouterr()
        argv = [_ENV.sub("1", a) for a in argv]  # $SLURM_CPUS_PER_TASK and the like: any value parses
        if _runnable(argv, folder):
            argv = [SHRINK.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
            code = main([*argv, *([] if "--threads" in argv else ["--threads", "1"])])
            err = capsys.readouterr().err
            assert code == 0, f"README command failed: {command}\n{err}"
            ran.append(argv[0])
        else:
            with pytest.raises(SystemExit) if "--help" in argv else _no_exit(command):
                build_parser().parse_args(argv)
            err = capsys.readouterr().err
            parsed.append(argv[0])
        assert "deprecated" not in err, f"README uses a deprecated spelling: {command}\n{err}"
    monkeypatch.chdir(ROOT)
    assert {"index", "build", "query", "report", "audit"} <= set(ran), f"ran {ran}, parsed only {parsed}"


class _no_exit:
    """Fail with the command when the parser exits (an unknown flag, a missing argument)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is SystemExit:
            pytest.fail(f"README command does not parse: {self.command}")
        return False


def test_commands_are_found():
    """The extraction itself: continuation lines joined, comments dropped, workers' retrac found."""
    commands = [tokens for _, tokens in readme_commands()]
    assert ["make", "demo"] in commands
    assert any(retrac_argv(t) and retrac_argv(t)[0] == "index" and t[0] == "torchrun" for t in commands)
    assert all("#" not in " ".join(t) for t in commands if t[0] == "retrac")
