"""``llmp``: the platform's command line.

    llmp models build-tiny --out DIR [--chat-template tiny|llama-2|llama-3|chatml] [--sizes ...]
                                          build the three tiny local models
    llmp data write --out DIR             write the synthetic datasets as files
    llmp generate --model PATH --prompt TEXT [--engine vllm|transformers] [--adapter KIND:PATH] ...
    llmp serve --config FILE [--host H] [--port P]   OpenAI-compatible serving until Ctrl-C / SIGTERM
    llmp bench serve [--json F] [--plot F]   serving throughput against its baselines
    llmp bench rollout [--json F] [--plot F] RLHF rollouts: vLLM actors vs in-process vLLM vs transformers
    llmp bench train [--json F] [--plot F]   SFT steps: plain process vs Ray Train with 1 and 2 workers
    llmp eval latency|prompting|generation [--config FILE] [key=value ...] [--json F] [--plot F]
                                          the course's experiments: latency by size, prompting styles,
                                          ROUGE/BLEU and forgetting after fine-tuning
    llmp plan --params 7e9 [--method M] [--dtype D] [--json F] [--plot F]   memory to serve or train, by component
    llmp demo [--quick] [--verbose] [key=value ...]   the end-to-end run on the embedded default

Consoles are quiet by default (the platform's progress and results; libraries' messages go to log
files): ``--verbose`` or ``LLMP_LOG_LEVEL=WARNING|INFO|DEBUG`` shows them (``llm_platform.console``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from llm_platform.errors import PlatformError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmp", description="Serve, fine-tune, align and tune LLMs on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="local models").add_subparsers(dest="action", required=True)
    tiny = models.add_parser("build-tiny", help="build tiny-s, tiny-m and tiny-l (deterministic)")
    tiny.add_argument("--out", required=True, help="folder to write the three checkpoints into")
    tiny.add_argument("--force", action="store_true", help="rebuild even if the checkpoints exist")
    tiny.add_argument("--chat-template", default="tiny", choices=["tiny", "llama-2", "llama-3", "chatml"],
                      help="chat template and special tokens: the project's own (default), Llama-2-chat "
                           "([INST], <<SYS>>), Llama-3-Instruct (<|start_header_id|>, <|eot_id|>) or ChatML "
                           "(Qwen: <|im_start|>, <|im_end|>)")
    tiny.add_argument("--sizes", nargs="+", choices=["tiny-s", "tiny-m", "tiny-l"],
                      default=["tiny-s", "tiny-m", "tiny-l"], help="build only these sizes")
    tiny.set_defaults(run=_build_tiny)

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    write = data.add_parser("write", help="write the synthetic datasets as SPLIT files")
    write.add_argument("--out", required=True)
    write.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    write.set_defaults(run=_write_data)

    gen = commands.add_parser("generate", help="generate from one model, optionally with an adapter")
    gen.add_argument("--model", required=True, help="checkpoint folder or hub id")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    gen.add_argument("--adapter", help="KIND:PATH with KIND lora or soft_prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(run=_generate)

    srv = commands.add_parser("serve", help="serve the models of a config over OpenAI-compatible HTTP")
    srv.add_argument("--config", required=True, help="serving config (e.g. serve_apps/configs/local.yaml)")
    srv.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port to listen on (default from config: 8000)")
    srv.add_argument("--metrics-port", type=int, help="Prometheus port of a local Ray cluster started here")
    srv.add_argument("overrides", nargs="*", help="key=value settings, e.g. adapter_store=s3://bucket/adapters")
    srv.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="action", required=True)
    bserve = bench.add_parser("serve", help="platform vs in-process vLLM vs naive transformers, and mixed LoRAs")
    bserve.add_argument("--models-dir", default="artifacts/models")
    bserve.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    bserve.add_argument("--json", help="write the figures here")
    bserve.add_argument("--plot", help="write a PNG of throughput and latency against clients here")
    bserve.add_argument("--stream", action="store_true",
                        help="HTTP clients stream (server-sent events, usage in the last event) as vLLM's "
                             "benchmark client does")
    bserve.add_argument("--rounds", type=int, default=3,
                        help="alternating platform / vLLM-server rounds at the most clients (both servers up)")
    bserve.set_defaults(run=_bench_serve)

    evaluate = commands.add_parser("eval", help="the course's experiments").add_subparsers(dest="action",
                                                                                           required=True)
    for action, text in (("latency", "the three course prompts on every base size: seconds and tokens/s"),
                         ("prompting", "zero-shot, few-shot and instruction prompts on NLI: accuracy and time"),
                         ("generation", "ROUGE/BLEU of a base and its fine-tunes, and forgetting")):
        ev = evaluate.add_parser(action, help=text)
        ev.add_argument("--config", help=f"YAML config (default: the tiny local models, {action}_local.yaml)")
        ev.add_argument("--json", help="write the figures here")
        ev.add_argument("--plot", help="write a PNG here")
        ev.add_argument("overrides", nargs="*", help="key=value settings, e.g. engine.kind=transformers")
        ev.set_defaults(run=_eval)

    plan = commands.add_parser("plan", help="memory to serve or train a model of a given size, by component")
    plan.add_argument("--params", type=float, help="parameter count, e.g. 7e9")
    plan.add_argument("--model", help="checkpoint folder or hub id: parameter count and shape read from it")
    plan.add_argument("--method", choices=["inference", "full", "lora", "qlora", "all"], default="all")
    plan.add_argument("--dtype", type=_plan_dtype, choices=["fp32", "fp16", "bf16", "int8", "4bit", "all"],
                      default="all", metavar="{fp32,fp16,bf16,int8,4bit,all}",
                      help="base weights; torch's names work too (float32, float16, bfloat16); qlora always uses 4bit")
    plan.add_argument("--context", type=int, default=2048, help="tokens per sequence in the KV cache")
    plan.add_argument("--batch", type=int, default=1, help="sequences served at once")
    for dim in ("layers", "hidden", "heads", "kv-heads", "head-dim", "intermediate"):
        plan.add_argument(f"--{dim}", type=int, help="model shape (default: from --model, or estimated)")
    plan.add_argument("--lora-rank", type=int, default=8)
    plan.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated linear layers, or all-linear")
    plan.add_argument("--json", help="write the figures here")
    plan.add_argument("--plot", help="write a PNG of memory by component here")
    plan.set_defaults(run=_plan)

    btrain = bench.add_parser("train", help="SFT steps: plain process vs 1 and 2 Ray Train workers")
    btrain.add_argument("--model", default="artifacts/models/tiny-m")
    btrain.add_argument("--steps", type=int, default=60)
    btrain.add_argument("--json", help="write the figures here")
    btrain.add_argument("--plot", help="write a PNG of step and wall time per run here")
    btrain.set_defaults(run=_bench_train)

    broll = bench.add_parser("rollout", help="RLHF rollouts: vLLM actors vs vLLM in-process vs transformers")
    broll.add_argument("--model", default="artifacts/models/tiny-l")
    broll.add_argument("--prompts", type=int, default=64)
    broll.add_argument("--json", help="write the figures here")
    broll.add_argument("--plot", help="write a PNG of tokens/s per system here")
    broll.set_defaults(run=_bench_rollout)

    demo = commands.add_parser("demo", help="the end-to-end run on the embedded default")
    demo.add_argument("--quick", action="store_true", help="the same chain, smaller: a few minutes (quick=true)")
    demo.add_argument("--verbose", "-v", action="store_true",
                      help="show Ray's, vLLM's and the workers' own messages too (same as LLMP_LOG_LEVEL=INFO)")
    demo.add_argument("overrides", nargs="*", help="key=value settings, e.g. max_tokens=32")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except PlatformError as exc:
        from llm_platform import console

        console.error(f"llmp: error: {exc}")
        return 2


def _plan_dtype(text: str) -> str:
    """``--dtype``: either spelling (float32 or fp32), as the plan's short name."""
    from llm_platform.dtypes import short_dtype

    if text.strip().lower() == "all":
        return "all"
    try:
        return short_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_tiny(args) -> None:
    from llm_platform.models.tiny import build_tiny_models, parameter_count

    for name, path in build_tiny_models(args.out, force=args.force, chat_template=args.chat_template,
                                        sizes=tuple(args.sizes)).items():
        print(f"{name}: {path} ({parameter_count(path):,} parameters)")


