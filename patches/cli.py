"""``--enable-icecache`` and ``--icecache-config`` on SGLang's command line, validated at launch.

``from_cli_args`` copies only declared ``ServerArgs`` fields, so the validated configuration travels to
SGLang's spawned scheduler processes in the environment variable ``SGLANG_ICECACHE_CONFIG`` (children
inherit the launcher's environment), with the server's private run directory (``$ICECACHE_RUN_DIR``,
``runtime/rundir.py``). The same hook selects the ``icecache`` attention backend. A bad flag stops the
launch with ``sglang: error: ...`` and exit status 2, like any argparse error; a model IceCache cannot
serve (sliding window, hybrid, MLA) stops it when the scheduler builds the backend, with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from icecache_sglang.runtime.config import ENV_VAR, IceCacheConfig, IceCacheConfigError

from .attention import BACKEND_NAME

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
#: --attention-backend values --enable-icecache accepts: SGLang's backend it runs prefill and dense attention on
#: (``dense_attention``; IceCache's sparse decode is its own)
DENSE_BACKENDS = ("torch_native", "triton", "flashinfer")
COMPATIBLE_BACKENDS = (None, BACKEND_NAME, *DENSE_BACKENDS)


def _add_cli_args(result, parser, *args, **kwargs):
    if any("--enable-icecache" in a.option_strings for a in parser._actions):
        return result
    group = parser.add_argument_group("IceCache (icecache-sglang)")
    group.add_argument("--enable-icecache", action="store_true",
                       help="IceCache sparse decoding: each decode step attends to sink + recent window + the "
                            "pages a per-KV-head index (a separate CPU process) selects, within budget_tokens "
                            "per request. With offload (--icecache-config '{\"offload\": true}') SGLang's KV "
                            "pool is host memory (host_kv_gb) and decode reads a fixed-size device pool; "
                            "without it the KV cache stays in SGLang's own pool (device memory on a GPU).")
    group.add_argument("--icecache-config", type=str, default=None,
                       help="IceCache settings as one JSON object, e.g. '{\"budget_tokens\": 512}'. Keys: "
                            + ", ".join(f.name for f in dataclasses.fields(IceCacheConfig))
                            + " (README: what each means, its default).")
    return result


def unsupported_options(args) -> list[str]:
    """Why these server arguments cannot run with IceCache (empty when they can)."""
    problems = []
    get = lambda name, default=None: getattr(args, name, default)
    if get("speculative_algorithm"):
        problems.append(f"speculative decoding (--speculative-algorithm {get('speculative_algorithm')}) is not "
                        "supported with --enable-icecache")
    if (get("pp_size") or 1) > 1:
        problems.append("pipeline parallelism (--pp-size > 1) is not supported with --enable-icecache")
    for flag in ("enable_hierarchical_cache", "enable_hisparse", "enable_lmcache", "enable_flexkv"):
        if get(flag):
            problems.append(f"--{flag.replace('_', '-')} manages the KV cache itself and cannot be combined with "
                            "--enable-icecache")
    kv = str(get("kv_cache_dtype") or "auto")
    if kv not in ("auto", "float32", "float16", "bfloat16", "bf16", "fp16"):
        problems.append(f"--kv-cache-dtype {kv}: IceCache indexes float32/float16/bfloat16 keys")
    backend = get("attention_backend")
    if backend not in COMPATIBLE_BACKENDS:
        problems.append(f"--attention-backend {backend}: IceCache runs prefill and dense attention on one of "
                        f"{list(DENSE_BACKENDS)} and its sparse decode on its own; leave the flag out or pick one")
    for flag in ("prefill_attention_backend", "decode_attention_backend"):
        # any other backend for one phase makes SGLang build a hybrid backend: prefill would never store keys
        # for the index, or decode would never be sparse
        if get(flag) not in (None, BACKEND_NAME):
            problems.append(f"--{flag.replace('_', '-')} {get(flag)}: IceCache runs both prefill and decode in its "
                            f"own attention backend; leave the flag out")
    if get("enable_mixed_chunk"):
        problems.append("--enable-mixed-chunk: decode requests batched with a prefill chunk would attend densely "
                        "and unaccounted; leave the flag out with --enable-icecache")
    if get("enable_page_major_kv_layout"):
        problems.append("--enable-page-major-kv-layout: IceCache's KV pool keeps SGLang's per-layer layout (its "
                        "key planes are what the indexer reads); leave the flag out")
    if get("is_embedding"):
        problems.append("embedding models do not decode; --enable-icecache does not apply")
    if str(get("disaggregation_mode") or "null") != "null":
        # a decode server's request rows are freed without SGLang's row hooks: indexes and lanes would leak
        problems.append(f"--disaggregation-mode {get('disaggregation_mode')}: prefill/decode disaggregation is not "
                        "supported with --enable-icecache")
    problems += cuda_graph_problems(args)
    return problems


#: SGLang's decode CUDA-graph backend IceCache runs under: the layers are captured around their attention,
#: which runs eagerly between the captured segments (``IceCacheAttnBackend._graph_attention``)
GRAPH_BACKEND = "breakable"


def cuda_graph_problems(args) -> list[str]:
    """CUDA-graph flags IceCache cannot run under. Its decode selects pages on the host between layers: a
    whole-step graph (``full``) cannot contain that, SGLang's ``breakable`` decode graphs can (the attention
    runs eagerly between captured segments), and prefill runs without graphs. The launch turns SGLang's graphs
    off (``disable_cuda_graph``), which the per-phase flags and ``--cuda-graph-config`` outrank, so a graph asked
    for that IceCache cannot run is refused, not half-run."""
    problems = []
    allowed = {"decode": (None, "disabled", GRAPH_BACKEND), "prefill": (None, "disabled")}
    hint = {"decode": f"use {GRAPH_BACKEND} (the attention between captured segments) or leave the flag out",
            "prefill": "leave the flag out"}
    for phase in ("decode", "prefill"):
        backend = getattr(args, f"cuda_graph_backend_{phase}", None)
        if backend not in allowed[phase]:
            problems.append(f"--cuda-graph-backend-{phase} {backend}: IceCache's {phase} cannot run in a "
                            f"{backend} graph (it selects pages on the host between layers); {hint[phase]}")
    raw = getattr(args, "cuda_graph_config", None)
    given = raw.to_dict() if hasattr(raw, "to_dict") else raw
    if isinstance(given, dict):
        on = [phase for phase, c in given.items()
              if isinstance(c, dict) and c.get("backend") not in allowed.get(phase, (None, "disabled"))]
        if on:
            problems.append(f"--cuda-graph-config asks for CUDA graphs ({', '.join(map(str, on))}) IceCache cannot "
                            f"run under: decode takes {GRAPH_BACKEND} or disabled, prefill disabled")
    if str(os.environ.get("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "")).lower() in ("1", "true", "yes"):
        problems.append("SGLANG_ENABLE_METADATA_GLUE_GRAPH would capture IceCache's per-step selection into a graph; "
                        "unset it with --enable-icecache")
    return problems


def host_ranks(args) -> int:
    """SGLang's scheduler processes on this host: TP x DP ranks (with DP attention the DP groups share the TP
    ranks: TP ranks), split over the nodes."""
    tp = int(getattr(args, "tp_size", 1) or 1)
    attn_dp = bool(getattr(args, "enable_dp_attention", False)) or int(getattr(args, "attn_dp_size", 1) or 1) > 1
    ranks = tp if attn_dp else tp * int(getattr(args, "dp_size", 1) or 1)
    return max(1, ranks // int(getattr(args, "nnodes", 1) or 1))


def cuda_problems(what: str) -> list[str]:
    """Why ``what`` (a GPU-only setting) cannot run in this launch (empty when it can)."""
    import torch

    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        return [f"{what} needs a CUDA GPU; this launch uses SGLang's CPU engine"]
    if not torch.cuda.is_available():
        return [f"{what} needs a CUDA GPU; none is visible to this process"]
    return []


def flashinfer_problems(key: str = "decode_attention") -> list[str]:
    """Why ``key: flashinfer`` cannot run here (empty when it can)."""
    from icecache_sglang.runtime.attention import flashinfer_importable

    no_gpu = cuda_problems(f"{key} 'flashinfer'")
    if no_gpu:
        return no_gpu
    if not flashinfer_importable():
        return [f"{key} 'flashinfer' needs flashinfer-python (SGLang pins 0.7.2); it is not installed"]
    return []


def _fail(message: str):
    print(f"sglang: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _from_cli_args(original, cls, args, *rest, **kwargs):
    enabled = bool(getattr(args, "enable_icecache", False))
    text = getattr(args, "icecache_config", None)
    if not enabled:
        if text:
            _fail("--icecache-config is given but --enable-icecache is not")
        os.environ.pop(ENV_VAR, None)
        return original(cls, args, *rest, **kwargs)
    try:
        cfg = IceCacheConfig.from_json(text)
    except IceCacheConfigError as e:
        _fail(f"--icecache-config: {e}")
    problems = unsupported_options(args)
    backend = getattr(args, "attention_backend", None)
    if backend in DENSE_BACKENDS:  # --attention-backend X with IceCache: X runs the dense attention
        if cfg.dense_attention not in ("auto", backend):
            problems.append(f"--attention-backend {backend} and dense_attention {cfg.dense_attention!r} disagree; "
                            "give one of them")
        else:
            cfg = dataclasses.replace(cfg, dense_attention=backend)
    if cfg.decode_attention == "flashinfer":
        problems += flashinfer_problems("decode_attention")
    if cfg.dense_attention == "flashinfer":
        problems += flashinfer_problems("dense_attention")
    if cfg.dense_attention == "triton":
        problems += cuda_problems("dense_attention 'triton'")
    if cfg.decode_attention == "triton":
        problems += cuda_problems("decode_attention 'triton'")
    if cfg.offload and getattr(args, "enable_streaming_session", False):
        # the lanes themselves serve a session's turns (token for token in a scratch run), but an idle session
        # keeps its request row between turns, and with offload SGLang has as many rows as lanes
        problems.append("--enable-streaming-session with offload: each open session holds one of SGLang's request "
                        "rows between turns, and with offload there are only as many rows as device lanes "
                        f"({cfg.device_lanes}): that many idle sessions would stop the server admitting anything; "
                        "run offload without streaming sessions")
    if cfg.offload:  # SGLang's KV pool is host memory of host_kv_gb per rank (patches/pool.py)
        from icecache_sglang.runtime.pool.kv_pool import default_host_kv_gb, host_budget_problem

        ranks = host_ranks(args)
        why = ""
        if cfg.host_kv_gb is None and not cuda_problems("offload"):  # a GPU: every rank gets the same figure
            gb = default_host_kv_gb(ranks)
            if gb < 0.01:
                why = f"offload: the host has too little available memory for SGLang's KV pool ({gb} GiB per rank)"
            else:
                cfg = dataclasses.replace(cfg, host_kv_gb=gb)
        why = why or host_budget_problem(cfg, ranks)
        if why:
            problems.append(why)
    lanes = cfg.device_lanes
    if lanes is not None:  # the device pool decodes at most this many requests at once: so does SGLang
        given = getattr(args, "max_running_requests", None)
        if given is not None and given > lanes:
            problems.append(f"--max-running-requests {given}: the offloaded decode's device pool holds {lanes} "
                            f"requests (device_kv_tokens {cfg.device_kv_tokens or lanes * cfg.lane_rows} // "
                            f"{cfg.lane_rows} rows each); raise device_kv_tokens to {given * cfg.lane_rows} or run "
                            f"fewer requests")
        elif given is None:
            args.max_running_requests = lanes
    if problems:
        _fail("; ".join(problems))
    # Decode selects pages on the host between layers (the query of layer l picks layer l's pages), which a
    # captured whole-step graph cannot do; SGLang turns graphs off for its torch_native backend for the same
    # kind of reason. ``--cuda-graph-backend-decode breakable`` outranks this: decode graphs around the
    # attention (``cuda_graph_problems``).
    args.disable_cuda_graph = True
    server_args = original(cls, args, *rest, **kwargs)
    server_args.attention_backend = BACKEND_NAME
    os.environ[ENV_VAR] = cfg.to_json()
    _run_dir().export()  # the private directory this server's HTTP process and ranks exchange files in
    return server_args


_RUN_DIR = None


def _run_dir():
    """One private run directory per launching process (removed when it exits)."""
    global _RUN_DIR
    if _RUN_DIR is None:
        from icecache_sglang.runtime.rundir import RunDir

        _RUN_DIR = RunDir.create()
    return _RUN_DIR


def install() -> None:
    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", _from_cli_args, HookType.AROUND)
