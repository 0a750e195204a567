"""Command line: `conflayers-run` (generate from a bundle) and `conflayers` (inspect, verify, run).

Why a CLI on top of the Engine API: model publishers check a bundle before shipping it (inspect,
verify) and users try a bundle on their own prompts (run) without writing Python. Every expected
failure (a corrupt bundle, a bad request, an unreadable prompts file) ends as one `Error: ...`
line and exit code 2, never a traceback; `verify` keeps exit code 1 for "the bundle is unsound".
Set CONFLAYERS_DEBUG=1 to see the traceback of an unexpected error.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass

import click

from .attention import KV_CACHE_HELP, KV_CACHES
from .bundle import Bundle, BundleError, verify_bundle
from .engine import Engine, RequestError
from .profile import ProfileError

# -- errors -----------------------------------------------------------------------------------


class CliError(click.ClickException):
    """An expected failure: click prints `Error: <message>` to stderr; exit code 2."""
    exit_code = 2


# Errors a user can cause: bad bundle, bad request, unreadable file, missing device.
EXPECTED_ERRORS = (BundleError, ProfileError, RequestError, OSError, ValueError, RuntimeError)


def friendly_errors(fn):
    """Turn expected exceptions into `Error: ...` (exit 2) so a user never sees a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except EXPECTED_ERRORS as e:
            raise CliError(_one_line(e)) from None
        except Exception as e:  # noqa: BLE001 - the promise is: no traceback, ever
            if os.environ.get("CONFLAYERS_DEBUG"):
                raise
            raise CliError(f"unexpected {type(e).__name__}: {_one_line(e)} "
                           "(set CONFLAYERS_DEBUG=1 to see the traceback)") from None
    return wrapper


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (ORT and OS errors may span several)."""
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"file not found: {e.filename}"
    text = str(e) or type(e).__name__
    return " ".join(text.split())


# -- prompts ----------------------------------------------------------------------------------

PROMPTS_HELP = """Read prompts from a JSONL file (`-` for stdin), one JSON object per line:
`{"prompt": "..."}` or `{"messages": [{"role": "user", "content": "..."}]}`, optionally with
`"id"` (echoed in --json output) and `"task"` (overrides --task for that line). Blank lines are
skipped; other fields are ignored."""


@dataclass
class PromptItem:
    line: int                    # 1-based line in the prompts file (0 for --prompt)
    prompt: str | None = None
    messages: list | None = None
    id: object = None
    task: str | None = None

    def where(self) -> str:
        return f"prompts file line {self.line}: " if self.line else ""


def read_prompts_file(path: str) -> list[PromptItem]:
    """Parse the whole file before generating anything, so a bad line fails fast, by number."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise CliError(f"prompts file {path} does not exist") from None
        except IsADirectoryError:
            raise CliError(f"prompts file {path} is a directory") from None
        except UnicodeDecodeError as e:
            raise CliError(f"prompts file {path} is not UTF-8 text: {e}") from None
    items = [_parse_prompt_line(text, n) for n, text in enumerate(lines, 1) if text.strip()]
    if not items:
        raise CliError(f"prompts file {path} has no prompts")
    return items


def _parse_prompt_line(text: str, n: int) -> PromptItem:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"prompts file line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise CliError(f"prompts file line {n}: expected a JSON object with 'prompt' or 'messages'")
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise CliError(f"prompts file line {n}: give exactly one of 'prompt' or 'messages'")
    if has_p and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise CliError(f"prompts file line {n}: 'prompt' must be a non-empty string")
    if has_m and (not isinstance(obj["messages"], list) or not obj["messages"]):
        raise CliError(f"prompts file line {n}: 'messages' must be a non-empty list of "
                       "{role, content} objects")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise CliError(f"prompts file line {n}: 'task' must be a string")
    return PromptItem(n, obj.get("prompt"), obj.get("messages"), obj.get("id"), task)


def _as_request(item: PromptItem, chat: bool) -> dict:
    """prompt/messages arguments for Engine.generate; --chat wraps a plain prompt as one user turn."""
    if item.messages is not None:
        return {"messages": item.messages}
    if chat:
        return {"messages": [{"role": "user", "content": item.prompt}]}
    return {"prompt": item.prompt}


