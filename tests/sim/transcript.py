"""`python -m tests.sim.transcript`: what a user sees from /train to the link (review discord.md §5),
rendered through the real embed builders (bot/embeds.py) and texts of bot/notifier.py, bot/controls.py.

It prints the messages of one imagined job (the quote step, the status message at each stage, a log
snippet, the end, a failure, /status afterwards) in the review's ┃ notation.
"""

from __future__ import annotations

import time
from typing import Any

import discord

from bot import embeds
from bot.controls import confirm_cancel_text, status_view
from services.jobs.events import Failed, Finished
from services.jobs.model import Job, JobState

NOW = time.time() - 4000  # the job started a little over an hour ago
URL = "https://acct.r2.cloudflarestorage.com/lora/cat.safetensors?X-Amz-Signature=…"


def show(e: discord.Embed, view: discord.ui.View | None = None) -> str:
    d: dict[str, Any] = dict(e.to_dict())
    out = []
    if d.get("title"):
        out.append(f"   ┃ {d['title']}")
    for line in (d.get("description") or "").splitlines():
        out.append(f"   ┃   {line}")
    inline = [f"[{f['name']}] {f['value']}" for f in d.get("fields", []) if f.get("inline", True)]
    if inline:
        out.append("   ┃ " + "  ".join(inline))
    for f in d.get("fields", []):
        if not f.get("inline", True):
            out.append(f"   ┃ [{f['name']}]")
            out.extend(f"   ┃   {line}" for line in f["value"].splitlines())
    if d.get("image"):
        out.append(f"   ┃ image: {d['image']['url']}")
    if d.get("footer"):
        out.append(f"   ┃ footer: {d['footer']['text']}")
    if view is not None:
        out.append("   " + " ".join(f"[{getattr(i, 'label', '?')}]" for i in view.children))
    return "\n".join(out)


def readable(text: str) -> str:
    return text.replace("\u200b", "​")  # the zero-width space stays, visible to nobody


