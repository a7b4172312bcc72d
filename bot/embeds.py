"""Every text and embed the bot shows, built by pure functions that stay within Discord's limits.

Limits (../shared/reference/discord.md §2): message content 2000 characters; per embed title 256,
description 4096, 25 fields, field name 256 / value 1024, footer 2048, author 256; all embeds of a
message together 6000; files 10 MiB each (the default tier). `fit_embed` enforces them on any
embed, so callers can pass user text (job names, dataset paths, log lines) without counting.
Nothing here does I/O except `loss_curve_png`, which is CPU work to run in a thread.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Sequence
from typing import Any

import discord

from services.dataset.report import DatasetReport
from services.jobs.events import Cancelled, Failed, Finished
from services.jobs.model import Job, JobState
from services.settings import redact
from services.vastai import Offer

MAX_CONTENT = 2000
MAX_TITLE = 256
MAX_DESCRIPTION = 4096
MAX_FIELDS = 25
MAX_FIELD_NAME = 256
MAX_FIELD_VALUE = 1024
MAX_FOOTER = 2048
MAX_AUTHOR = 256
MAX_EMBED_TOTAL = 6000
MAX_FILE_BYTES = 10 * 1024 * 1024
ELLIPSIS = "…"

COLOR_INFO = 0x5865F2
COLOR_OK = 0x57F287
COLOR_WARN = 0xFEE75C
COLOR_ERROR = 0xED4245
COLOR_MUTED = 0x99AAB5

STATE_LABELS: dict[JobState, str] = {
    JobState.VALIDATING: "checking the dataset",
    JobState.AWAITING_CONFIRMATION: "waiting for confirmation",
    JobState.QUEUED: "queued",
    JobState.RENTING: "renting a GPU",
    JobState.WAITING_READY: "waiting for the machine",
    JobState.UPLOADING: "uploading the dataset",
    JobState.PREPARED: "prepared (no training)",
    JobState.TRAINING: "training",
    JobState.COLLECTING: "saving the LoRA",
    JobState.SUCCEEDED: "done",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}

# every Readiness step the pipeline, ssh.wait_ready and the trainer's phases announce (a test checks
# that each `Readiness("...")` literal in services/ has one); worded to read as done (✓) or under way (⏳)
READINESS_LABELS: dict[str, str] = {
    "renting": "renting a GPU",
    "rented": "GPU rented",
    "api": "machine booting",
    "api_running": "machine booted",
    "tcp": "SSH port",
    "auth": "SSH login",
    "probe": "GPU check",
    "ready": "machine ready",
    "uploading": "dataset upload",
    "uploaded": "dataset verified on the machine",
    "resuming": "resuming from a checkpoint",
    "launched": "trainer started",
    "prefetching": "base model prefetch",
    "downloading": "base model download",
    "downloading_model": "base model download",
    "loading": "loading the base model",
    "loading_model": "loading the base model",
    "quantizing": "quantizing the model",
    "caching_latents": "caching latents",
    "sampling": "sample images",
    "training": "training",
    "saving": "saving a checkpoint",
    "done": "trainer finished",
    "collecting": "storing the LoRA",
}

# what to do next, per failure kind (services.progress.FailureKind and the pipeline's own kinds)
FAILURE_ADVICE: dict[str, str] = {
    "cuda_oom": "The GPU ran out of memory: try a lower `rank` (16 or less) or the `fast` preset.",
    "killed": "The machine ran out of system memory: try again; the bot picks hosts with more RAM.",
    "gated_model": "The base model could not be downloaded (Hugging Face token or licence): tell the operator.",
    "disk_full": "The machine's disk filled up: try again; tell the operator if it repeats.",
    "no_images": "The trainer found no usable images: check the zip with `/train dry_run:True`.",
    "user": "Fix the dataset or the options and run /train again.",
    "stalled": "The trainer stopped making progress (not your doing): run /train again.",
    "stall": "The trainer stopped making progress (not your doing): run /train again.",
    "infra": "The rented machine failed (not your doing): run /train again.",
    "model_not_found": "The base model's repository does not exist: tell the operator (a typo in the recipe?).",
    "host_fault": "The rented GPU or its driver failed (not your doing): run /train again.",
    "nan_loss": "The loss became NaN and the LoRA would be ruined: try a lower `learning_rate`.",
    "budget": "The daily budget is used up: try again tomorrow (UTC) or ask an admin.",
    "max_runtime": "The job ran past the time limit and was stopped: try fewer `steps`.",
    "max_cost": "The job reached the cost cap and was stopped: try fewer `steps` or a lower `rank`.",
    "no_offers": "No GPU matched the limits right now: try again later or a higher `max_price`.",
}


# --- text helpers -----------------------------------------------------------------------------
def truncate(text: str, limit: int) -> str:
    """At most `limit` characters, with an ellipsis when cut."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - 1)] + ELLIPSIS