def _check_items(engine, items: list[PromptItem], chat: bool, gen_args: dict):
    """Let the engine check every request up front: a bad line fails before any output."""
    for item in items:
        try:
            engine.prepare(**_request(item, chat, gen_args))
        except RequestError as e:
            raise CliError(f"{item.where()}{e}") from None


def _request(item: PromptItem, chat: bool, gen_args: dict) -> dict:
    """Engine.generate arguments for one prompt (its own task overrides --task)."""
    request = {**_as_request(item, chat), **gen_args}
    if item.task is not None:
        request["task"] = item.task
    return request


# -- run --------------------------------------------------------------------------------------


def metrics_line(metrics: dict, finish_reason: str) -> str:
    """One human line: which draft ran, how fast, how much of it the full model kept."""
    ttft = metrics["time_to_first_token_s"] * 1000.0
    head = (f"[{metrics['profile'] or 'plain'}] {metrics['completion_tokens']} tokens "
            f"({finish_reason}), {metrics['tokens_per_s']:.1f} tok/s, TTFT {ttft:.1f} ms")
    if not metrics["speculative"]:
        return f"{head}, no drafting"
    guard = ("guard: drafting on" if metrics["guard_stopped_at"] is None
             else f"guard: drafting off after {metrics['guard_stopped_at']} tokens")
    return (f"{head}, acceptance {metrics['acceptance_rate']:.2f}, "
            f"{metrics['mean_accepted_tokens']:.2f} accepted/step over {metrics['draft_steps']} draft steps, "
            f"{guard}")


def _result_record(index: int, item: PromptItem, result) -> dict:
    return {"index": index, "id": item.id, "text": result.text, "finish_reason": result.finish_reason,
            "token_ids": list(result.token_ids), "metrics": result.metrics.to_dict()}


def _emit_json(obj: dict):
    click.echo(json.dumps(obj, ensure_ascii=False))


def _run_one(engine, index: int, item: PromptItem, chat: bool, gen_args: dict, stream: bool,
             as_json: bool):
    """Generate one completion and print it (streamed as it arrives, or whole)."""
    request = _request(item, chat, gen_args)
    if not stream:
        result = engine.generate(**request)
    else:
        result = None
        chunks = engine.generate(stream=True, **request)
        try:
            for chunk in chunks:
                if chunk.text:
                    if as_json:
                        _emit_json({"index": index, "id": item.id, "delta": chunk.text})
                    else:
                        click.echo(chunk.text, nl=False)
                result = chunk.result or result
        finally:
            chunks.close()
    if as_json:
        _emit_json(_result_record(index, item, result))
    else:
        if not stream:
            click.echo(result.text, nl=False)
        click.echo()
        click.echo(metrics_line(result.metrics.to_dict(), result.finish_reason), err=True)


def load_engine(bundle: str, device: str, max_context: int | None, num_threads: int | None,
                verify: bool, kv_cache: str = "float32"):
    """Engine.load with the CLI's options (errors become `Error:` lines via friendly_errors)."""
    return Engine.load(bundle, device=device, max_context=max_context, num_threads=num_threads,
                       verify=verify, kv_cache=kv_cache)


def _resolve_chat(engine, chat: bool | None) -> bool:
    has_template = bool(engine.codec.chat_template)
    if chat is None:
        return has_template
    if chat and not has_template:
        raise CliError("this bundle has no chat template: use --no-chat to send the raw prompt")
    return chat


DEVICE = click.Choice(["cpu", "cuda", "auto"])


@click.command(name="conflayers-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--prompt", "-p", help="The prompt text (give this or --prompts).")
@click.option("--prompts", "prompts_file", metavar="FILE.jsonl", help=PROMPTS_HELP)
@click.option("--task", "-t", default=None, metavar="NAME|auto",
              help="Skip profile to draft with: a profile name of the bundle, or `auto` to pick one per "
                   "prompt from its tokens. Default: the bundle's default profile.")
@click.option("--stream", is_flag=True, help="Print text as it is generated (with --json: one "
              "{\"delta\": ...} line per piece, then the result line).")
@click.option("--no-speculate", is_flag=True, help="Decode with the full model only (no draft); "
              "the greedy output is identical, only slower. Useful as a baseline.")
