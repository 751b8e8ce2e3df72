"""`vibevoice-mlx comfyui install PATH`: a loader folder in ComfyUI's `custom_nodes/` that imports this package.

No code is copied: the loader re-exports `vibevoice_mlx.comfyui`, so upgrading the package upgrades the nodes.
It needs vibevoice-mlx installed in the Python that runs ComfyUI, and says so when it is not.
"""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Iterator, Optional

import click

from .models import FOLDER_KIND

LOADER_NAME = "vibevoice-mlx"  # not an importable name: ComfyUI puts the folder into sys.modules under it
MARKER = "vibevoice-mlx ComfyUI loader"
# Files an installed loader may hold; a folder with anything else is the user's, and is not deleted.
OWN_FILES = {"__init__.py", "__pycache__"}

LOADER = Template('''"""$marker, written by `vibevoice-mlx comfyui install` (remove it with `--uninstall`).

The nodes live in the installed vibevoice_mlx package; this folder only re-exports them.
"""

import sys

try:
    from vibevoice_mlx.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("vibevoice_mlx"):
        raise
    raise ImportError(f"vibevoice-mlx is not installed in the Python that runs ComfyUI ({sys.executable}): "
                      f"run `{sys.executable} -m pip install $source` and restart ComfyUI.") from None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
''')

# Where ComfyUI's own Python usually is: a venv in the folder, or the Windows portable build's embedded one.
COMFY_PYTHONS = ("venv/bin/python", ".venv/bin/python", "venv/Scripts/python.exe", ".venv/Scripts/python.exe",
                 "../python_embeded/python.exe")


class InstallError(ValueError):
    """A ComfyUI folder the loader cannot be written to or removed from as asked; the message says the fix."""


def package_source() -> str:
    """What `pip install` takes to install this package: its source folder for a source checkout."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "vibevoice-mlx"' in pyproject.read_text():
        return shlex.quote(str(root))
    return "vibevoice-mlx"


def _custom_nodes(root: Path) -> Path:
    custom = Path(root).expanduser() / "custom_nodes"
    if not custom.is_dir():
        raise InstallError(f"{root} is not a ComfyUI folder (it has no custom_nodes/): pass the folder that holds "
                           "ComfyUI's main.py.")
    return custom


def is_loader(folder: Path) -> bool:
    """True for a loader folder written by `install`, holding nothing of the user's."""
    init = folder / "__init__.py"
    try:
        return folder.is_dir() and {p.name for p in folder.iterdir()} <= OWN_FILES and MARKER in init.read_text()
    except OSError:
        return False


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def install_loader(root: Path, force: bool = False) -> Path:
    """Write `custom_nodes/vibevoice-mlx/__init__.py` into the ComfyUI folder `root`, and create the model folder
    `models/vibevoice/` (`convert --mlx-path` writes into it); returns the loader folder.

    A previous loader is replaced; anything else at that path only with `force`.
    """
    target = _custom_nodes(root) / LOADER_NAME
    if target.exists() or target.is_symlink():
        if not is_loader(target) and not force:
            raise InstallError(f"{target} exists and was not written by vibevoice-mlx: move it away, or pass "
                               "--force to replace it.")
        _remove(target)
    target.mkdir()
    (target / "__init__.py").write_text(LOADER.substitute(marker=MARKER, source=package_source()))
    model_folder(root).mkdir(parents=True, exist_ok=True)
    return target


def model_folder(root: Path) -> Path:
    return Path(root).expanduser() / "models" / FOLDER_KIND


def uninstall_loader(root: Path, force: bool = False) -> Path:
    """Remove the loader folder from the ComfyUI folder `root`; returns the path removed."""
    target = _custom_nodes(root) / LOADER_NAME
    if not (target.exists() or target.is_symlink()):
        raise InstallError(f"Nothing to remove: {target} does not exist.")
    if not is_loader(target) and not force:
        raise InstallError(f"{target} was not written by vibevoice-mlx (or holds other files): remove it yourself, "
                           "or pass --force.")
    _remove(target)
    return target


def comfy_pythons(root: Path) -> Iterator[Path]:
    for rel in COMFY_PYTHONS:
        path = Path(root).expanduser() / rel
        if path.is_file():
            yield path


def lacks_package(python: Path) -> Optional[bool]:
    """Whether `python` cannot import vibevoice_mlx (None when it cannot be run)."""
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vibevoice_mlx') is None)"
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=60).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return None


@click.group("comfyui")
def comfyui():
    """ComfyUI nodes: write or remove the loader in a ComfyUI folder."""


@comfyui.command("install")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--uninstall", is_flag=True, help="Remove the loader instead.")
@click.option("--force", is_flag=True, help="Replace (or remove) a custom_nodes/vibevoice-mlx not written by us.")
def install(path, uninstall, force):
    """Install the VibeVoice MLX nodes into the ComfyUI folder PATH (the one with custom_nodes/)."""
    try:
        if uninstall:
            click.echo(f"Removed {uninstall_loader(path, force)}; restart ComfyUI.")
            return
        target = install_loader(path, force)
    except (InstallError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Installed the VibeVoice MLX nodes: {target}. Restart ComfyUI; they are in the VibeVoice category. "
               f"Convert models into {model_folder(path)}/.")
    for python in comfy_pythons(path):
        if lacks_package(python):
            click.echo(f"Warning: {python} cannot import vibevoice_mlx; if ComfyUI runs with it, run "
                       f"`{python} -m pip install {package_source()}`.", err=True)
    if not any(comfy_pythons(path)):
        click.echo(f"ComfyUI must run with a Python that has vibevoice-mlx installed, as {sys.executable} has.")
