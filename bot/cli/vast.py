"""GPU market commands: offers, regions, rent, instances, destroy, balance."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from bot.cli.common import EXIT_INFRA, EXIT_USAGE, console, err_console, fail, print_json, run, settings
from services.jobcost import plan_for
from services.recipe import FluxRecipe, RecipeError
from services.settings import Settings
from services.vastai import (
    InsufficientCredit,
    JobPlan,
    NoOffers,
    Offer,
    OfferQuery,
    VastAuthError,
    VastClient,
    VastError,
    rent,
)

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _call(s: Settings, fn: Callable[[VastClient], Awaitable[T]]) -> T:
    """Run one client session, turning provider errors into one clear line and an exit code."""

    async def go() -> T:
        async with VastClient.from_settings(s) as client:
            return await fn(client)

    try:
        return run(go())
    except VastAuthError as exc:
        fail(str(exc), EXIT_USAGE)
    except (NoOffers, InsufficientCredit) as exc:
        fail(str(exc), EXIT_INFRA)
    except VastError as exc:
        fail(str(exc), EXIT_INFRA)


def query_from_settings(
    s: Settings,
    *,
    gpu: str | None = None,
    num_gpus: int = 1,
    region: str | None = None,
    max_price: float | None = None,
    limit: int = 20,
) -> OfferQuery:
    """The CLI's flags on top of the server's filters (an operator may look above the price cap)."""
    return OfferQuery.from_settings(s, gpu=gpu, num_gpus=num_gpus, regions=(region or "").split(","),
                                    max_dph=max_price, limit=limit)


def _offers_table(offers: list[Offer], steps: int) -> Table:
    table = Table(title=f"{len(offers)} offers, best first (ranked by the expected cost of a {steps}-step job)")
    for col in ("id", "gpu", "$/h", "job $", "$/GB down/up", "RAM GB", "reliability", "down Mb/s", "region"):
        table.add_column(col, justify="right" if col not in ("gpu", "region") else "left")
    for o in offers:
        table.add_row(
            str(o.id), f"{o.num_gpus}x {o.gpu_name}", f"{o.dph_total:.3f}",
            "-" if o.expected_cost is None else f"{o.expected_cost:.2f}",
            f"{o.inet_down_cost:.3f}/{o.inet_up_cost:.3f}", f"{o.cpu_ram / 1000:.0f}", f"{o.reliability:.3f}",
            f"{o.inet_down:.0f}", o.geolocation,
        )
    return table


def job_plan(s: Settings, steps: int | None = None) -> tuple[JobPlan, int]:
    """The plan offers are ranked by: the default recipe, with `steps` when given."""
    try:
        recipe = FluxRecipe.from_preset("character", name="offers", trigger_word="sks", steps=steps)
    except RecipeError as exc:
        fail(str(exc))
    return plan_for(recipe, s, 50_000_000), recipe.steps


def offers(
    gpu: Annotated[str | None, typer.Option("--gpu", help="GPU name, e.g. 'RTX 4090' or RTX_4090.")] = None,
    num_gpus: Annotated[int, typer.Option("--num-gpus", min=1, max=16)] = 1,
    region: Annotated[str | None, typer.Option("--region", help="Country code(s), comma separated.")] = None,
    max_price: Annotated[float | None, typer.Option("--max-price", min=0.001, help="Max $/h.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200)] = 10,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Rank by the cost of a job this long.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List rentable offers, best first: by the expected cost of a job (time, download, bandwidth)."""
    s = settings("vastai_api_key", why="to search offers")
    q = query_from_settings(s, gpu=gpu, num_gpus=num_gpus, region=region, max_price=max_price, limit=limit)
    plan, n_steps = job_plan(s, steps)
    found = _call(s, lambda c: c.search_offers(q, plan))[:limit]
    if as_json:
        print_json([o.public() for o in found])
    else:
        console.print(_offers_table(found, n_steps))