def truncate_head(text: str, limit: int) -> str:
    """Keep the end (the newest log lines), at most `limit` characters."""
    if len(text) <= limit:
        return text
    return ELLIPSIS + text[len(text) - limit + 1:]


def defuse(text: str) -> str:
    """Break every backtick run (a zero-width space after each backtick: no run of two or more is
    left, so nothing inside can open or close a fence) and every `<@`, `<#`, `@everyone`/`@here`."""
    text = text.replace("`", "`\u200b")
    for token in ("<@", "<#", "@everyone", "@here"):
        text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def code_block(text: str, limit: int, lang: str = "") -> str:
    """A fenced code block of at most `limit` characters, keeping the last lines; backticks and
    mentions inside the text are defused so the block cannot be closed early nor ping anyone."""
    fence_open, fence_close = f"```{lang}\n", "\n```"
    body = defuse(text).strip("\n") or " "
    room = limit - len(fence_open) - len(fence_close)
    if room < 2:
        return truncate(body, limit)
    return fence_open + truncate_head(body, room) + fence_close


def progress_bar(fraction: float, width: int = 20) -> str:
    fraction = min(1.0, max(0.0, fraction if fraction == fraction else 0.0))  # NaN -> 0
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled) + f" {fraction * 100:.0f}%"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"


def fmt_money(usd: float | None) -> str:
    if usd is None:
        return "?"
    return f"${usd:.2f}" if usd >= 0.1 else f"${usd:.3f}"


def fmt_loss(loss: float | None) -> str:
    return "?" if loss is None else f"{loss:.4f}"


def fmt_when(ts: float | None) -> str:
    """A Discord timestamp (rendered in each reader's time zone)."""
    return "?" if ts is None else f"<t:{int(ts)}:R>"


def message(text: str) -> str:
    """Any plain message, within the 2000-character limit."""
    return truncate(text, MAX_CONTENT) or "…"


def error_text(text: str) -> str:
    return message(f"⚠️ {text}")


def log_message(job: Job, text: str, secrets: Sequence[str]) -> str:
    """A log snippet in a code block, redacted again here (belt and braces)."""
    head = f"`{job.id}` log"
    return head + "\n" + code_block(redact(text, list(secrets)), MAX_CONTENT - len(head) - 1)


# --- fitting embeds into Discord's limits --------------------------------------------------------
def embed_size(embed: discord.Embed) -> int:
    return len(embed)


def fit_embed(embed: discord.Embed, budget: int = MAX_EMBED_TOTAL) -> discord.Embed:
    """Return a copy of `embed` within every per-part limit and within `budget` characters overall."""
    data: dict[str, Any] = dict(embed.to_dict())
    if "title" in data:
        data["title"] = truncate(str(data["title"]), MAX_TITLE)
    if "description" in data:
        data["description"] = truncate(str(data["description"]), MAX_DESCRIPTION)
    if "footer" in data and "text" in data["footer"]:
        data["footer"]["text"] = truncate(str(data["footer"]["text"]), MAX_FOOTER)
    if "author" in data and "name" in data["author"]:
        data["author"]["name"] = truncate(str(data["author"]["name"]), MAX_AUTHOR)
    fields = data.get("fields", [])[:MAX_FIELDS]
    for f in fields:
        f["name"] = truncate(str(f.get("name") or "\u200b"), MAX_FIELD_NAME) or "\u200b"
        f["value"] = truncate(str(f.get("value") or "\u200b"), MAX_FIELD_VALUE) or "\u200b"
    data["fields"] = fields
    out = discord.Embed.from_dict(data)
    # over budget: shorten the description, then drop fields from the end, then shorten the rest
    excess = len(out) - budget
    if excess > 0 and out.description:
        keep = max(1, len(out.description) - excess)
        out.description = truncate(out.description, keep)
    while len(out) > budget and out.fields:
        out.remove_field(len(out.fields) - 1)
    if len(out) > budget:
        if out.footer.text:
            out.set_footer(text=truncate(out.footer.text, max(1, len(out.footer.text) - (len(out) - budget))))
    if len(out) > budget and out.title:
        out.title = truncate(out.title, max(1, len(out.title) - (len(out) - budget)))
    return out


