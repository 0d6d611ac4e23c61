"""`map` and `reduce`: a large task split into requests of a model process, scheduled like any of its work, and
aggregated; `map` resumes where it stopped after any crash (see llmsh/kernel/mapjobs.py).

    map smol --input prompts.jsonl --output out.jsonl                  # one request per line, results in input order
    map smol --input book.txt --split 1500 --template 'Summarise: {text}' --output parts.jsonl
    reduce smol --input parts.jsonl --template 'Combine these summaries: {texts}'
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from llmsh.commands.generation import SAMPLING_ARGS, sampling
from llmsh.commands.registry import CommandError, Context, UsageError, arg, command
from llmsh.kernel.errors import KernelError
from llmsh.kernel.jobs import CURRENT_JOB
from llmsh.kernel.mapjobs import DEFAULT_IN_FLIGHT, MapJob, read_input, sha256_text, template_fields
from llmsh.kernel.table import Entry

GROUP = "processes"


def _path(ctx: Context, name: str) -> Path:
    return ctx.path(name) if hasattr(ctx, "path") else Path(name).expanduser()


async def _read(ctx: Context, name: str) -> str:
    if name == "-":
        if ctx.stdin is None:
            raise UsageError("--input -: nothing is piped in (use '!cat FILE | map …' or --input FILE)")
        return "".join([piece async for piece in ctx.stdin])
    path = _path(ctx, name)
    try:
        return await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CommandError(f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None


async def _check_writable(ctx: Context, name: str) -> Path:
    path = _path(ctx, name)

    def touch() -> None:
        with open(path, "a", encoding="utf-8"):
            pass

    try:
        await asyncio.to_thread(touch)
    except OSError as e:
        raise CommandError(f"cannot write {name}: {e.strerror or e}") from None
    return path


async def _replicas(ctx: Context, entry: Entry, n: int) -> list[Entry]:
    """`entry` and n-1 more processes of the same model (`NAME-r2`, …), loaded now where they are missing."""
    procs = ctx.kernel.services.procs
    out = [entry]
    for i in range(2, n + 1):
        name = f"{entry.name}-r{i}"
        try:
            out.append(procs.resolve(name))
        except KernelError:
            o = entry.options
            out.append(await procs.load(entry.path, name=name, device=o.get("device") or entry.device,
                                        dtype=o.get("dtype"), nice=entry.nice, max_batch=o.get("max_batch"),
                                        ctx=o.get("ctx"), quant=o.get("quant")))
    return out


class _Control:
    """What `kill -STOP/-CONT %J` and `jobs` reach on a map job."""

    def __init__(self, job: MapJob) -> None:
        self.job = job

    def pause(self) -> None:
        self.job.paused.clear()

    def resume(self) -> None:
        self.job.paused.set()

    def progress(self) -> dict[str, Any]:
        return self.job.progress()


MAP_ARGS = (
    arg("target", nargs="?", metavar="PID|NAME", help="the model process (taken from the job with --resume)"),
    arg("--input", metavar="FILE", help="JSON lines (.jsonl/.json), or text (one prompt a line); '-' = piped text"),
    arg("--output", metavar="FILE", help="JSON lines out: id, text, token counts, error; in input order"),
    arg("--field", default="prompt", metavar="KEY", help="the prompt's field in JSON lines (default prompt)"),
    arg("--template", metavar="TEXT", help="prompt template with {field} names, e.g. 'Summarise: {text}'"),
    arg("--split", type=int, metavar="TOKENS", help="treat the input as one text, cut into chunks of this many tokens"),
    arg("--overlap", type=int, default=0, metavar="T", help="tokens each chunk repeats from the previous (--split)"),
    arg("--name", metavar="JOB", help="the job's name (default: derived from the command, so the same command resumes)"),
    arg("--resume", metavar="JOB", help="go on with job JOB where it stopped (its output is rewritten from the journal)"),
    arg("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, metavar="N",
        help=f"requests in flight at once per replica (default {DEFAULT_IN_FLIGHT})"),
    arg("--replicas", type=int, default=1, metavar="N",
        help="spread the lines over N processes of the model (NAME-r2… are loaded as needed, same nice)"),
)


@command(
    "map",
    "run every line of a file through a model process, in order, resumable after any crash",
    *MAP_ARGS,
    *SAMPLING_ARGS,
    description="Each input line becomes one request of the process (its nice, its batching); the output has one "
    "JSON line per input line, in input order, with an 'error' field for lines that failed (they never stop the job). "
    "Each finished line is journalled before it is written: after a crash, the same command (or --resume JOB) goes on "
    "where it stopped. 'map … &' is a shell job: jobs shows its progress, kill -STOP/-CONT %N pause and resume it.",
    structured=True,
    group=GROUP,
)
async def map_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`map PID|NAME --input FILE --output FILE [...]`."""
    maps = ctx.kernel.services.maps
    if args.resume:
        spec = await maps.spec(args.resume)
        if spec is None:
            raise CommandError(f"no map job named {args.resume!r}; see 'dmesg' or start it without --resume")
        for key, value in spec.items():
            if key == "params":
                for k, v in value.items():
                    setattr(args, k, v)
            elif getattr(args, key, None) in (None, "prompt", 0, 1, DEFAULT_IN_FLIGHT):
                setattr(args, key, value)
        args.name = args.resume
    if not args.target or not args.input or not args.output:
        raise UsageError("map PID|NAME --input FILE --output FILE (or map --resume JOB); see 'help map'")
    if args.in_flight < 1 or args.replicas < 1:
        raise UsageError(f"--in-flight {args.in_flight} --replicas {args.replicas}: give numbers ≥ 1")
    entry = ctx.kernel.services.procs.resolve(args.target)
    replicas = await _replicas(ctx, entry, args.replicas)
    params = sampling(args)
    text = await _read(ctx, args.input)
    output = await _check_writable(ctx, args.output)
    jsonl = args.input.endswith((".jsonl", ".json")) and not args.split
    if args.split:
        chunks = await ctx.kernel.services.procs.tokens("split", entry, text=text, tokens=args.split,
                                                        overlap=args.overlap)
        lines = read_input("\n".join(json.dumps({"text": c, "id": i + 1}) for i, c in enumerate(chunks)),
                           jsonl=True, field_name="text", template=args.template)
    else:
        if args.template and not jsonl and set(template_fields(args.template)) - {"text", args.field}:
            missing = sorted(set(template_fields(args.template)) - {"text", args.field})
            raise UsageError(f"--template names {', '.join(missing)}, but a text input only has {{text}}")
        lines = read_input(text, jsonl=jsonl, field_name=args.field, template=args.template)
    spec = {"target": str(entry.pid), "input": str(_path(ctx, args.input)) if args.input != "-" else "-",
            "output": str(output), "field": args.field, "template": args.template, "split": args.split,
            "overlap": args.overlap, "in_flight": args.in_flight, "replicas": args.replicas, "params": params}
    name = args.name or "map-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    job = MapJob(name, entry, lines, output, params, in_flight=args.in_flight, replicas=replicas)
    shell_job = CURRENT_JOB.get()
    if shell_job is not None:
        shell_job.control = _Control(job)
    progress = getattr(ctx, "progress", None)

    def on_progress(j: MapJob) -> None:
        if progress is not None:
            p = j.progress()
            eta = f", ETA {p['eta_s']:.0f}s" if p["eta_s"] is not None else ""
            progress(p["done"] / max(p["total"], 1), f"map {j.name}: {p['done']}/{p['total']}, {p['tok_s']:.1f} tok/s{eta}")

    summary = await maps.run(job, input_sha=sha256_text(text), spec=spec, on_progress=on_progress)
    line = (f"map {name}: {summary['done']}/{summary['total']} lines, {summary['errors']} errors, "
            f"{summary['tokens']} tokens, {summary['requests']} requests -> {args.output}")
    if getattr(args, "json", False):
        ctx.result(summary, line)
    else:
        ctx.warn(line + "\n")
    for rec in sorted(job.done.values(), key=lambda r: r["line"]):
        if rec.get("error") and rec["error"].startswith("line "):
            ctx.warn(f"llmsh: map: {rec['error']}\n")
    return 0