def regions(
    gpu: Annotated[str | None, typer.Option("--gpu")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Offers per region, with the cheapest price in each."""
    s = settings("vastai_api_key", why="to search offers")
    q = query_from_settings(s, gpu=gpu, limit=500)
    q.max_dph = None
    found = _call(s, lambda c: c.search_offers(q))
    by: dict[str, list[Offer]] = defaultdict(list)
    for o in found:
        by[o.region or "??"].append(o)
    rows = sorted(
        ({"region": r, "offers": len(v), "min_dph": round(min(o.dph_total for o in v), 4)} for r, v in by.items()),
        key=lambda row: (row["min_dph"], row["region"]),
    )
    if as_json:
        print_json(rows)
        return
    table = Table(title="regions")
    for col in ("region", "offers", "min $/h"):
        table.add_column(col)
    for row in rows:
        table.add_row(str(row["region"]), str(row["offers"]), f"{row['min_dph']:.3f}")
    console.print(table)


def _public_key(s: Settings) -> str | None:
    pub = Path(str(s.ssh_key_path) + ".pub")
    return pub.read_text().strip() if pub.is_file() else None


def rent_cmd(
    label: Annotated[str, typer.Option("--label", help="Unique label: the key to find the rental again.")],
    offer: Annotated[int | None, typer.Option("--offer", help="Rent this offer id.")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Rent the best offer under LORABOT_MAX_PRICE.")] = False,
    image: Annotated[str | None, typer.Option("--image")] = None,
    disk: Annotated[float | None, typer.Option("--disk", min=8, help="Disk GB (cannot change later).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rent one instance. Re-running with the same label adopts the first rental."""
    if (offer is None) == (not auto):
        fail("give exactly one of --offer ID or --auto")
    if not label.strip() or len(label) > 256:
        fail("--label must be 1 to 256 characters")
    s = settings("vastai_api_key", why="to rent")
    disk_gb = disk if disk is not None else s.disk_gb
    pub = _public_key(s)

    async def go(c: VastClient) -> dict[str, Any]:
        q = query_from_settings(s, limit=20)
        q.min_disk_gb = disk_gb
        candidates = await c.search_offers(q) if auto else None
        if offer is not None:
            q.max_dph = None
            listed = [o for o in await c.search_offers(q) if o.id == offer]
            candidates = listed or [Offer(id=offer)]
        if candidates:
            credit = (await c.balance()).credit
            if credit < candidates[0].dph_total:
                raise InsufficientCredit(f"credit ${credit:.2f} is below one hour of the offer: add credits")
        if pub:
            await c.ensure_ssh_key(pub)
        result = await rent(c, label=label, image=image or s.image, disk_gb=disk_gb, offers=candidates or [],
                            attempts=s.rent_attempts, label_watch_s=s.vastai_label_watch_s)
        if pub:
            await c.attach_ssh_key(result.instance_id, pub)
        if result.ambiguous:
            err_console.print(f"warning: a create went unanswered; if a second instance shows under label "
                              f"{label} later, `lorabot reconcile --destroy` removes it", highlight=False)
        return result.model_dump()

    result = _call(s, go)
    if as_json:
        print_json(result)
    else:
        console.print(f"rented instance [bold]{result['instance_id']}[/] (offer {result['offer_id']}, "
                      f"${result['dph_total']:.3f}/h, label {label})")


def instances(as_json: JsonOpt = False) -> None:
    """Live instances of the account."""
    s = settings("vastai_api_key", why="to list instances")
    found = _call(s, lambda c: c.list_instances())
    if as_json:
        print_json([i.public() for i in found])
        return
    table = Table(title=f"{len(found)} instances")
    for col in ("id", "label", "status", "ssh", "$/h"):
        table.add_column(col)
    for i in found:
        p = i.public()
        ssh = f"{p['ssh_host']}:{p['ssh_port']}" if p["ssh_host"] else "-"
        table.add_row(str(i.id), i.label or "-", i.status.value, ssh, f"{i.dph_total:.3f}")
    console.print(table)


def destroy(instance_id: Annotated[int, typer.Argument(help="Instance id.")]) -> None:
    """Destroy an instance (idempotent: one already gone is success). Billing stops."""
    s = settings("vastai_api_key", why="to destroy")
    _call(s, lambda c: c.destroy_instance(instance_id))
    console.print(f"instance {instance_id} destroyed")


def balance(as_json: JsonOpt = False) -> None:
    """Account credit."""
    s = settings("vastai_api_key", why="to read the balance")
    b = _call(s, lambda c: c.balance())
    if as_json:
        print_json(b.model_dump())
    else:
        console.print(f"credit ${b.credit:.2f}")


def register(app: typer.Typer) -> None:
    app.command("offers")(offers)
    app.command("regions")(regions)
    app.command("rent")(rent_cmd)
    app.command("instances")(instances)
    app.command("destroy")(destroy)
    app.command("balance")(balance)