@click.option("--chat/--no-chat", default=None, help="Send each plain prompt (--prompt, or a `prompt` "
              "line of --prompts) as a single user message through the bundle's chat template. "
              "Default: on when the bundle has a chat template.")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate per prompt.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy (deterministic).")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0,
              show_default=True, help="Nucleus sampling: keep the smallest token set with this much "
              "probability (only with --temperature > 0).")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample from the k most likely tokens only; 0 keeps all.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling (reproducible output).")
@click.option("--stop", multiple=True, metavar="STR", help="Stop when the text contains STR (not "
              "included in the output). Repeat for several stop strings.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Cap the KV cache at N tokens (prompt + output); default the bundle's context.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True,
              help="Where to run: cpu, cuda (needs onnxruntime-gpu), or auto (cuda when available).")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for ONNX Runtime (default: all cores, or $CONFLAYERS_THREADS).")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the bundle's files at load "
              "(faster start for large bundles; sizes are still checked).")
@click.option("--kv-cache", type=click.Choice(KV_CACHES), default="float32", show_default=True,
              help=KV_CACHE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per prompt (index, id, "
              "text, finish_reason, token_ids, metrics) instead of text and a metrics line.")
@friendly_errors
def run_main(bundle, prompt, prompts_file, task, stream, no_speculate, chat, max_new_tokens, temperature,
             top_p, top_k, seed, stop, max_context, device, num_threads, no_verify, kv_cache, as_json):
    """Generate text with a compiled BUNDLE using self-speculative decoding.

    Prints each completion on stdout and a one-line metrics summary on stderr (profile, tokens/s,
    time to first token, acceptance rate, mean accepted tokens per draft step, draft steps, and
    whether the speed guard turned drafting off), or JSON lines with --json.
    """
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt or --prompts")
    if prompt == "":
        raise CliError("--prompt must not be empty")
    items = [PromptItem(0, prompt)] if prompt is not None else read_prompts_file(prompts_file)
    engine = load_engine(bundle, device, max_context, num_threads, verify=not no_verify, kv_cache=kv_cache)
    chat = _resolve_chat(engine, chat)
    gen_args = dict(task=task, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, stop=list(stop) or None, speculate=not no_speculate)
    _check_items(engine, items, chat, gen_args)
    for index, item in enumerate(items):
        try:
            _run_one(engine, index, item, chat, gen_args, stream, as_json)
        except EXPECTED_ERRORS as e:
            raise CliError(f"{item.where()}{_one_line(e)}") from None


# -- inspect ----------------------------------------------------------------------------------


# Figure keys the compiler writes (conflayers.compiler.pipeline), with the label inspect shows;
# the first alias found wins. Other scalar figures follow as `key value`.
FIGURE_LABELS = [
    (("acceptance_rate", "acceptance"), "acceptance", "{:.3f}"),
    (("mean_accepted_tokens", "mean_accepted"), "mean accepted tokens", "{:.2f}"),
    (("predicted_speedup",), "predicted speed-up", "{:.2f}x"),
    (("measured_speedup", "speedup"), "measured speed-up", "{:.2f}x"),
    (("split",), "split", "{}"),
    (("validation_prompts",), "prompts", "{}"),
    (("identical_to_plain",), "identical to plain decoding", "{}"),
    (("measured_on",), "measured on", "{}"),
]


def _figures_text(figures: dict) -> str:
    """Known figures with friendly labels, then any other scalar figures as key=value."""
    if not figures:
        return "none recorded"
    parts, used = [], set()
    for aliases, label, fmt in FIGURE_LABELS:
        key = next((a for a in aliases if a in figures), None)
        if key is not None:
            used.add(key)
            v = figures[key]
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            parts.append(f"{label} {fmt.format(v) if numeric or fmt == '{}' else v}")
    for key, v in figures.items():
        if key not in used and isinstance(v, (str, int, float, bool)) and v is not None:
            parts.append(f"{key} {v}")
    return ", ".join(parts) if parts else "none recorded"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _layers(xs) -> str:
    return ",".join(str(x) for x in xs) if xs else "-"


def render_description(d: dict) -> str:
    model = d["model"]
    out = [f"Bundle {d['path']}",
           f"  format {d['format']} v{d['format_version']}, compiler {d['compiler_version']}, "
           f"created {d['created']}, {_size(d['total_bytes'])} in all",
           f"Model {model['name']} ({model['architecture']}, {model['num_layers']} layers, hidden "
           f"{model['hidden_size']}, vocabulary {model['vocab_size']})",
           f"  target {model.get('target', 'fp32')}"
           + (" (GGUF tensors: " + ", ".join(f"{n} {t}" for t, n in model["gguf_types"].items()) + ")"
              if model.get("gguf_types") else ""),
           f"  config sha256  {model['config_sha256']}",
           f"  weights sha256 {model['weights_sha256']}",
           f"  max context {d['max_context']} tokens; tokenizer {d['tokenizer']['file']}"
           f" ({'with' if d['tokenizer']['chat_template'] else 'no'} chat template)",
           "Graphs"]
    for g in d["graphs"]:
        extra = ""
        if "kv_layers" in g:
            extra = f"  layers kept {_layers(g['kv_layers'])}"
        elif "vocab" in g:
            extra = f"  vocabulary {g['vocab'] or 'full'}"
        out.append(f"  {g['role']:<10} {g['file']:<32} {_size(g['bytes']):>9}{extra}")
    for w in d["weights"]:
        out.append(f"  {'weights':<10} {w['file']:<32} {_size(w['bytes']):>9}")
    out.append(f"Profiles (default: {d['default_profile'] or 'none'})")
    for task, p in d["profiles"].items():
        dr = p["draft"]
        if dr.get("kind") == "ngram":
            out.append(f"  {task}{' (default)' if task == d['default_profile'] else ''}")
            out.append(f"    draft: n-gram lookup {dr['ngram']}")
            out.append(f"    figures: {_figures_text(p['figures'])}")
            continue
        vocab = "full" if dr["vocab_subset_size"] is None else f"{dr['vocab_subset_size']} tokens"
        stop = "-" if dr["confidence_stop"] is None else f"{dr['confidence_stop']:g}"
        out.append(f"  {task}{' (default)' if task == d['default_profile'] else ''}")
        out.append(f"    draft: skip layers {_layers(dr['skip_layers'])}, skip attention "
                   f"{_layers(dr['skip_attention'])}, skip MLP {_layers(dr['skip_mlp'])}; precision "
                   f"{dr['precision']}, k={dr['max_draft_tokens']}, confidence stop {stop}, vocabulary {vocab}")
        out.append(f"    figures: {_figures_text(p['figures'])}")
    return "\n".join(out)


# -- verify -----------------------------------------------------------------------------------


# -- the `conflayers` group -------------------------------------------------------------------


@click.group(name="conflayers", context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """conflayers runtime: inspect, verify and run compiled self-speculative decoding bundles."""


@main.command("inspect")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@friendly_errors
def inspect_cmd(bundle, as_json):
    """Summarise a BUNDLE: model identity, context, graphs and their sizes, and every skip
    profile with its draft settings and compile-time figures (acceptance, mean accepted tokens,
    predicted and measured speed-up, and the split they were measured on).

    Reads the manifest and profiles only (checks file sizes, not checksums: use `verify`)."""
    description = Bundle.open(bundle, verify=False).describe()
    click.echo(json.dumps(description, indent=2) if as_json else render_description(description))


@main.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print {\"ok\": ..., \"problems\": [...]} as JSON.")
@friendly_errors
def verify_cmd(bundle, as_json):
    """Re-check every file checksum and the manifest of a BUNDLE.

    Exit code 0 when the bundle is sound, 1 with the problems listed when it is not, 2 when
    BUNDLE is not a directory."""
    if not os.path.isdir(bundle):
        raise CliError(f"bundle {bundle} does not exist or is not a directory")
    problems = verify_bundle(bundle)
    if as_json:
        click.echo(json.dumps({"bundle": os.path.abspath(bundle), "ok": not problems, "problems": problems}))
    elif problems:
        click.echo(f"FAILED: {os.path.abspath(bundle)} has {len(problems)} problem(s):")
        for p in problems:
            click.echo(f"  - {p}")
    else:
        n = len(Bundle.open(bundle, verify=False).manifest["files"])
        click.echo(f"OK: {os.path.abspath(bundle)} is sound ({n} files, sha256 verified)")
    if problems:
        raise click.exceptions.Exit(1)


main.add_command(run_main, name="run")


if __name__ == "__main__":  # pragma: no cover
    main()
