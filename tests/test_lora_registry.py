"""The engine's registry of adapters named by requests (what `/v1/models` lists): only adapters
that loaded, only from the adapter roots, bounded by max_cpu_loras with the preloaded ones pinned.
On a tiny random Llama, so it runs in seconds."""

from __future__ import annotations

import pytest
from server_utils import make_adapter

from loomlm.engine.llm_engine import LLMEngine


def test_registry_holds_loaded_adapters_under_the_roots_lru_bounded(make_tiny_model_dir, tmp_path):
    base = make_tiny_model_dir("llama")
    root = tmp_path / "adapters"
    named = [make_adapter(base, root / f"a{i}", 4, 8, ["q_proj", "v_proj"], seed=i) for i in range(3)]
    preloaded = make_adapter(base, tmp_path / "operator" / "pre", 4, 8, ["o_proj"], seed=9)  # outside the root
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    engine = LLMEngine.from_engine_args(model=str(base), enable_lora=True, max_loras=1, max_cpu_loras=2,
                                        adapter_roots=(str(root),), lora_adapter_ids=(str(preloaded),),
                                        kv_cache_memory_bytes=1 << 22)

    def listed() -> list[str]:
        return [lora.lora_name for lora in engine.registered_loras()]

    assert listed() == [str(preloaded)]
    for source in (None, "local"):  # the preloaded adapter, by its id, needs no root
        assert engine.lora_request_for(str(preloaded), source).lora_path == str(preloaded.resolve())

    for adapter_id in ("/etc", str(tmp_path / "operator"), "../operator/pre", "~"):
        with pytest.raises(ValueError):
            engine.check_lora(engine.lora_request_for(adapter_id, "local"))
    with pytest.raises(ValueError):
        engine.check_lora(engine.lora_request_for("broken", "local"))  # under the root, but no adapter
    assert listed() == [str(preloaded)]  # failures are never listed

    requests = []
    for path in named:
        lora = engine.lora_request_for(str(path), "local")
        assert not engine.is_registered_lora(str(path))  # resolved, not yet loaded
        engine.check_lora(lora)
        requests.append(lora)
        assert engine.is_registered_lora(str(path))
        assert len(listed()) <= 2  # max_cpu_loras, the pinned adapter included
    assert listed() == [str(preloaded), str(named[2])]
    assert len({lora.lora_int_id for lora in requests}) == 3  # ids stay unique after evictions
    # A relative id is looked up under the root.
    relative = engine.lora_request_for("a0", "local")
    assert relative.lora_path == str(named[0].resolve())
