"""Which adapter files a server may load: only from its configured directories.

Why so strict: ``POST /lora-adapters`` takes a path from the network. Without a fence it would
read any file the server's user can (``../../.ssh``), or follow a symlink planted in an
allowed folder. So a path is resolved (symlinks followed) and must land inside one of
``serve.adapter_dirs``; ``..`` is refused outright; only a PEFT adapter dir (adapter_config.json
+ adapter_model.safetensors, every file of it inside the fence too) or a GGUF file loads.
Errors name the problem and what would work, never a local path: the client learns nothing
about the server's file system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from engine.errors import UserError

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterPathError(UserError):
    """A path a client may not load; ``code`` is the OpenAI-style error code, ``status`` the HTTP status."""

    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


@dataclass(frozen=True)
class Found:
    path: Path
    """The resolved adapter: a PEFT dir or a GGUF file."""
    format: str
    """``peft`` or ``gguf``."""
    name: str
    """Its path relative to the adapter directory it lies in: the name it is served under."""
    run: str | None = None
    """Name of the run dir it belongs to (a ``config.yaml`` beside or above it), if any."""
    recipe: str | None = None


def load_arguments(adapters: dict[str, Found]) -> dict[str, dict]:
    """A backend loader's ``adapter_paths`` and ``run_info`` (served name -> path, -> run and recipe)."""
    return {
        "adapter_paths": {name: found.path for name, found in adapters.items()},
        "run_info": {name: {"run": found.run, "recipe": found.recipe} for name, found in adapters.items()},
    }


class AdapterDirs:
    """The fence: ``resolve`` turns a client's path into a loadable adapter, or refuses it."""

    def __init__(self, dirs: list[str | Path]):
        self.roots = [Path(d).expanduser().resolve() for d in dirs]

    def resolve(self, given: str) -> Found:
        if not self.roots:
            raise AdapterPathError(
                "this server loads no adapters by path: no adapter directories are configured (set serve.adapter_dirs)",
                "adapter_path_not_allowed",
            )
        if not given or "\x00" in given:
            raise AdapterPathError("the adapter path is empty or not a valid path", "invalid_value")
        if ".." in PurePosixPath(given).parts or ".." in PureWindowsPath(given).parts:
            raise AdapterPathError(
                "adapter paths may not contain '..'; give a path inside one of the adapter directories",
                "adapter_path_not_allowed",
            )
        try:
            return self._resolve(given)
        except (OSError, RuntimeError) as e:  # a name too long, a loop of links, ~nosuchuser: the client's to fix
            why = getattr(e, "strerror", None) or type(e).__name__
            raise AdapterPathError(
                f"the adapter path cannot be looked up on this server ({why}); "
                "give the path of an adapter inside the adapter directories",
                "invalid_value",
            ) from None

    def _resolve(self, given: str) -> Found:
        raw = Path(given).expanduser()
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.roots]
        for candidate in candidates:
            if not (candidate.exists() or candidate.is_symlink()):
                continue
            real = candidate.resolve()
            if not self._inside(real):
                raise AdapterPathError(
                    f"'{raw.name}' leads outside the adapter directories (a symlink or an absolute path elsewhere); "
                    "only files inside serve.adapter_dirs load",
                    "adapter_path_not_allowed",
                )
            return self._adapter(real, raw.name)
        if raw.is_absolute() and not self._inside(raw.resolve()):
            raise AdapterPathError(
                "absolute adapter paths must lie inside the adapter directories (serve.adapter_dirs); "
                "give a path relative to one of them",
                "adapter_path_not_allowed",
            )
        raise AdapterPathError(f"no adapter '{raw.name}' in the adapter directories", "adapter_not_found", status=404)

    def _inside(self, real: Path) -> bool:
        return any(real.is_relative_to(root) for root in self.roots)

    def _name(self, real: Path) -> str:
        root = next(r for r in self.roots if real.is_relative_to(r))
        return real.relative_to(root).as_posix() if real != root else real.name

    def _adapter(self, real: Path, shown: str) -> Found:
        if real.is_file() and real.suffix == ".safetensors" and real.name == PEFT_FILES[1]:
            real = real.parent  # the weights file of a PEFT dir: load the dir
        if real.is_dir():
            files = [real / f for f in PEFT_FILES]
            if not all(f.is_file() for f in files):
                raise AdapterPathError(
                    f"'{shown}' is not an adapter: a PEFT adapter dir holds {' and '.join(PEFT_FILES)} "
                    "(weights as safetensors), or give a .gguf LoRA file",
                    "not_an_adapter",
                )
            if not all(self._inside(f.resolve()) for f in files):
                raise AdapterPathError(
                    f"'{shown}' holds a symlink leading outside the adapter directories", "adapter_path_not_allowed"
                )
            return Found(real, "peft", self._name(real), *provenance(real))
        if real.is_file() and real.suffix.lower() == ".gguf":
            with real.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise AdapterPathError(f"'{shown}' is named .gguf but is not a GGUF file", "not_an_adapter")
            return Found(real, "gguf", self._name(real), *provenance(real))
        raise AdapterPathError(
            f"'{shown}' is not an adapter: only a PEFT adapter dir (safetensors weights) or a .gguf LoRA file loads",
            "not_an_adapter",
        )


def provenance(path: Path) -> tuple[str | None, str | None]:
    """(run dir name, recipe) of the run an adapter was trained in: the nearest ``config.yaml``
    with a ``recipe`` key in the adapter's folder or up to two folders above it."""
    import yaml

    for folder in [path if path.is_dir() else path.parent, *list(path.parents)[:3]]:
        record = folder / "config.yaml"
        if record.is_file():
            try:
                recipe = (yaml.safe_load(record.read_text()) or {}).get("recipe")
            except (yaml.YAMLError, OSError, AttributeError):
                continue
            if recipe:
                return folder.name, str(recipe)
    return None, None