@command(
    "reduce",
    "combine partial results into one answer with a model process, in groups that fit its context",
    arg("target", metavar="PID|NAME", help="the model process"),
    arg("--input", required=True, metavar="FILE", help="JSON lines with a text field (map's output), or text lines"),
    arg("--template", required=True, metavar="TEXT", help="with {texts}: the group's texts, separated by blank lines"),
    arg("--field", default="text", metavar="KEY", help="the text's field in JSON lines (default text)"),
    *SAMPLING_ARGS,
    description="Groups the texts so that each prompt fits the context with room for --max-tokens, asks the model "
    "to combine each group, and repeats on the answers until one is left (map-reduce summarisation).",
    structured=True,
    group=GROUP,
)
async def reduce_cmd(ctx: Context, args: argparse.Namespace) -> int:
    """`reduce PID|NAME --input PARTS.jsonl --template 'Combine: {texts}'`."""
    if "texts" not in template_fields(args.template):
        raise UsageError("--template must contain {texts}")
    procs = ctx.kernel.services.procs
    entry = procs.resolve(args.target)
    params = sampling(args)
    max_tokens = int(params.get("max_tokens") or 256)
    params["max_tokens"] = max_tokens
    raw = await _read(ctx, args.input)
    texts = []
    for no, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if args.input.endswith((".jsonl", ".json")):
            try:
                rec = json.loads(line)
            except ValueError:
                ctx.warn(f"llmsh: reduce: line {no}: not JSON, left out\n")
                continue
            if isinstance(rec, dict) and isinstance(rec.get(args.field), str) and rec[args.field].strip():
                texts.append(rec[args.field])
        else:
            texts.append(line)
    if not texts:
        raise CommandError(f"{args.input}: no texts to combine")
    rounds = 0
    while len(texts) > 1 or rounds == 0:
        rounds += 1
        counted = await procs.tokens("count", entry, texts=[args.template.replace("{texts}", ""), *texts])
        overhead, counts, context = counted["counts"][0], counted["counts"][1:], counted["context"]
        room = context - max_tokens - overhead - 8  # 8: the chat of separators between texts, with margin
        groups: list[list[str]] = [[]]
        used = 0
        for text, n in zip(texts, counts):
            if n > room:
                raise CommandError(f"a text of {n} tokens does not fit the context of {context} with --max-tokens "
                                   f"{max_tokens}; map it with a smaller --split first")
            if groups[-1] and used + n + 2 > room:
                groups.append([])
                used = 0
            groups[-1].append(text)
            used += n + 2
        if len(groups) == len(texts) and len(texts) > 1:
            raise CommandError("no two texts fit one prompt together; lower --max-tokens or summarise them shorter")
        answers = []
        for group in groups:
            prompt = args.template.replace("{texts}", "\n\n".join(group))
            pieces = [p async for p in procs.generate(entry, prompt=prompt, params=params, client=ctx.client, result={})]
            answers.append("".join(pieces).strip())
        texts = answers
        if len(groups) == 1:
            break
    if getattr(args, "json", False):
        ctx.result({"text": texts[0], "rounds": rounds}, texts[0])
    else:
        ctx.write(texts[0] + "\n")
    return 0