def fit_embeds(embeds: Sequence[discord.Embed]) -> list[discord.Embed]:
    """Up to 10 embeds whose total stays within 6000 characters (later ones get what is left)."""
    out: list[discord.Embed] = []
    left = MAX_EMBED_TOTAL
    for e in list(embeds)[:10]:
        if left < 50:
            break
        fitted = fit_embed(e, budget=left)
        left -= len(fitted)
        out.append(fitted)
    return out


def _redact_value(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [_redact_value(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v, secrets) for k, v in value.items()}
    return value


def redact_embed(embed: discord.Embed, secrets: Sequence[str]) -> discord.Embed:
    return discord.Embed.from_dict(_redact_value(embed.to_dict(), list(secrets)))


# --- /offers ---------------------------------------------------------------------------------------
def offers_embed(offers: Sequence[Offer], *, gpu: str, max_price: float | None, region: str | None,
                 would_pay: Offer | None = None) -> discord.Embed:
    """The offers found, best first, and the offer /train would rent now (`would_pay`)."""
    scope = f"{gpu}" + (f" in {region}" if region else "") + (f", at most ${max_price:.2f}/h" if max_price else "")
    e = discord.Embed(title=f"GPU offers: {scope}", color=COLOR_INFO)
    if would_pay is not None:
        e.description = (
            f"/train would rent now: **{would_pay.num_gpus}x {would_pay.gpu_name}** at "
            f"**${would_pay.dph_total:.3f}/h** in {would_pay.geolocation or '?'} (offer `{would_pay.id}`, "
            f"reliability {would_pay.reliability:.3f})."
        )
    else:
        e.description = "/train would find no offer under the bot's limits right now."
    if not offers:
        e.description += "\nNo offer matches these filters. Try a higher max_price, another region or GPU."
        e.color = COLOR_WARN
        return fit_embed(e)
    for i, o in enumerate(offers[:10], 1):
        e.add_field(
            name=f"{i}. {o.num_gpus}x {o.gpu_name} · ${o.dph_total:.3f}/h",
            value=(f"region {o.region or '?'} ({o.geolocation or '?'})\nreliability {o.reliability:.3f} · "
                   f"down {o.inet_down:.0f} Mb/s · id `{o.id}`"),
            inline=True,
        )
    e.set_footer(text="Prices are per hour, billed per second. Best offer first (price, reliability, bandwidth).")
    return fit_embed(e)


# --- /train ----------------------------------------------------------------------------------------
def report_embed(report: DatasetReport, *, name: str | None = None) -> discord.Embed:
    ok = report.ready
    e = discord.Embed(
        title=("Dataset ready" if ok else "Dataset not ready") + (f": {name}" if name else ""),
        description=report.render_summary(),
        color=COLOR_OK if ok else COLOR_ERROR,
    )
    e.add_field(name="images", value=str(report.images))
    filled = f" (+{report.filled} filled)" if report.filled else ""
    e.add_field(name="captioned", value=f"{report.captioned}{filled}")
    if report.trigger_word:
        e.add_field(name="trigger word", value=f"`{report.trigger_word}`")
    problems = report.problems
    if problems:
        lines = [f"• `{p.code}` {p.path + ': ' if p.path else ''}{p.message}" for p in problems[:15]]
        if len(problems) > 15:
            lines.append(f"… and {len(problems) - 15} more")
        e.add_field(name=f"problems ({len(problems)})", value="\n".join(lines), inline=False)
    if report.repairs:
        lines = [f"• `{r.code}` {r.path + ': ' if r.path else ''}{r.message}" for r in report.repairs[:10]]
        if len(report.repairs) > 10:
            lines.append(f"… and {len(report.repairs) - 10} more")
        e.add_field(name=f"repaired ({len(report.repairs)})", value="\n".join(lines), inline=False)
    return fit_embed(e)


def quote_embed(job: Job, quote: Any, offer: Offer | None, *, dry_run: bool = False) -> discord.Embed:
    """The price before anything is rented. `quote` is services.quote.Quote (summary() + fields)."""
    e = discord.Embed(title=f"Quote for {job.name or job.id}", color=COLOR_INFO)
    summary = quote.summary() if quote is not None and hasattr(quote, "summary") else ""
    e.description = summary or "No quote available."
    low, high = getattr(quote, "total_low_s", None), getattr(quote, "total_high_s", None)
    if low is not None and high is not None:
        e.add_field(name="estimated time", value=f"{fmt_duration(low)} – {fmt_duration(high)}")
    c_low, c_high = getattr(quote, "cost_low_usd", None), getattr(quote, "cost_high_usd", None)
    if c_low is not None and c_high is not None:
        e.add_field(name="estimated cost", value=f"{fmt_money(c_low)} – {fmt_money(c_high)}")
    if offer is not None:
        e.add_field(name="GPU", value=f"{offer.num_gpus}x {offer.gpu_name}")
        e.add_field(name="price", value=f"${offer.dph_total:.3f}/h")
        e.add_field(name="region", value=offer.geolocation or "?")
    recipe = job.recipe or {}
    if recipe:
        bits = [f"{k} {recipe[k]}" for k in ("steps", "rank", "learning_rate") if k in recipe]
        if bits:
            e.add_field(name="recipe", value=" · ".join(bits), inline=False)
    if dry_run:
        e.set_footer(text="Dry run: nothing was rented.")
    else:
        e.set_footer(text=f"job {job.id} · press Confirm to rent and train, or Cancel.")
    return fit_embed(e)


# --- live status -------------------------------------------------------------------------------------
def _step(step: str | tuple[str, str, float]) -> tuple[str, str, float | None]:
    return (step, "", None) if isinstance(step, str) else step


def readiness_lines(job: Job, steps: Sequence[str | tuple[str, str, float]], now: float) -> list[str]:
    """Earlier steps done (✓, with how long each took), the latest under way (⏳, its details and
    elapsed time) until the job ends."""
    parsed = [_step(s) for s in steps]
    out = []
    for i, (key, detail, started) in enumerate(parsed):
        label = READINESS_LABELS.get(key, key.replace("_", " "))
        last = i == len(parsed) - 1
        end = parsed[i + 1][2] if not last else (job.finished_at or now)
        took = f" · {fmt_duration(end - started)}" if started is not None and end is not None else ""
        if last and not job.state.terminal:
            out.append(f"⏳ {label}" + (f" — {detail}" if detail else "") + took)
        elif last and job.state is not JobState.SUCCEEDED:
            out.append(f"✗ {label}{took}")
        else:
            out.append(f"✓ {label}{took}")
    return out


def status_embed(job: Job, *, steps: Sequence[str | tuple[str, str, float]] = (),
                 queue_position: int | None = None, now: float | None = None, continued: bool = False,
                 thread_id: int | None = None) -> discord.Embed:
    """The one status message of a job, edited in place."""
    now = now or time.time()
    color = {JobState.SUCCEEDED: COLOR_OK, JobState.FAILED: COLOR_ERROR, JobState.CANCELLED: COLOR_MUTED}.get(
        job.state, COLOR_INFO)
    e = discord.Embed(title=f"{job.name or 'LoRA'} · {STATE_LABELS.get(job.state, job.state.value)}", color=color)
    lines = []
    if job.total_steps:
        lines.append(f"`{progress_bar(job.progress)}`")
        live_phase = job.phase and not job.state.terminal  # a finished job is not "training" any more
        lines.append(f"step {job.step}/{job.total_steps}" + (f" · {job.phase}" if live_phase else ""))
    elif job.phase:
        lines.append(job.phase)
    if queue_position and job.state is JobState.QUEUED:
        lines.append(f"position in queue: {queue_position}")
    if continued:
        lines.append("(continued from an earlier status message)")
    # the title already says the state; with a checklist below, repeating it says nothing
    e.description = "\n".join(lines) or ("" if steps else STATE_LABELS.get(job.state, job.state.value))
    if job.eta_s is not None and not job.state.terminal:
        # a Discord timestamp: every reader's client counts it down between edits
        e.add_field(name="ETA", value=f"done {fmt_when(now + job.eta_s)}")
    elif not job.state.terminal and job.rented_at and job.quote.get("total_high_s"):
        e.add_field(name="ETA (quote)", value=f"done {fmt_when(job.rented_at + float(job.quote['total_high_s']))} "
                                               "at the latest")
    if job.loss is not None:
        e.add_field(name="loss", value=fmt_loss(job.loss))
    e.add_field(name="cost so far", value=fmt_money(job.cost_so_far(now)))
    if job.gpu_name:
        e.add_field(name="GPU", value=job.gpu_name + (f" · ${job.dph_total:.3f}/h" if job.dph_total else ""))
    if steps:
        shown = readiness_lines(job, steps, now)[-12:]
        e.add_field(name="steps", value="\n".join(shown), inline=False)
    if thread_id is not None and continued:
        e.add_field(name="samples and logs", value=f"<#{thread_id}>", inline=False)
    if job.reason and job.state.terminal:
        e.add_field(name="reason", value=job.reason, inline=False)
    e.set_footer(text=f"job {job.id} · {job.user_name or job.user_id}")
    return fit_embed(e)


def jobs_embed(jobs: Sequence[Job], *, positions: dict[str, int | None] | None = None, title: str = "Your jobs",
               now: float | None = None) -> discord.Embed:
    positions = positions or {}
    e = discord.Embed(title=title, color=COLOR_INFO)
    if not jobs:
        e.description = "No jobs."
        return fit_embed(e)
    for job in jobs[:MAX_FIELDS]:
        bits = [STATE_LABELS.get(job.state, job.state.value)]
        if job.total_steps:
            bits.append(f"`{progress_bar(job.progress, 10)}` {job.step}/{job.total_steps}")
        pos = positions.get(job.id)
        if pos and job.state is JobState.QUEUED:
            bits.append(f"queue #{pos}")
        if job.eta_s is not None and not job.state.terminal:
            bits.append(f"ETA {fmt_duration(job.eta_s)}")
        if job.loss is not None:
            bits.append(f"loss {fmt_loss(job.loss)}")
        bits.append(fmt_money(job.cost_so_far(now)))
        e.add_field(name=f"{job.id} · {job.name or '?'} ({job.user_name or job.user_id})", value=" · ".join(bits),
                    inline=False)
    if len(jobs) > MAX_FIELDS:
        e.set_footer(text=f"{len(jobs) - MAX_FIELDS} more not shown")
    return fit_embed(e)


def finished_embed(job: Job, ev: Finished, *, link: bool = True) -> discord.Embed:
    e = discord.Embed(title=f"✅ {job.name or 'LoRA'} is ready", color=COLOR_OK)
    if link:
        e.description = f"**[Download the LoRA]({ev.lora_url})**"
        if ev.link_expires_at:
            e.description += f"\nThe link expires {fmt_when(ev.link_expires_at)}."
        e.description += f"\nA fresh link any time: `/link {job.id}`."
    else:
        e.description = f"The link was sent to the owner by DM (`/link {job.id}` for a fresh one)."
    e.add_field(name="duration", value=fmt_duration(ev.duration_s))
    e.add_field(name="cost", value=fmt_money(ev.cost_usd))
    e.add_field(name="final loss", value=fmt_loss(ev.final_loss))
    extra = [f"[{name}]({url})" for name, url in ev.links.items() if url != ev.lora_url]
    if extra:
        e.add_field(name="more files", value=" · ".join(extra), inline=False)
    add_phase_field(e, job)
    e.set_footer(text=f"job {job.id} · trigger word: {job.trigger_word or '?'}")
    return fit_embed(e)


def failed_embed(job: Job, ev: Failed, secrets: Sequence[str] = ()) -> discord.Embed:
    title = f"❌ {job.name or 'LoRA'} failed" + (" (retrying on another machine)" if ev.retrying else "")
    e = discord.Embed(title=title, color=COLOR_WARN if ev.retrying else COLOR_ERROR)
    e.description = f"**{ev.kind}**: {redact(ev.reason, list(secrets))}"
    if not ev.retrying:
        advice = FAILURE_ADVICE.get(ev.kind, "Run /train again; if it fails the same way, tell the operator.")
        e.add_field(name="what now", value=advice, inline=False)
    if ev.last_lines:
        e.add_field(name="last log lines", value=code_block(redact(ev.last_lines, list(secrets)), MAX_FIELD_VALUE),
                    inline=False)
    charged = ("nothing was charged" if ev.cost_usd <= 0
               else f"{fmt_money(ev.cost_usd)} of GPU time was charged")
    e.add_field(name="cost", value=charged)
    e.set_footer(text=f"job {job.id}")
    return fit_embed(e)


def cancelled_embed(job: Job, ev: Cancelled) -> discord.Embed:
    e = discord.Embed(title=f"🛑 {job.name or 'LoRA'} cancelled", color=COLOR_MUTED)
    destroyed = (f"instance {ev.destroyed_instance_id} destroyed" if ev.destroyed_instance_id is not None
                 else "no machine was running")
    e.description = f"{destroyed}; cost {fmt_money(ev.cost_usd)}."
    if ev.partial_url:
        e.description += f"\n[Partial LoRA]({ev.partial_url})"
    e.set_footer(text=f"job {job.id}")
    return fit_embed(e)


def cancel_result_text(job: Job, destroyed_instance_id: int | None, cost_usd: float) -> str:
    what = (f"instance {destroyed_instance_id} was destroyed" if destroyed_instance_id is not None
            else "no machine was running")
    return message(f"Cancelled job `{job.id}` ({job.name or '?'}): {what}; it cost {fmt_money(cost_usd)}.")


def instances_text(instances: Iterable[Any], destroyed: bool) -> str:
    items = list(instances)
    if not items:
        return "No orphaned instances."
    verb = "destroyed" if destroyed else "found (not destroyed)"
    lines = [f"{len(items)} orphaned instance(s) {verb}:"]
    for inst in items[:30]:
        lines.append(f"• `{inst.id}` {getattr(inst, 'label', None) or '?'}")
    return "\n".join(lines)  # the caller redacts, then fits (message())


# --- images ----------------------------------------------------------------------------------------
def loss_curve_png(points: Sequence[tuple[int, float]], width: int = 800, height: int = 400) -> bytes:
    """A small line chart of loss over steps (Pillow only; CPU work, call it in a thread)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (30, 31, 34))
    draw = ImageDraw.Draw(img)
    pad = 40
    pts = [(int(s), float(v)) for s, v in points if v == v and abs(v) != float("inf")]
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline=(90, 90, 90))
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) or 1
        y0, y1 = min(ys), max(ys)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y1 = y0 + 1e-9
        plot_w, plot_h = width - pad - pad // 2, height - pad - pad // 2

        def xy(p: tuple[int, float]) -> tuple[float, float]:
            return (pad + (p[0] - x0) / (x1 - x0) * plot_w, pad // 2 + (1 - (p[1] - y0) / (y1 - y0)) * plot_h)

        if len(pts) == 1:
            x, y = xy(pts[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(88, 101, 242))
        else:
            draw.line([xy(p) for p in pts], fill=(88, 101, 242), width=2)
        draw.text((pad, height - pad + 8), f"step {x0} … {x1}", fill=(200, 200, 200))
        draw.text((width // 2, height - pad + 8), f"loss {min(ys):.4f} … {max(ys):.4f}", fill=(200, 200, 200))
    else:
        draw.text((width // 2 - 40, height // 2), "no loss data", fill=(200, 200, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


SAMPLE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_SAMPLE_PIXELS = 16_000_000


def shrink_image(data: bytes, limit: int = MAX_FILE_BYTES) -> tuple[bytes, str]:
    """Make an image fit the upload limit: as is when small enough, else a smaller JPEG.
    Returns (bytes, extension). CPU work, call it in a thread."""
    from PIL import Image

    # box output: only the formats samples come in (no plugin such as EPS, which runs Ghostscript),
    # and the pixel count checked from the header before anything is decoded (review M7)
    img: Any = Image.open(io.BytesIO(data), formats=SAMPLE_FORMATS)
    if img.width * img.height > MAX_SAMPLE_PIXELS:
        raise ValueError(f"image of {img.width}x{img.height} pixels is larger than a sample may be")
    if len(data) <= limit:
        return data, ""
    img = img.convert("RGB")
    quality = 90
    while True:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if buf.tell() <= limit or (quality <= 40 and max(img.size) <= 256):
            return buf.getvalue(), ".jpg"
        if quality > 40:
            quality -= 15
        else:
            img = img.resize((max(1, img.width // 2), max(1, img.height // 2)))


def add_phase_field(e: discord.Embed, job: Job) -> None:
    """Issue 18: where the time went, one compact line (measured per phase; the quote's range where missed)."""
    from services.jobs import phases

    if job.measured.get("phases"):
        e.add_field(name="time per phase", value=truncate(phases.compact_line(job), MAX_FIELD_VALUE), inline=False)
