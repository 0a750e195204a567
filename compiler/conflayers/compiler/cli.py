"""conflayers-compile: search a skip profile for a model and task, write a bundle."""
from __future__ import annotations

import sys

import click

from .search import SearchSettings

D = SearchSettings()


def _csv(kind):
    def parse(ctx, param, value):
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Alias (smollm2-135m-instruct, gemma3-270m), a local Hugging Face directory, a .gguf "
                   "file, or a hub id (org/name; needs the hub to be reachable).")
@click.option("--calib", default="gsm8k", show_default=True,
              help="Calibration prompts: gsm8k, humaneval, spec_bench, spec_bench:<category> "
                   "(or spec_bench:mt_bench) (built in, no download; $CONFLAYERS_DATA_DIR overrides), "
                   "a JSONL file or a text file, or any Hugging Face hub data set "
                   "hf:<dataset>[:<config>]:<split>:<field> (e.g. hf:openai/gsm8k:main:train:question; "
                   "needs the hub) (see README).")
@click.option("--target", default=None, type=click.Choice(["native", "fp32", "int8", "int4"]),
              help="Precision of the full graph, the output every draft must reproduce [default: native; "
                   "export only: the profiles' own]. native: a GGUF file's own quantized weights, exactly "
                   "(the two aliases are GGUF files; Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, F16, "
                   "BF16, F32); for a safetensors checkpoint native means fp32 (also on CUDA for now). "
                   "fp32: the weights dequantized. int8/int4: round-to-nearest symmetric blocks of 32 "
                   "(fp32 scale per block), for full-precision checkpoints.")
@click.option("--fallback-target", default=None, type=click.Choice(["fp32", "int8", "int4"]),
              help="Where the target is not exact on this machine's kernels (its verify passes would compute "
                   "other tokens than one-token steps), compile for this precision instead; the summary, "
                   "the manifest (model.target_info.fallback_from) and the profile say so [default: stop "
                   "with the reason].")
@click.option("--task", default=None, help="Profile name [default: derived from --calib, e.g. gsm8k].")
@click.option("--out", default=None, help="Bundle directory [default: bundles/<model>]. An existing bundle "
              "of the same model gains (or replaces) this task's profile.")