def main() -> None:
    job = Job(id="a1b2c3d4", name="cat", trigger_word="sks", user_id="1001", user_name="ann", source="discord",
              guild_id=1, channel_id=2, status_message_id=3, state=JobState.QUEUED, created_at=NOW,
              quote={"total_low_s": 2211, "total_high_s": 3840})
    print("Ann: /train name:cat trigger_word:sks dataset:[cats.zip]")
    print(" ↳ (ephemeral) \"lorabot is thinking…\"  (first checked: the bot's channel permissions)")
    print(" ↳ (ephemeral, the deferral edited) " + embeds.message(
        f"Rent a GPU and train **cat**? The buttons expire {embeds.fmt_when(NOW + 600)}."))
    print("   ┃ Dataset ready: cat … ┃ Quote for cat …   [Confirm] [Cancel]   (persistent: lorabot:confirm:a1b2c3d4)")
    print("Ann presses Confirm")
    print(" ↳ (same message, type 7) \"Confirmed: queuing the job…\", then edited to:")
    print("   Job `a1b2c3d4` is number 2 in the queue. Progress: https://discord.com/channels/1/2/3 "
          "Cancel it with the button there or `/cancel a1b2c3d4`.")
    print("#channel (bot token), one status message edited in place:")
    print(show(embeds.status_embed(job, queue_position=2, now=NOW), status_view(job)))
    steps = [("renting", "looking for a RTX 4090", NOW + 10), ("rented", "RTX 4090 in Texas, US at $0.420/h",
                                                                 NOW + 14),
             ("api", "waiting for the instance to run", NOW + 15), ("tcp", "waiting for the SSH port of 1.2.3.4:22",
                                                                    NOW + 75)]
    j2 = job.model_copy(update={"state": JobState.WAITING_READY, "gpu_name": "RTX 4090", "dph_total": 0.42,
                                "rented_at": NOW + 14, "instance_id": 7000001})
    print(" … edited to")
    print(show(embeds.status_embed(j2, steps=steps, now=NOW + 80), status_view(j2)))
    steps += [("auth", "port open on 1.2.3.4:22; trying key auth", NOW + 90), ("probe", "logged in", NOW + 95),
              ("ready", "1.2.3.4:22 passed the probe", NOW + 100), ("uploading", "24 files, 18.2 MB", NOW + 101),
              ("uploaded", "18.2 MB verified on the box", NOW + 106), ("launched", "trainer started", NOW + 107),
              ("downloading", "7.9/23.8 GB", NOW + 110)]
    j3 = j2.model_copy(update={"state": JobState.TRAINING, "phase": "downloading"})
    print(" … edited to (model download)")
    print(show(embeds.status_embed(j3, steps=steps, now=NOW + 400), status_view(j3)))
    steps += [("loading", "", NOW + 900), ("quantizing", "Quantizing T5", NOW + 1000),
              ("caching_latents", "", NOW + 1100), ("training", "", NOW + 1150)]
    j4 = j3.model_copy(update={"phase": "training", "step": 420, "total_steps": 1500, "loss": 0.3412,
                               "sec_per_step": 1.3, "eta_s": 1404.0})
    print(" … edited to")
    print(show(embeds.status_embed(j4, steps=steps, now=NOW + 1700), status_view(j4)))
    print("thread \"samples · cat\" under the status message (thread id = message id, kept across restarts):")
    print("   step 500 + cat__000000500_0.jpg")
    log = embeds.log_message(job, "step 420/1500 loss=0.3412 lr=1e-4\nsaving sample ````md\n<@999> hi", [])
    for line in readable(log).splitlines():
        print(f"   {line}")
    print("   (sent with allowed_mentions none: it pings nobody, and `<@` is broken inside the block)")
    print("(after 50 min a fresh status message takes over; the old one is edited to)")
    pointer = discord.Embed(description="↪ continued below: https://discord.com/channels/1/2/4")
    pointer.set_footer(text="job a1b2c3d4")
    print(show(pointer))
    print("Ann presses [Cancel job] → (ephemeral, owner or admin only)")
    print("   " + confirm_cancel_text(j4.model_copy(update={"rented_at": time.time() - 1700}))
          + "  [Yes, cancel it] [Keep it running]")
    done = j4.model_copy(update={"state": JobState.SUCCEEDED, "step": 1500, "finished_at": NOW + 3720})
    ev = Finished(lora_url=URL, link_expires_at=NOW + 7 * 86400, duration_s=3720, cost_usd=0.43,
                  final_loss=0.2101)
    print("#channel, end: status edited (button removed) to")
    print(show(embeds.status_embed(done, steps=steps, now=NOW + 3720), status_view(done)))
    print(f"   <@1001> your LoRA **cat** is ready: <{URL}>      (pings the owner only)")
    e = embeds.finished_embed(done, ev)
    e.set_image(url="attachment://loss.png")
    print(show(e))
    print("   (refused with 403/50013/40005/50045: posted again without loss.png; refused again: sent by DM;")
    print("    delivered_at recorded, an undelivered result is sent again after a restart)")
    print("/status job:a1b2c3d4 afterwards (ephemeral, owner or admin):")
    st = embeds.status_embed(done, now=NOW + 4000)
    st.add_field(name="download", value=f"**[Download the LoRA]({URL})** · expires "
                                        f"{embeds.fmt_when(NOW + 4000 + 7 * 86400)}", inline=False)
    print(show(st))
    print("On failure:")
    failed = j4.model_copy(update={"state": JobState.FAILED})
    print("   <@1001> job `a1b2c3d4` failed.")
    print(show(embeds.failed_embed(failed, Failed(reason="training failed: CUDA out of memory", kind="cuda_oom",
                                                  last_lines="torch.OutOfMemoryError: CUDA out of memory",
                                                  cost_usd=0.12))))
    print("(<t:…:R> renders as e.g. \"in 23 minutes\" and counts down in each reader's client)")


if __name__ == "__main__":
    main()
