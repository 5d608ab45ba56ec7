"""``--icecache-config`` is validated where it is read; every refusal names the key and the reason."""

import pytest

from icecache_sglang.runtime.config import IceCacheConfig, IceCacheConfigError


def test_defaults_and_round_trip():
    cfg = IceCacheConfig.from_json(None)
    assert cfg == IceCacheConfig() and cfg.n_pages == (256 - 32 - 32) // 16
    custom = IceCacheConfig.from_json('{"budget_tokens": 1024, "page_size": 32, "window_tokens": 64, '
                                      '"index": {"seed": 3}, "query": {"fov": 40}, "layer_reuse": 3}')
    assert custom.n_pages == (1024 - 32 - 64) // 32
    assert custom.index_config().seed == 3 and custom.index_config().page_size == 32
    assert custom.query_params().fov == 40
    assert IceCacheConfig.from_json(custom.to_json()) == custom


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"budget": 256}', "unknown --icecache-config key"),
    ('{"budget_tokens": 64}', "budget_tokens (64) must exceed"),
    ('{"budget_tokens": 256, "sink_tokens": 128, "window_tokens": 120}', "at least one page"),
    ('{"page_size": 1}', "page_size"),
    ('{"page_size": "16"}', "page_size must be an integer"),
    ('{"window_tokens": -1}', "window_tokens must be >= 0"),
    ('{"layer_reuse": 0}', "layer_reuse"),
    ('{"selection_deadline_ms": 0}', "selection_deadline_ms"),
    ('{"indexer_threads": 0}', "indexer_threads"),
    ('{"stall_report_s": -1}', "stall_report_s"),
    ('{"while_indexing": "sometimes"}', "while_indexing must be one of"),
    ('{"while_indexing": "dense", "offload": true, "dense_layers": 0}', "with offload the device pool"),
    ('{"step_reuse": 0}', "step_reuse must be an integer in [1, 1024]"),
    ('{"step_reuse": 2.5}', "step_reuse must be an integer"),
    ('{"max_stale_steps": -1}', "max_stale_steps must be an integer in [0, 1024]"),
    ('{"step_reuse": 4, "max_stale_steps": 2}', "set one of them"),
    ('{"max_stale_steps": 4, "offload": true, "dense_layers": 0, "device_kv_tokens": 272}',
     "device_kv_tokens (272) holds no lane: one decoding request needs 276 rows"),
    ('{"stall_report_s": "30"}', "stall_report_s"),
    ('{"host_kv_gb": 8}', "host_kv_gb sizes SGLang's KV pool in host memory, which it is with offload only"),
    ('{"offload": true, "dense_layers": 0, "host_kv_gb": 0}', "host_kv_gb must be a number of GiB in (0, 65536]"),
    ('{"offload": true, "dense_layers": 0, "host_kv_gb": "8"}', "host_kv_gb must be a number"),
    ('{"offload": true, "dense_layers": 0, "host_kv_gb": 1e9}', "host_kv_gb must be a number"),
    ('{"prefill_staging_tokens": 8192}', "prefill_staging_tokens sizes the staging buffer"),
    ('{"offload": true, "prefill_staging_tokens": 0}', "prefill_staging_tokens must be a positive integer"),
    ('{"gqa_merge": "max"}', "gqa_merge must be one of"),
    ('{"index": {"layout": "random"}}', "layout must be one of"),
    ('{"index": {"page_size": 8}}', "unknown index key"),
    ('{"index": {"p_up": 2.0}}', "p_up"),
    ('{"index": {"p_up": 0.9}}', "p_up must be at most 0.5"),  # 81 levels at 1M tokens: the build failed
    ('{"query": {"prop_to_retrieve": 0}}', "prop_to_retrieve"),
    ('{"dense_layers": true}', "dense_layers must be an integer"),
])
def test_bad_configs_are_refused_with_the_reason(text, words):
    with pytest.raises(IceCacheConfigError) as e:
        IceCacheConfig.from_json(text)
    assert words in str(e.value)


def test_dense_layers_default_to_none_with_offload():
    """Offload keeps no layer's full KV on the device: a plain ``{"offload": true}`` is served with every layer
    sparse (it was refused for the default's two dense layers), and two dense layers stay the default without."""
    assert IceCacheConfig.from_json('{"offload": true}').dense_layers == 0
    assert IceCacheConfig.from_json("{}").dense_layers == 2 == IceCacheConfig().dense_layers
    assert IceCacheConfig.from_json('{"offload": true}').anchor_layers(4) == [0, 1, 2, 3]
    cfg = IceCacheConfig.from_json('{"offload": true}')
    assert IceCacheConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(IceCacheConfigError, match="leave dense_layers out"):
        IceCacheConfig.from_json('{"offload": true, "dense_layers": 1}')


def test_an_offload_lane_holds_the_staleness_of_reused_selections():
    """A reused selection attends to every token indexed since it was made: one more row per step of age."""
    base = IceCacheConfig(offload=True, dense_layers=0)
    assert base.lane_rows == 256 + 16
    assert IceCacheConfig(offload=True, dense_layers=0, max_stale_steps=4).lane_rows == 256 + 16 + 4
    assert IceCacheConfig(offload=True, dense_layers=0, step_reuse=4).lane_rows == 256 + 16 + 3