@click.option("--profile", "profiles", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Export only: build the bundle from shipped profile JSON (repeatable); no search.")
@click.option("--num-prompts", default=16, show_default=True, type=click.IntRange(3, 10000),
              help="Calibration prompts drawn (search + validation).")
@click.option("--validation-prompts", default=6, show_default=True, type=click.IntRange(1, 10000),
              help="Of those, held out to validate the chosen profile.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(8, 100000),
              help="Greedy tokens generated per calibration prompt.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for prompt selection.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]),
              help="ONNX Runtime device the cost model is measured on (the target hardware).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="torch dtype for the confidence pass (graphs are exported in fp32).")
@click.option("--max-context", default=4096, show_default=True, type=click.IntRange(64, 1 << 20),
              help="Context length the bundle supports (KV cache size).")
@click.option("--chat/--no-chat", default=None, help="Apply the chat template [default: when the model has one].")
@click.option("--cost-model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Reuse timings from an earlier profile JSON (or cost-model JSON) instead of measuring: "
                   "makes the compile repeatable (same inputs + seed + cost model -> same profile).")
@click.option("--force", is_flag=True, help="Replace --out even if it is not a bundle of this model.")
@click.option("--quiet", is_flag=True, help="Only errors.")
@click.option("--context-window", default=D.context_window, show_default=True, type=int,
              help="W: confidence is averaged over the last W tokens of each context.")
@click.option("--target-skip-ratio", default=D.target_skip_ratio, show_default=True, type=float,
              help="Skipped fraction the adaptive lambda steers towards, in (0, 1).")
@click.option("--max-iterations", default=D.max_iterations, show_default=True, type=int,
              help="ConfLayers iteration limit.")
@click.option("--acceptance-target", default=D.acceptance_target, show_default=True, type=float,
              help="Stop when per-draft acceptance reaches this (and mean accepted > its target).")
@click.option("--mean-accepted-target", default=D.mean_accepted_target, show_default=True, type=float,
              help="Mean accepted tokens per step for the acceptance stop rule.")
@click.option("--draft-stop-threshold", default=D.draft_stop_threshold, show_default=True, type=float,
              help="ConfLayers drafting stops when the draft's top-1 probability falls below this.")
@click.option("--lambda-step", default=D.lambda_step, show_default=True, type=float, help="Adaptive lambda step.")
@click.option("--base-window", default=D.base_window, show_default=True, type=int,
              help="Base half-width (layers) of the local confidence windows.")
@click.option("--allow-skip-first", is_flag=True, help="Allow skipping the first layer.")
@click.option("--allow-skip-last", is_flag=True, help="Allow skipping the last layer.")
@click.option("--max-draft-tokens", default=D.k_max, show_default=True, type=int,
              help="Longest draft per step considered.")
@click.option("--precisions", default="", callback=_csv(str),
              help="Draft weight precisions to consider (fp32, int8, int4, native) [default: cheaper than "
                   "the target: fp32 target -> fp32,int8; native -> native,int4; int8 -> int8,int4; int4 -> int4].")
@click.option("--vocab-sizes", default=",".join(map(str, D.vocab_sizes)), show_default=True, callback=_csv(int),
              help="Draft vocabulary subset sizes to consider besides the full vocabulary ('' for none).")
@click.option("--sublayers/--no-sublayers", default=True, show_default=True,
              help="Also consider skipping only the attention or only the MLP of a layer.")
@click.option("--refine-budget", default=D.refine_budget, show_default=True, type=int,
              help="Most drafts evaluated by local refinement after the ladder.")
@click.option("--patience", default=D.patience, show_default=True, type=int,
              help="Stop ConfLayers iterations after this many without a new candidate set.")
@click.option("--time-budget", default=D.time_budget_s, show_default=True, type=float,
              help="Seconds the search may take (phase 1 + 2) before it stops with the best so far.")
@click.option("--phase1-share", default=D.phase1_share, show_default=True, type=float,
              help="Most of the time budget ConfLayers iterations (phase 1) may use.")
def main(model, calib, target, fallback_target, task, out, profiles, num_prompts, validation_prompts, max_new_tokens, seed, device,
         dtype, max_context, chat, cost_model, force, quiet, context_window, target_skip_ratio, max_iterations,
         acceptance_target, mean_accepted_target, draft_stop_threshold, lambda_step, base_window,
         allow_skip_first, allow_skip_last, max_draft_tokens, precisions, vocab_sizes, sublayers,
         refine_budget, patience, time_budget, phase1_share):
    """Search the fastest lossless self-speculative draft for MODEL on a calibration TASK and write
    a versioned bundle: full ONNX graph, draft subgraph(s), profile JSON, tokenizer and a report.

    The search runs ConfLayers (per-layer confidence, adaptive threshold, measured acceptance) and
    then refines by predicted tokens/s with a cost model measured on this machine: skipped layers
    or half-layers, draft precision, draft length policy and a draft vocabulary subset. The chosen
    profile is validated through the runtime: output identical to plain decoding, measured speed-up.
    """
    try:
        from .pipeline import CompileOptions, compile_profile, export_profiles
    except ImportError as e:
        raise click.ClickException(f"the compiler needs its extra dependencies ({e.name} is missing): "
                                   "pip install 'conflayers[compiler]'") from None
    settings = SearchSettings(
        context_window=context_window, target_skip_ratio=target_skip_ratio, max_iterations=max_iterations,
        acceptance_target=acceptance_target, mean_accepted_target=mean_accepted_target,
        draft_stop_threshold=draft_stop_threshold, lambda_step=lambda_step, base_window=base_window,
        allow_skip_first=allow_skip_first, allow_skip_last=allow_skip_last, k_max=max_draft_tokens,
        precisions=precisions, vocab_sizes=vocab_sizes, sublayers=sublayers, refine_budget=refine_budget,
        patience=patience, time_budget_s=time_budget, phase1_share=phase1_share)
    if validation_prompts >= num_prompts:
        raise click.BadParameter(f"must be smaller than --num-prompts ({num_prompts})", param_hint="--validation-prompts")
    opts = CompileOptions(model=model, calib=calib, task=task, out=out, num_prompts=num_prompts,
                          validation_prompts=validation_prompts, max_new_tokens=max_new_tokens, seed=seed,
                          device=device, dtype=dtype, max_context=max_context, chat=chat, force=force,
                          profiles=list(profiles), cost_model=cost_model, settings=settings, quiet=quiet,
                          target=target or "native", fallback_target=fallback_target,
                          target_from_profiles=bool(profiles) and target is None)
    try:
        settings.validate()
        path = export_profiles(opts) if profiles else compile_profile(opts)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; nothing was written") from None
    except (ValueError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(path)


if __name__ == "__main__":
    sys.exit(main())