def _write_data(args) -> None:
    from llm_platform.data.loader import write_synthetic

    for path in write_synthetic(args.out, args.format):
        print(path)


def _generate(args) -> None:
    from llm_platform.engine import AdapterRef, EngineConfig, SamplingParams, build_engine
    from llm_platform.models.checkpoints import resolve_model

    # The settings and the model first: they are named in a fraction of a second, before seconds of imports.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
    resolve_model(args.model, weights=False)
    adapter = None
    if args.adapter:
        kind, _, path = args.adapter.partition(":")
        if kind not in ("lora", "soft_prompt") or not path:
            raise SystemExit("llmp: error: --adapter takes KIND:PATH with KIND lora or soft_prompt")
        from llm_platform.engine.adapters import inspect_adapter
        from llm_platform.models.loading import load_model_config

        inspect_adapter(path, load_model_config(args.model), expected_kind=kind)
        adapter = AdapterRef(name="cli", kind=kind, path=path)
    engine = build_engine(EngineConfig(model=args.model, kind=args.engine))
    try:
        result = asyncio.run(engine.generate(args.prompt, params, adapter))
    finally:
        engine.shutdown()
    print(result.choices[0].text)


def _serve(args) -> None:
    from llm_platform.config import load_config
    from llm_platform.serving.config import ServeConfig
    from llm_platform.serving.launch import serve_forever

    overrides = list(args.overrides)
    overrides += [f"host={args.host}"] if args.host else []
    overrides += [f"port={args.port}"] if args.port else []
    serve_forever(load_config(ServeConfig, args.config, overrides), metrics_port=args.metrics_port)


def _bench_serve(args) -> None:
    from llm_platform.bench import serve as bench
    from llm_platform.report import format_table, write_json

    if args.rounds < 1:
        raise PlatformError(f"--rounds must be at least 1, not {args.rounds}")
    summary = bench.run(args.models_dir, sorted(args.clients), stream=args.stream, rounds=args.rounds)
    print("\n" + format_table(summary["rows"]))

    def rounds(key: str) -> str:
        return ", ".join(f"{r:.2f}" for r in summary[f"{key}_rounds"])

    print(f"\nat {summary['clients']} clients: platform_vs_engine={summary['platform_vs_engine']:.2f} "
          f"(goal >= 0.9)  platform_vs_naive={summary['platform_vs_naive']:.2f} (goal >= 3)\n"
          f"medians of {len(summary['head_to_head'])} alternating rounds (each round's ratios in brackets):\n"
          f"single_adapter_vs_base={summary['single_adapter_vs_base']:.2f} (goal >= 0.9) "
          f"[{rounds('single_adapter_vs_base')}]  mixed_adapters_vs_base={summary['mixed_adapters_vs_base']:.2f} "
          f"(goal >= 0.8) [{rounds('mixed_adapters_vs_base')}]\n"
          f"platform_vs_vllm_serve={summary['platform_vs_vllm_serve']:.2f} (goal >= 0.9) "
          f"[{rounds('platform_vs_vllm_serve')}]  platform_vs_vllm_serve_mixed_adapters="
          f"{summary['platform_vs_vllm_serve_mixed_adapters']:.2f} (goal >= 0.9) "
          f"[{rounds('platform_vs_vllm_serve_mixed_adapters')}]")
    if args.json:
        write_json(args.json, summary)
    if args.plot:
        bench.plot(summary, args.plot)


def _eval(args) -> None:
    from llm_platform.evaluation import run_command

    run_command(args.action, args.config, args.overrides, args.json, args.plot)


def _plan(args) -> None:
    from llm_platform.evaluation import plan, publish

    publish(plan, plan.plan(plan.spec_from_args(args)), args.json, args.plot)


def _bench_train(args) -> None:
    from llm_platform.bench import train as bench
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.report import format_table, write_json

    ensure_tiny_model(args.model)
    summary = bench.run(args.model, args.steps)
    print("\n" + format_table(summary["rows"]))
    print(f"\nray_overhead={summary['ray_overhead']:.3f} (goal <= 1.15; wall incl. start-up "
          f"{summary['ray_overhead_wall']:.2f})  two_vs_one_workers={summary['two_vs_one_workers']:.2f}")
    if args.json:
        write_json(args.json, summary)
    if args.plot:
        bench.plot(summary, args.plot)


def _bench_rollout(args) -> None:
    from llm_platform.bench import rollout as bench
    from llm_platform.models.tiny import ensure_tiny_model
    from llm_platform.report import format_table, write_json

    ensure_tiny_model(args.model)
    summary = bench.run(args.model, args.prompts)
    print("\n" + format_table(summary["rows"]))
    print(f"\nvllm_vs_transformers={summary['vllm_vs_transformers']:.2f} (goal >= 2)  "
          f"actors_vs_engine={summary['actors_vs_engine']:.2f} (goal >= 0.9)  "
          f"adapter_sync_s={summary['adapter_sync_s']:.3f} (goal < 0.5)")
    if args.json:
        write_json(args.json, summary)
    if args.plot:
        bench.plot(summary, args.plot)


def _demo(args) -> None:
    from llm_platform import console, demo
    from llm_platform.config import load_config

    cfg = load_config(demo.DemoConfig, overrides=args.overrides + (["quick=true"] if args.quick else []))
    console.setup(cfg.log_dir, verbose=args.verbose)
    demo.run(cfg)


if __name__ == "__main__":
    sys.exit(main())
